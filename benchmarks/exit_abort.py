"""How often a finished 4-rank CPU run dies at exit (issue 38, item 7).

Repeats `torchrun --nproc_per_node=4 pretrain_debug.py ... --max_steps 3 --no-do_val
--num_workers 0 --no-do_save` (hidden 512, vocab 8192) and counts the runs whose torchrun exit
status is not 0, and among them those where a rank printed `terminate called without an active
exception` (a C++ std::thread still joinable when the interpreter exits: SIGABRT).

    python benchmarks/exit_abort.py --runs 20 [--append docs/benchmarks.md]

Slow on 2 cores (a run is ~15-30 s): the count of runs is what the machine affords.

    python benchmarks/exit_abort.py --mechanism --runs 20

The mechanism alone, in one process (~2 s a run): a thread polls the job's TCPStore as the failure
watcher does (distributed/abort.py), continuously, so that the interpreter's exit finds it inside
the C++ call (with the GIL released); "left running" exits with the thread still polling (a
daemon thread nobody stops), "stopped and joined" stops it first (what close_runtime does for every
thread the project starts). A thread that returns from C++ into a finalizing interpreter is ended
by a forced unwind through C++ frames that may not throw: std::terminate, this message, SIGABRT.
"""

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.common import machine  # noqa: E402

FLAGS = ["--device", "cpu", "--precision", "fp32", "--num_layer", "2", "--hidden_size", "512",
         "--num_attention_heads", "8", "--num_key_value_heads", "4", "--intermediate_size", "1024",
         "--vocab_size", "8192", "--block_size", "64", "--seq_len", "64", "--batch_size", "2",
         "--total_batch_size", "512", "--max_steps", "3", "--warmup_steps", "1",
         "--mock_data_num_samples", "256", "--no-do_val", "--num_workers", "0", "--no-do_save"]
ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(log_dir: str) -> tuple[int, str]:
    """-> (torchrun's exit status, its stdout and stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master-port", str(free_port()),
           "pretrain_debug.py", *FLAGS, "--log_dir", log_dir]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


MECHANISM = """
import sys, threading, time
from datetime import timedelta
import torch.distributed as dist
host = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
client = dist.TCPStore("127.0.0.1", host.port, is_master=False, timeout=timedelta(seconds=30))
stopped = threading.Event()
def watch():
    while not stopped.is_set():
        client.check(["message"])
thread = threading.Thread(target=watch, daemon=True)
thread.start()
time.sleep(0.2)
if sys.argv[1] == "join":
    stopped.set()
    thread.join()
"""


def mechanism(runs: int) -> str:
    """-> the markdown table of the mechanism's runs, thread left running vs stopped and joined."""
    rows = []
    for mode, label in (("leave", "left running"), ("join", "stopped and joined")):
        aborts = 0
        for _ in range(runs):
            r = subprocess.run([sys.executable, "-c", MECHANISM, mode], capture_output=True, text=True)
            aborts += r.returncode != 0 and ABORT in r.stderr
        rows.append(f"| {label} | {runs} | {runs - aborts} | {aborts} |")
        print(rows[-1], flush=True)
    return (f"| the polling thread at exit | runs | exit 0 | `{ABORT}` |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--append", metavar="PATH", help="append the result section to this markdown file")
    p.add_argument("--label", default="", help="what this measurement is of (e.g. the commit)")
    p.add_argument("--mechanism", action="store_true", help="the mechanism alone, in one process (see above)")
    args = p.parse_args()
    if args.mechanism:
        where = f"{machine(torch.device('cpu'))}, torch {torch.__version__}"
        text = (f"\nCommand: `python benchmarks/exit_abort.py --mechanism --runs {args.runs}`; {where}.\n\n"
                + mechanism(args.runs))
        print(text)
        if args.append:
            with open(args.append, "a") as f:
                f.write(text)
        return
    outcomes, start = collections.Counter(), time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            code, out = one_run(os.path.join(tmp, str(i)))
            kind = "ok" if code == 0 else ("abort" if ABORT in out else "other failure")
            outcomes[kind] += 1
            print(f"run {i + 1}/{args.runs}: exit {code} ({kind})", flush=True)
            if kind != "ok":
                print("\n".join(out.strip().splitlines()[-15:]), flush=True)
    minutes = (time.monotonic() - start) / 60
    where = f"{machine(torch.device('cpu'))}, torch {torch.__version__}"
    text = (f"\n## Exit-time aborts of a finished 4-rank run{f' ({args.label})' if args.label else ''}\n\n"
            f"Command: `python benchmarks/exit_abort.py --runs {args.runs}` ({minutes:.0f} minutes); {where}.\n"
            f"Each run: `torchrun --nproc_per_node=4 pretrain_debug.py` 2 layers, hidden 512, vocab 8192, "
            f"3 steps, `--no-do_val --num_workers 0 --no-do_save`.\n\n"
            f"| runs | exit 0 | `{ABORT}` | other failures |\n|---|---|---|---|\n"
            f"| {args.runs} | {outcomes['ok']} | {outcomes['abort']} | {outcomes['other failure']} |\n")
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()

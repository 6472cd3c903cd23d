"""How often a finished 4-rank CPU run dies at exit (issue 38, item 7).

Repeats `torchrun --nproc_per_node=4 pretrain_debug.py ... --max_steps 3 --no-do_val
--num_workers 0 --no-do_save` (hidden 512, vocab 8192) and counts the runs whose torchrun exit
status is not 0, and among them those where a rank printed `terminate called without an active
exception` (a C++ std::thread still joinable when the interpreter exits: SIGABRT).

    python benchmarks/exit_abort.py --runs 20 [--append docs/benchmarks.md]

Slow on 2 cores (a run is ~15-30 s): the count of runs is what the machine affords.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--append", metavar="PATH", help="append the result section to this markdown file")
    p.add_argument("--label", default="", help="what this measurement is of (e.g. the commit)")
    args = p.parse_args()
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

"""Hangs, restarts and stragglers through `tinytron-torchrun --standalone` (2 processes, gloo, CPU,
default --num_workers), from docs/checkpoints.md's restart-demo command (a 6 s step bound), and a
restart through scripts/launch.sh. Four jobs run at once (module fixture), then a fifth while the
stop job waits for torchrun to kill its stopped rank (30 s); each is asserted by its own test:

  reference  the test worker with the demo's flags; rank 1 is 8 s late into its first save and its
             first validation (longer than the step bound: they are bounded apart) and 0.2 s
             slower per micro-step every 20th step (a straggler)
  kill       the demo command as written; `kill -9` of rank 0 (it hosts the job's store) after
             the first checkpoint
  stop       rank 1 stops itself (SIGSTOP) in step 30
  stall      rank 1 sleeps in step 30, alive, outside any collective; no restarts
  launch     the demo's flags through scripts/launch.sh (MAX_RESTARTS 1); `kill -9` of rank 0
             after the first checkpoint
"""

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.dist_helper import free_port
from tests.docs import doc_block
from tests.test_preemption import LAUNCH
from tests.utils import launch_env, process_tree, read_log
from tinytron.distributed.watchdog import describe_hang
from tinytron.training.checkpoint import list_complete, read_model_state
from tinytron.training.metrics import read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = doc_block("docs/checkpoints.md", "restart-demo")
WORKER = os.path.join(REPO, "tests", "elastic_worker.py")
STEPS = 60


def _demo_argv(entry: str, *knobs: str, restarts: str = "1") -> list[str]:
    """The demo command with another entry script and the test worker's knobs."""
    argv = shlex.split(DEMO.replace("\\\n", " "))
    i = argv.index("pretrain_debug.py")
    argv[argv.index("--max-restarts") + 1] = restarts
    return argv[:i] + [entry] + argv[i + 1:] + list(knobs)


def _env() -> dict:
    """The venv's tinytron-torchrun and python first on PATH (docs/ convention)."""
    return {**os.environ, "PATH": os.pathsep.join((os.path.dirname(sys.executable), os.environ.get("PATH", "")))}


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        return {}


def _worker(root: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank` under `root` (not one of its DataLoader workers)."""
    for pid in process_tree(root):
        with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
        if _environ(pid).get(b"RANK") == str(rank).encode() and b"RANK" not in _environ(parent):
            return pid
    raise AssertionError(f"no worker of rank {rank}")


def _run_dir(folder) -> str:
    (name,) = os.listdir(folder)
    return os.path.join(folder, name)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """{name: (returncode, stdout, stderr, run folder)} of the four jobs."""
    root = tmp_path_factory.mktemp("hangs")
    argv = {
        "reference": _demo_argv(WORKER, "--slow_phases_rank", "1", "--slow_phases_seconds", "8",
                                "--straggler_rank", "1", "--straggler_every", "20", "--straggler_seconds", "0.2"),
        "kill": ["bash", "-c", DEMO],
        "stop": _demo_argv(WORKER, "--sigstop_rank", "1", "--sigstop_step", "30"),
        "stall": _demo_argv(WORKER, "--stall_rank", "1", "--stall_step", "30", "--stall_seconds", "600",
                            restarts="0"),
    }
    procs = {}
    with contextlib.ExitStack() as stack:
        for name, cmd in argv.items():
            cwd = root / name
            cwd.mkdir()
            (cwd / "pretrain_debug.py").write_text(open(os.path.join(REPO, "pretrain_debug.py")).read())
            procs[name] = subprocess.Popen(cmd, cwd=cwd, env=_env(), text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            stack.callback(_kill_tree, procs[name])
        _kill_rank_0_after_the_first_checkpoint(procs["kill"], root / "kill" / "logs" / "faults")
        out = {name: procs[name].communicate(timeout=600) for name in ("reference", "kill")}
        # The stop job now waits for torchrun's SIGKILL of its stopped rank: the launch job runs meanwhile.
        demo = _demo_argv(WORKER)
        flags = [*demo[demo.index(WORKER) + 1:], "--log_dir", str(root / "launch" / "logs" / "faults")]
        procs["launch"] = subprocess.Popen(
            [*LAUNCH, WORKER, *flags], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**launch_env(), "MAX_RESTARTS": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())})
        stack.callback(_kill_tree, procs["launch"])
        _kill_rank_0_after_the_first_checkpoint(procs["launch"], root / "launch" / "logs" / "faults")
        out.update({name: p.communicate(timeout=600) for name, p in procs.items() if name not in out})
    return {name: (procs[name].returncode, *out[name], _run_dir(root / name / "logs" / "faults")) for name in procs}


def _kill_rank_0_after_the_first_checkpoint(proc, folder) -> None:
    """`kill -9` of the job's rank-0 worker once `folder`'s run has a complete checkpoint."""
    deadline = time.monotonic() + 300   # generous: a loaded machine starts torchrun slowly
    while not (folder.is_dir() and os.listdir(folder)
               and list_complete(os.path.join(_run_dir(folder), "checkpoints"))):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the job ended"
        time.sleep(0.01)
    os.kill(_worker(proc.pid, 0), signal.SIGKILL)


def _kill_tree(proc) -> None:
    if proc.poll() is None:
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.communicate()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[tinytron] error")]


def test_slow_save_and_validation_do_not_trip_the_step_bound(jobs):
    """Rank 0 waits 8 s for rank 1 in the first save (step 20) and the first validation (step 50),
    beyond the 6 s bound of a step: the run ends 0, no hang."""
    rc, out, err, run_dir = jobs["reference"]
    assert rc == 0 and not _errors(err), err[-3000:]
    assert not os.path.exists(os.path.join(run_dir, "hangs"))
    first_save = float(re.search(r"saved \S+step_00000020 \(([\d.]+) s\)", out).group(1))
    assert first_save >= 7.5   # rank 0 did wait for rank 1 there
    assert sorted(read_log(run_dir)) == list(range(STEPS))


def test_straggler_in_metrics(jobs):
    """Every record names the slowest rank; every 20th step (10, 30, 50) rank 1 is 0.4 s slower
    (0.2 s in each of its 2 micro-steps) and is named, with its time and rank 0's."""
    *_, run_dir = jobs["reference"]
    records = read_records(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(STEPS))
    for r in records:
        assert r["perf/slowest_rank"] in (0, 1) and 0 < r["perf/fastest_rank_time_s"] <= r["perf/slowest_rank_time_s"]
    slowed = [r for r in records if r["step"] % 20 == 10]
    assert len(slowed) == 3
    for r in slowed:
        assert r["perf/slowest_rank"] == 1 and r["perf/slowest_rank_time_s"] >= 0.4, r
        assert r["perf/fastest_rank_time_s"] < 0.4, r


def _resumed_like_the_reference(jobs, name: str, stdout: str) -> None:
    """Restart 1 resumed from step 20, each step logged once, losses (train and val) of the reference."""
    assert "torchrun restart 1: resuming" in stdout
    assert re.search(r"resumed from \S+ at step (\d+)", stdout).group(1) == "20"
    run_dir, ref_dir = jobs[name][3], jobs["reference"][3]
    for kind in ("train", "val"):
        got, want = read_log(run_dir, kind), read_log(ref_dir, kind)
        assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-6 for s in want), kind
    assert sorted(read_log(run_dir)) == list(range(STEPS))


def test_killed_rank_restarts(jobs):
    """`kill -9` of rank 0 after the first checkpoint (the demo as written): exit 0, resumed. (Without
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted workers fail to connect: exit 1.)"""
    rc, out, err, _ = jobs["kill"]
    assert rc == 0, err[-3000:]
    _resumed_like_the_reference(jobs, "kill", out)


def test_killed_rank_restarts_under_launch_sh(jobs):
    """The same through scripts/launch.sh (MAX_RESTARTS 1): exit 0, resumed from step 20, each step
    logged once with the reference's losses, and the reference's final weights, bitwise."""
    rc, out, err, run_dir = jobs["launch"]
    assert rc == 0, err[-3000:]
    _resumed_like_the_reference(jobs, "launch", out)
    got, want = (read_model_state(list_complete(os.path.join(d, "checkpoints"))[-1])
                 for d in (run_dir, jobs["reference"][3]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_stopped_rank_is_named_and_the_job_restarts(jobs):
    """SIGSTOP of rank 1 in step 30: rank 0's step bound runs out; it writes its stacks and ends the
    job with one line naming rank 1 by its last completed step (29); torchrun restarts both, the
    run resumes from step 20 and ends 0 with the reference's losses."""
    rc, out, err, run_dir = jobs["stop"]
    assert rc == 0, err[-3000:]
    folder = os.path.join(run_dir, "hangs", "0")
    assert _errors(err) == [
        "[tinytron] error: hang: rank 1 stopped making progress after step 29 (does not answer: stopped, dead or "
        "holding the GIL); rank 0 waits on it (no step ended within --step_timeout_minutes 0.1 of the step before); "
        f"Python stacks: {os.path.relpath(folder, os.path.dirname(os.path.dirname(os.path.dirname(run_dir))))}"
        "/rank<r>.txt"], err[-3000:]
    assert os.listdir(folder) == ["rank0.txt"]   # a stopped rank writes none
    stacks = open(os.path.join(folder, "rank0.txt")).read()
    assert stacks.startswith("rank 0: last completed step 29; main thread waits on its peers at ")
    assert "Thread 0x" in stacks and "trainer.py" in stacks
    _resumed_like_the_reference(jobs, "stop", out)


def test_stalled_live_rank_is_named_with_its_place(jobs):
    """Rank 1 sleeps in step 30 (alive, outside any collective): both ranks write their stacks, the
    line names rank 1 and where it is, every rank exits 1 (no restarts left)."""
    rc, _, err, run_dir = jobs["stall"]
    assert rc == 1, (rc, err[-3000:])
    lines = _errors(err)
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert re.fullmatch(r"\[tinytron\] error: hang: rank 1 stopped making progress after step 29 \(runs outside any "
                        r"collective at elastic_worker\.py:\d+ in train_step\); rank 0 waits on it \(.*\); "
                        r"Python stacks: \S+/hangs/0/rank<r>\.txt", line), line
    folder = os.path.join(run_dir, "hangs", "0")
    assert sorted(os.listdir(folder)) == ["rank0.txt", "rank1.txt"]
    stalled = open(os.path.join(folder, "rank1.txt")).read()
    assert stalled.startswith("rank 1: last completed step 29; main thread runs at elastic_worker.py:")
    assert re.search(r'elastic_worker\.py", line \d+ in train_step', stalled)
    assert open(os.path.join(folder, "rank0.txt")).read().startswith("rank 0: last completed step 29; main thread "
                                                                     "waits on its peers")


def test_describe_hang():
    """Who is named: silent ranks, then ranks outside collectives, else the ranks behind."""
    waits = {"where": "x.py:1 in f", "waiting": True}
    busy = {"where": "loader.py:9 in next", "waiting": False}
    done = {0: 7, 1: 7, 2: 7, 3: 7, 4: 6}
    assert describe_hang(done, {0: waits, 2: waits, 3: waits, 4: busy}, 5) == (
        "rank 1 stopped making progress after step 7 (does not answer: stopped, dead or holding the GIL); "
        "rank 4 stopped making progress after step 6 (runs outside any collective at loader.py:9 in next); "
        "ranks 0, 2-3 wait on them")
    everyone = {r: waits for r in range(5)}
    assert describe_hang(done, everyone, 5) == ("rank 4 stopped making progress after step 6 (behind the others); "
                                                "ranks 0-3 wait on it")
    assert describe_hang({r: 7 for r in range(5)}, everyone, 5) == (
        "every rank waits on its peers after step 7 (collectives called in a different order on some ranks?)")
    assert describe_hang({0: None, 1: None}, {0: waits}, 2) == (
        "rank 1 stopped making progress in its first step (does not answer: stopped, dead or holding the GIL); "
        "rank 0 waits on it")

"""Failure handling under real torchrun (2 processes, gloo, CPU): a stuck rank ends the job with a
message instead of a hang; time-based saves happen at the same step on every rank;
scripts/launch.sh passes torchrun the right flags. (A killed worker restarted through
scripts/launch.sh, resuming bitwise: tests/test_hangs.py.)"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

from tests import test_preemption as preemption
from tests.dist_helper import free_port
from tests.utils import TINY_FLAGS, children, process_tree
from tinytron.training.checkpoint import list_complete

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = "tests/elastic_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def _job(cmd, log_dir, *flags, env=None):
    """A torchrun job of the test worker with the tiny flags; killed with its workers if the test
    leaves it running (a failed assertion, a hang caught by communicate's timeout)."""
    proc = subprocess.Popen([*cmd, *TINY_FLAGS, "--log_dir", str(log_dir), *flags], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "MASTER_PORT": str(free_port()), **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            for pid in process_tree(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.communicate()


def _run_dir(log_dir) -> str:
    (name,) = os.listdir(log_dir)
    return os.path.join(log_dir, name)


LAUNCH = [*preemption.LAUNCH, WORKER]


def test_stuck_rank_fails_the_job_within_the_timeout(tmp_path):
    """Rank 1 sleeps 10 s before step 3 while --dist_timeout_minutes is 6 s: rank 0's collective
    times out, it names the timeout and exits 1; rank 1 wakes to a dead peer and exits 1 too;
    torchrun (no restarts) fails the job, and no worker is left running. (6 s, not less, so that
    a slow start of one process on a loaded machine does not time out first.)"""
    start = time.monotonic()
    with _job(TORCHRUN + ["--max-restarts", "0", WORKER], tmp_path, "--max_steps", "20",
              "--dist_timeout_minutes", "0.1", "--stall_rank", "1", "--stall_step", "3",
              "--stall_seconds", "10") as proc:
        workers = []
        while len(workers) < 2 and proc.poll() is None:
            workers = children(proc.pid)
            time.sleep(0.01)
        _, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 60, (elapsed, err[-3000:])
    assert len(workers) == 2 and not any(_alive(p) for p in workers)
    assert "[tinytron] error: rank 0: collective failed (a rank died or exceeded --dist_timeout_minutes 0.1)" in err
    assert "Timed out" in err.split("error: rank 0:")[1].splitlines()[0]
    assert "[tinytron] error: rank 1: collective failed" in err
    for pid in workers:  # torchrun's failure summary: both left through run()'s error path
        assert re.search(rf"exitcode\s*: 1 \(pid: {pid}\)", err), err[-2000:]
    assert "trainer.py" not in err  # one line each, no traceback from our code


def test_time_based_saves_happen_at_the_same_step_on_every_rank(tmp_path):
    """--save_every_minutes 0.001 (60 ms) with --save_every_steps 1000: rank 0's clock decides,
    the flag travels in the step's all-reduce, and every checkpoint holds both ranks' files (a
    rank saving at another step would leave its file elsewhere, or hang)."""
    with _job(TORCHRUN + [WORKER], tmp_path, "--max_steps", "40", "--save_every_steps", "1000",
              "--save_every_minutes", "0.001", "--step_sleep", "0.02") as proc:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    root = os.path.join(_run_dir(tmp_path), "checkpoints")
    steps = [int(os.path.basename(d).split("_")[1]) for d in list_complete(root)]
    assert len([s for s in steps if s != 40]) >= 3, steps  # 40: the final save
    for d in list_complete(root):
        assert sorted(os.listdir(os.path.join(d, "rng"))) == ["rank0.pt", "rank1.pt"], d
    assert len(os.listdir(root)) == len(steps)  # no half-written folder left behind


def test_launch_sh_flags(tmp_path):
    """The torchrun command line scripts/launch.sh builds (a fake TINYTRON_PYTHON echoes what follows
    its `-m torch.distributed.run`, after the TORCH_DISABLE_SHARE_RDZV_TCP_STORE it exports), and the
    preflight it runs first (the entry script with TINYTRON_PREFLIGHT = the world size)."""
    fake, preflights = tmp_path / "python", tmp_path / "preflights"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then exec "{sys.executable}" "$@"; fi\n'
                    f'if [ -n "$TINYTRON_PREFLIGHT" ]; then echo "$TINYTRON_PREFLIGHT $*" >> {preflights}; exit 0; fi\n'
                    'shift 2\necho "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" "$@"\n')
    fake.chmod(0o755)
    ours = ("NUM_NODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "MAX_RESTARTS", "RUN_ID",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PET_") and k not in ours}

    def flags(**env):
        r = subprocess.run(LAUNCH[:-1] + ["x.py", "--a", "1"], cwd=REPO, capture_output=True, text=True,
                           check=True, env={**base, "TINYTRON_PYTHON": str(fake), **env})
        return r.stdout.split()

    entry = ["x.py", "--sep_size", "1", "--a", "1"]
    one_node = flags(NPROC_PER_NODE="2")   # no MASTER_PORT: a free one, not the shared default
    assert re.fullmatch(r"127\.0\.0\.1:\d+", one_node[10]) and one_node[10] != "127.0.0.1:29500"
    assert one_node[:10] + one_node[11:] == [
        "1", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "3",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "--rdzv-id", "tinytron", *entry]
    assert flags(NPROC_PER_NODE="8", NUM_NODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="6000",
                 RUN_ID="job7", MAX_RESTARTS="1") == [
        "1", "--nnodes", "2", "--nproc-per-node", "8", "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:6000", "--rdzv-id", "job7", *entry]
    assert preflights.read_text().splitlines() == [" ".join(["2", *entry]), " ".join(["16", *entry])]
    # Kubeflow with an elastic policy sets torchrun's variables: no flag overrides them.
    assert flags(NUM_NODES="2", PET_NNODES="2:4", PET_NPROC_PER_NODE="8", PET_MAX_RESTARTS="5",
                 PET_RDZV_BACKEND="c10d", PET_RDZV_ENDPOINT="svc:29400", PET_RDZV_ID="job") == ["1", *entry]
    # Kubeflow without one: its static rendezvous (PET_MASTER_ADDR, PET_NODE_RANK, ...) is kept.
    assert flags(PET_NNODES="2", PET_NODE_RANK="1", PET_MASTER_ADDR="master-0", PET_MASTER_PORT="23456",
                 NPROC_PER_NODE="8", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0") == [
        "0", "--nproc-per-node", "8", "--max-restarts", "3", *entry]
    assert len(preflights.read_text().splitlines()) == 2   # none where the platform sets the layout

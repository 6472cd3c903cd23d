"""Faults a user of a long job meets, on real torchrun jobs (2 processes, gloo, CPU): Ctrl-C,
and a checkpoint that cannot be written. Jobs run in sessions of their own (tests/test_preemption.py's
Job); Ctrl-C is SIGINT to the job's process group, as a terminal sends it."""

import os
import signal
import sys
import time

from tests.test_preemption import FLAGS, LONG, _run_dir, _steps, jobs
from tests.utils import read_log

TORCHRUN = [os.path.join(os.path.dirname(sys.executable), "tinytron-torchrun"), "--standalone",
            "--nproc_per_node", "2", "--max-restarts", "1"]


def _no_traceback(job) -> None:
    for stream in ("stdout", "stderr"):
        text = job.output(stream)
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


def test_ctrl_c_saves_once_and_twice_exits_at_once(tmp_path):
    """Ctrl-C during training, through scripts/debug_cpu/pretrain.sh and through tinytron-torchrun
    (with --max-restarts 1: the stop is not restarted) side by side: every rank stops at the same
    step, one checkpoint at the step reached, exit 0, one line naming the checkpoint, no traceback.
    Then the same tinytron-torchrun command again (it resumes from that checkpoint) with Ctrl-C
    pressed twice as a save begins (tests/signal_worker.py): exit 130 at once, without saving
    (the rank waits 120 s for it), one line saying so, the previous checkpoint still the newest."""
    script = ["bash", "scripts/debug_cpu/pretrain.sh", *FLAGS, *LONG]
    torchrun = [*TORCHRUN, "tests/signal_worker.py", "--use_mock_data", *FLAGS, *LONG]
    reached = {}
    with jobs() as start:
        started = {"script": start(script + ["--log_dir", str(tmp_path / "script")], tmp_path / "script-1"),
                   "torchrun": start(torchrun + ["--log_dir", str(tmp_path / "torchrun")], tmp_path / "torchrun-1")}
        for job in started.values():
            job.wait_for(r"step +3 \|")
            os.killpg(job.proc.pid, signal.SIGINT)
        for name, job in started.items():
            job.finish()
            _no_traceback(job)
            run_dir = _run_dir(tmp_path / name)
            reached[name] = max(read_log(run_dir)) + 1
            assert sorted(read_log(run_dir)) == list(range(reached[name]))   # each step once: no restart
            assert _steps(run_dir) == [reached[name]]
            path = os.path.join(run_dir, "checkpoints", f"step_{reached[name]:08d}")
            assert f"[tinytron] SIGINT: saved step {reached[name]}, exiting (checkpoint {path};" in job.output()
            assert "torchrun restart" not in job.output()

        save_at = (reached["torchrun"] // 4 + 1) * 4
        job = start(torchrun + ["--log_dir", str(tmp_path / "torchrun"), "--save_every_steps", "4"],
                    tmp_path / "torchrun-2", env={"TEST_CTRL_C_IN": f"save@{save_at}"})
        assert job.proc.wait(timeout=110) == 130, job.output("stderr")[-3000:]
        _no_traceback(job)
        assert time.monotonic() - job.start < 100
        assert job.output("stderr").count("[tinytron] SIGINT again: exiting at once, without saving") == 1
        run_dir = _run_dir(tmp_path / "torchrun")
        assert min(read_log(run_dir)) == 0 and max(read_log(run_dir)) == save_at - 1
        assert _steps(run_dir) == [reached["torchrun"]]

"""Faults a user of a long job meets, on real torchrun jobs (2 processes, gloo, CPU): Ctrl-C,
and a checkpoint that cannot be written. Jobs run in sessions of their own (tests/test_preemption.py's
Job); Ctrl-C is SIGINT to the job's process group, as a terminal sends it."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.dist_helper import run_script
from tests.docs import doc_block
from tests.test_preemption import FLAGS, LONG, _rank_logs, _run_dir, _steps, jobs
from tests.utils import launch_env, read_log

TINYTRON_TORCHRUN = [os.path.join(os.path.dirname(sys.executable), "tinytron-torchrun"), "--standalone",
                     "--nproc_per_node", "2"]
TORCHRUN = [*TINYTRON_TORCHRUN, "--max-restarts", "1"]


def _no_traceback(job) -> None:
    for stream in ("stdout", "stderr"):
        text = job.output(stream)
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


def test_ctrl_c_saves_once_and_twice_exits_at_once(tmp_path):
    """Ctrl-C during training, through scripts/debug_cpu/pretrain.sh (docs/checkpoints.md's
    command, as written) and through tinytron-torchrun
    (with --max-restarts 1: the stop is not restarted) side by side: every rank stops at the same
    step, one checkpoint at the step reached, exit 0, one line naming the checkpoint, no traceback.
    Then the same tinytron-torchrun command again (it resumes from that checkpoint) with Ctrl-C
    pressed twice as a save begins (tests/signal_worker.py): exit 130 at once, without saving
    (the rank waits 120 s for it), one line saying so, the previous checkpoint still the newest."""
    script = doc_block("docs/checkpoints.md", "ctrl-c")   # scripts/debug_cpu/pretrain.sh --log_dir DEMO
    demo = re.search(r"--log_dir (\S+)", script).group(1)
    shutil.rmtree(demo, ignore_errors=True)
    torchrun = [*TORCHRUN, "tests/signal_worker.py", "--use_mock_data", *FLAGS, *LONG]
    reached, log_dirs = {}, {"script": demo, "torchrun": tmp_path / "torchrun"}
    with jobs() as start:
        started = {"script": start(["bash", "-c", script], tmp_path / "script-1"),
                   "torchrun": start(torchrun + ["--log_dir", str(tmp_path / "torchrun")], tmp_path / "torchrun-1")}
        for job in started.values():
            job.wait_for(r"step +3 \|")
            os.killpg(job.proc.pid, signal.SIGINT)
        for name, job in started.items():
            job.finish()
            _no_traceback(job)
            run_dir = _run_dir(log_dirs[name])
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


def _disk_usage(folder) -> int:
    """Bytes of the blocks the files under `folder` take."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(folder) for f in files)


def _failed_save(tmp_path, name, log_dir, env=None, entry="pretrain_debug.py"):
    """A job that saves at 4 and 8 (--max-restarts 0); -> (its run folder, each rank's stderr)."""
    flags = [*FLAGS, "--max_steps", "8", "--save_every_steps", "4", "--val_every_steps", "100"]
    cmd = [*TINYTRON_TORCHRUN, "--max-restarts", "0", "--log-dir", str(tmp_path / f"{name}-logs"), "--redirects", "3",
           entry, "--use_mock_data", *flags, "--log_dir", str(log_dir)]
    with jobs() as start:
        job = start(cmd, tmp_path / name, env=env)
        assert job.proc.wait(timeout=150) == 1, job.output("stderr")[-3000:]
    return _run_dir(log_dir), _rank_logs(tmp_path / f"{name}-logs")


def _check_failed_save(run_dir, errors) -> None:
    """Checkpoint 8 failed with ENOSPC: one line, the same on both ranks, naming it; 4 is the
    newest (and only) checkpoint, no partial folder is left."""
    root = os.path.join(run_dir, "checkpoints")
    line = (f"[tinytron] error: cannot write checkpoint {root}/step_00000008: No space left on device (ENOSPC); "
            f"the partial folder was removed, the newest complete checkpoint is {root}/step_00000004")
    assert [e.strip().splitlines()[-1] for e in errors] == [line, line]   # rank 0's progress bar above
    assert not any("Traceback" in e for e in errors)
    assert sorted(os.listdir(root)) == ["step_00000004"]


@pytest.fixture(scope="module")
def no_space(tmp_path_factory):
    """Rank 1's writes of checkpoint 8 fail with ENOSPC (tests/signal_worker.py)."""
    tmp_path = tmp_path_factory.mktemp("no_space")
    return _failed_save(tmp_path, "hook", tmp_path / "runs", {"TEST_NO_SPACE_IN": "save@8@1"}, "tests/signal_worker.py")


def test_failed_save_is_one_line_on_every_rank(no_space):
    _check_failed_save(*no_space)


def test_save_into_a_full_file_system(no_space, tmp_path):
    """The same run in a small tmpfs that holds the run folder with checkpoint 4 and half a
    checkpoint more: the save of 8 fails for real."""
    run_dir, _ = no_space
    size = _disk_usage(run_dir) + _disk_usage(os.path.join(run_dir, "checkpoints")) // 2
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        _check_failed_save(*_failed_save(tmp_path, "tmpfs", mount))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_async_save_killed_mid_write_resumes_from_the_previous(tmp_path):
    """--async_save through tinytron-torchrun (--max-restarts 0), saves every 2: rank 1 dies as
    its background write of checkpoint 4 reaches the optimizer state, while training goes on
    (tests/signal_worker.py). Checkpoint 2 stays the newest complete one; the same command again
    resumes from it and finishes: every step logged once, the steps the first run logged
    reproduced bitwise, checkpoints 2, 4, 6, 8 complete."""
    flags = [*FLAGS, "--max_steps", "8", "--save_every_steps", "2", "--val_every_steps", "100", "--async_save"]
    cmd = [*TINYTRON_TORCHRUN, "--max-restarts", "0", "tests/signal_worker.py", "--use_mock_data", *flags,
           "--log_dir", str(tmp_path / "runs")]
    with jobs() as start:
        job = start(cmd, tmp_path / "killed", env={"TEST_KILL_IN": "optimizer@4@1"})
        assert job.proc.wait(timeout=150) != 0
        run_dir = _run_dir(tmp_path / "runs")
        first = read_log(run_dir)
        assert max(first) >= 3 and _steps(run_dir) == [2], job.output("stderr")[-3000:]
        job = start(cmd, tmp_path / "resumed")
        job.finish(150)
        assert "resumed from" in job.output() and "step_00000002" in job.output()
    again = read_log(run_dir)
    assert sorted(again) == list(range(8)) and {s: again[s] for s in first} == first
    assert _steps(run_dir) == [2, 4, 6, 8]


def test_async_save_without_saves_is_refused(tmp_path):
    """--async_save --no-do_save: one line naming both flags, exit 2, before any work."""
    r = run_script("pretrain_debug.py", *FLAGS, "--log_dir", str(tmp_path), "--async_save", "--no-do_save",
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and r.stderr.strip() == (
        "[tinytron] error: --async_save writes checkpoints in the background: it needs --do_save (drop --no-do_save)")
    assert not os.listdir(tmp_path)


def test_plan_counts_the_async_staging():
    """docs/checkpoints.md's tinytron-plan command, as written: the staging line holds the rank's
    optimizer state (ZeRO-1 on) and its share of the parameters (each written by one rank);
    tests/test_plan.py checks the bytes of each rank against the copy --async_save makes."""
    r = subprocess.run(["bash", "-c", doc_block("docs/checkpoints.md", "async-plan")], capture_output=True, text=True,
                       env=launch_env(os.path.dirname(sys.executable)), timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {line[:27].strip(): line[27:].split() for line in r.stdout.splitlines() if line.startswith("  ")}
    staging, params, optimizer = (float(rows[k][0]) for k in
                                  ("--async_save staging", "parameters (fp32)", "AdamW state (fp32 m, v)"))
    assert optimizer < staging < params + optimizer

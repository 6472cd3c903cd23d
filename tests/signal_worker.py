"""Test-only entry point for tests/test_preemption.py: runs pretrain_debug.py unchanged, after
hooking the Trainer to put a signal or an error at an exact point of a torchrun job:

    TEST_SIGNAL_IN="evaluate@4,save@12"  rank 0 sends TEST_SIGNAL (default SIGTERM) to every process
                                         of the job (the tree under the launcher, which leads the
                                         job's session) as it enters validation at step 4 / the
                                         save of checkpoint 12: the signal arrives inside that phase
    TEST_RAISE_IN="evaluate@8@1"         rank 1 raises ValueError as it enters validation at step 8
    TEST_CTRL_C_IN="save@12"             rank 0, entering the save of checkpoint 12, does what a
                                         user pressing Ctrl-C twice does: SIGINT to the job's
                                         process group (the terminal's: the launcher's), and once
                                         torchrun has passed it on to this rank, SIGINT again;
                                         then it waits (120 s) for the second one to end it
    TEST_NO_SPACE_IN="save@8@1"          rank 1's writes of checkpoint 8's tensors (DCP's file
                                         streams) fail with ENOSPC, as on a full disk
    TEST_KILL_IN="optimizer@4@1"         rank 1 dies (SIGKILL) as it starts writing checkpoint 4's
                                         optimizer state (its model state written): with
                                         --async_save, in the background while training goes on
"""

import contextlib
import errno
import os
import runpy
import signal
import sys
import time

from torch.distributed.checkpoint import filesystem

from tests.utils import process_tree
from tinytron.training import checkpoint_save
from tinytron.training.trainer import Trainer


def _points(var: str) -> set[tuple[str, ...]]:
    return {tuple(p.split("@")) for p in os.environ.get(var, "").split(",") if p}


def _hook(phase: str, step: int) -> None:
    rank = os.environ["RANK"]
    if (phase, str(step)) in _points("TEST_SIGNAL_IN") and rank == "0":
        sig = signal.Signals[os.environ.get("TEST_SIGNAL", "SIGTERM")]
        for pid in process_tree(os.getsid(os.getppid())):  # torchrun's session: the launcher's
            os.kill(pid, sig)
    if (phase, str(step), rank) in _points("TEST_RAISE_IN"):
        raise ValueError(f"test error in {phase} at step {step}")


def _ctrl_c_twice(trainer) -> None:
    if ("save", str(trainer.step)) in _points("TEST_CTRL_C_IN") and os.environ["RANK"] == "0":
        group = os.getpgid(os.getppid())   # torchrun's: the launcher's, as started from a terminal
        os.killpg(group, signal.SIGINT)
        while signal.SIGINT not in trainer.signals.received:   # passed on by torchrun
            time.sleep(0.01)
        os.killpg(group, signal.SIGINT)
        time.sleep(120)


def main() -> None:
    evaluate, save_checkpoint, save = Trainer.evaluate, checkpoint_save.save_checkpoint, Trainer.save

    def hooked_evaluate(self):
        _hook("evaluate", self.step)
        return evaluate(self)

    def hooked_save_checkpoint(root, step, *args, **kwargs):
        _hook("save", step)
        return save_checkpoint(root, step, *args, **kwargs)

    def hooked_save(self):
        _ctrl_c_twice(self)
        return save(self)

    create_stream = filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def full_create_stream(self, path, mode):
        for _, step, rank in _points("TEST_NO_SPACE_IN"):
            if f".tmp_step_{int(step):08d}" in str(path) and os.environ["RANK"] == rank:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with create_stream(self, path, mode) as stream:
            yield stream

    save_state = checkpoint_save.save_state

    def hooked_save_state(directory, *args, **kwargs):
        for part, step, rank in _points("TEST_KILL_IN"):
            folder = os.path.join(f".tmp_step_{int(step):08d}", part)
            if directory.endswith(folder) and os.environ["RANK"] == rank:
                os.kill(os.getpid(), signal.SIGKILL)
        return save_state(directory, *args, **kwargs)

    checkpoint_save.save_state = hooked_save_state
    Trainer.evaluate, Trainer.save = hooked_evaluate, hooked_save
    checkpoint_save.save_checkpoint = hooked_save_checkpoint
    filesystem.FileSystem.create_stream = full_create_stream
    sys.argv[0] = "pretrain_debug.py"
    runpy.run_path("pretrain_debug.py", run_name="__main__")


if __name__ == "__main__":
    main()

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
"""

import os
import runpy
import signal
import sys
import time

from tests.utils import process_tree
from tinytron.training import checkpoint
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
    evaluate, save_checkpoint, save = Trainer.evaluate, checkpoint.save_checkpoint, Trainer.save

    def hooked_evaluate(self):
        _hook("evaluate", self.step)
        return evaluate(self)

    def hooked_save_checkpoint(root, step, *args, **kwargs):
        _hook("save", step)
        return save_checkpoint(root, step, *args, **kwargs)

    def hooked_save(self):
        _ctrl_c_twice(self)
        return save(self)

    Trainer.evaluate, checkpoint.save_checkpoint, Trainer.save = hooked_evaluate, hooked_save_checkpoint, hooked_save
    sys.argv[0] = "pretrain_debug.py"
    runpy.run_path("pretrain_debug.py", run_name="__main__")


if __name__ == "__main__":
    main()

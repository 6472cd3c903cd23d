"""Stop signals: a preempted job saves and stops, every rank at the same step.

A handler only records the signal; the ranks share what they received in an all-reduce they run
anyway (the Trainer carries the flags in each step's statistics and in the validation totals), so
no rank stops alone and no collective is added to a step.
"""

import os
import signal

# Signals that ask the run to save and stop: SIGTERM (SLURM's scancel and preemption, Kubernetes,
# torchrun passing its own SIGTERM on) and SIGUSR1 (SLURM's early warning, `--signal=USR1@120`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of the DataLoader workers: the main process decides what a signal means.
    A worker that died of a SIGTERM meant for the whole job (SLURM signals every process,
    torchrun its workers' process groups) would fail the step with "DataLoader worker is killed
    by signal"; SIGINT (Ctrl-C reaches the whole process group) would print a traceback per worker."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Catches STOP_SIGNALS from construction on (a signal during setup stops the run after its
    first step instead of killing the process). A handler only records the signal in `received`;
    the ranks share what they received at their next all-reduce (training/sync.py: a step's
    statistics, the validation totals, or the one after a save) and set `agreed`, so all stop at
    the same step."""

    def __init__(self):
        self.received = set()  # stop signals this process received
        self.agreed = None     # name of the stop signal any rank received, once the ranks agreed
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received.add(signum)

    def announce_stop(self, step: int, saved: bool, is_main: bool) -> None:
        """After the agreed stop (and its complete checkpoint): say so, and tell the launcher
        (scripts/launch.sh) through $TINYTRON_STOP_FILE that this node's workers stopped on a
        signal on purpose: torchrun itself exits 1 when it got the signal too."""
        if is_main:
            print(f"[tinytron] {self.agreed}: {f'saved step {step}' if saved else f'at step {step}, not saved'}, "
                  "exiting", flush=True)
        stop_file = os.environ.get("TINYTRON_STOP_FILE")
        if stop_file and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            with open(stop_file, "w") as f:
                f.write(f"{self.agreed} {step}\n")

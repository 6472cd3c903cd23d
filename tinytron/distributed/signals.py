"""Stop signals: a preempted job saves and stops, every rank at the same step.

A handler only records the signal; the ranks share what they received in an all-reduce they run
anyway (the Trainer carries the flags in each step's statistics and in the validation totals), so
no rank stops alone and no collective is added to a step.

Ctrl-C (SIGINT) is such a stop the first time; the second SIGINT ends the process at once,
without saving (exit 130), even while its main thread waits in a collective: a thread of its own
(`_Interrupts`) sees it through the signal module's wakeup fd, which the C-level handler writes to
as the signal arrives (a Python handler would only run once the collective returned).
"""

import os
import signal
import threading

# Signals that ask the run to save and stop: SIGTERM (SLURM's scancel and preemption, Kubernetes,
# torchrun passing its own SIGTERM on), SIGUSR1 (SLURM's early warning, `--signal=USR1@120`) and
# SIGINT (Ctrl-C; tinytron-torchrun passes its own on).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of the DataLoader workers: the main process decides what a signal means.
    A worker that died of a SIGTERM meant for the whole job (SLURM signals every process,
    torchrun its workers' process groups) would fail the step with "DataLoader worker is killed
    by signal"; SIGINT (Ctrl-C reaches the whole process group) would print a traceback per worker."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Catches STOP_SIGNALS from construction on (a signal during setup stops the run after its
    first step instead of killing the process). A handler only records the signal in `received`;
    the ranks share what they received at their next all-reduce (training/sync.py: a step's
    statistics, the validation totals, or the one after a save) and set `agreed`, so all stop at
    the same step. A second SIGINT ends the process at once (`_Interrupts`, until
    stop_interrupt_thread)."""

    def __init__(self):
        self.received = set()  # stop signals this process received
        self.agreed = None     # name of the stop signal any rank received, once the ranks agreed
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        global _interrupts
        if _interrupts is None:   # one per process, however many Trainers it builds (tests)
            _interrupts = _Interrupts()

    def _on_signal(self, signum, frame) -> None:
        self.received.add(signum)


    def announce_stop(self, step: int, saved: str | None, is_main: bool) -> None:
        """After the agreed stop (and its complete checkpoint, at path `saved`, or None): say so
        and where, and tell the launcher
        (scripts/launch.sh) through $TINYTRON_STOP_FILE that this node's workers stopped on a
        signal on purpose: torchrun itself exits 1 when it got the signal too."""
        if is_main:
            where = f" (checkpoint {saved}; the same command resumes from it)" if saved else ""
            print(f"[tinytron] {self.agreed}: {f'saved step {step}' if saved else f'at step {step}, not saved'}, "
                  f"exiting{where}", flush=True)
        stop_file = os.environ.get("TINYTRON_STOP_FILE")
        if stop_file and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            with open(stop_file, "w") as f:
                f.write(f"{self.agreed} {step}\n")


_interrupts = None  # the process's _Interrupts, from the first StopSignals on


def stop_interrupt_thread() -> None:
    """Stop and join the second-SIGINT thread, before the interpreter exits (idempotent). From
    here on SIGINT is only recorded: the run is over."""
    global _interrupts
    if _interrupts is not None:
        _interrupts.close()
        _interrupts = None


class _Interrupts:
    """A daemon thread reading the signal numbers that the signal module's C-level handler writes
    to its wakeup fd as each signal arrives (whatever the main thread is doing). The first SIGINT
    is acknowledged (rank 0; the main thread's handler records it as a stop); the second ends the
    process with INTERRUPTED_EXIT_CODE, without saving, and rank 0 says so. Writes go straight to
    the file descriptors: a print here could meet the main thread's print on the same stream."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)   # the C handler must never block on a full pipe
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._main = int(os.environ.get("RANK", "0")) == 0
        self._thread = threading.Thread(target=self._watch, name="tinytron-interrupts", daemon=True)
        self._thread.start()

    def _say(self, line: str) -> None:
        if self._main:
            os.write(2, f"\n[tinytron] {line}\n".encode())

    def _watch(self) -> None:
        count = 0
        while True:
            for signum in os.read(self._read, 64):
                if signum == 0:   # close()
                    return
                if signum != signal.SIGINT:
                    continue
                count += 1
                if count == 1:
                    self._say("SIGINT: stopping at the end of this step (Ctrl-C again: exit at once, "
                              "without saving)")
                else:
                    self._say("SIGINT again: exiting at once, without saving (the newest complete "
                              "checkpoint is the one a rerun resumes from)")
                    os._exit(INTERRUPTED_EXIT_CODE)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.write(self._write, b"\0")
        self._thread.join()
        os.close(self._read)
        os.close(self._write)

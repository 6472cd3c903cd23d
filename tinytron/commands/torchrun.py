"""tinytron-torchrun: torchrun (torch.distributed.run, the same flags) whose workers' bad input
ends the job in one line.

Under plain torchrun, a flag that every rank rejects (exit 2) is followed by torchrun's report of
the failed workers: a log line per worker, a page of traceback, exit 1. Here the workers get a
file to claim (tinytron.distributed.abort.claim_bad_input_report): the first worker of the node to
reject its input prints its line and writes it there, the others stay quiet; from then on
torchrun's own log lines are dropped, and when the job ends this launcher exits 2 with nothing
more. Any other failure is reported by torchrun as usual. scripts/launch.sh runs its jobs with it.

    tinytron-torchrun --standalone --nproc_per_node 8 pretrain_debug.py --fsdp

Restarts (--max-restarts) still happen after bad input; the restarted workers fail the same way,
in silence, within seconds each.

Restarts work: the launcher sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (unless set) as
scripts/launch.sh does. Without it, the workers of a restart under the c10d rendezvous
(--standalone, --rdzv-backend c10d) bootstrap from torchrun's own store, which still holds the
previous attempt's gloo/NCCL addresses: they connect to dead workers and fail or hang
(pytorch#135712). A plain torchrun user sets the variable in the environment.

Ctrl-C: torchrun's own handler would end the workers (SIGINT, then SIGKILL after 30 s) and print
its traceback. Here the first SIGINT is passed on to the workers, which save at the end of their
step and exit 0, so the job ends 0 like after a SIGTERM (tinytron/distributed/signals.py); the
second SIGINT ends the job at once through torchrun's shutdown (the workers exit 130, without
saving), and this launcher exits 130 without torchrun's report.
"""

import logging
import os
import signal
import sys
import tempfile

from torch.distributed import run as torchrun
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from tinytron.distributed.abort import BAD_INPUT_FILE_ENV
from tinytron.distributed.signals import INTERRUPTED_EXIT_CODE

SIGNALS_ENV = "PET_SIGNALS_TO_HANDLE"   # torchrun's --signals-to-handle, which the workers do not read

UNSHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


class _QuietAfter(logging.Filter):
    """Drops every log record once `path` exists or the job was interrupted twice."""

    def __init__(self, path: str, interrupts: "_Interrupts"):
        super().__init__()
        self.path, self.interrupts = path, interrupts

    def filter(self, record: logging.LogRecord) -> bool:
        return not os.path.exists(self.path) and self.interrupts.count < 2


def _workers() -> list[int]:
    """This process's children (torchrun's workers), from /proc."""
    own, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and f.read().rsplit(")", 1)[1].split()[1] == own:
                    found.append(int(entry))
        except (OSError, IndexError):   # not a process, or it exited meanwhile
            continue
    return found


class _Interrupts:
    """SIGINT handler: the first is passed on to the workers (a stop, with a checkpoint); the
    second, or a first before any worker runs, ends the job the way torchrun's own handler does
    (SignalException: torchrun sends SIGINT to the workers, then SIGKILL after its timeout)."""

    def __init__(self):
        self.count = 0

    def __call__(self, signum, frame) -> None:
        self.count += 1
        workers = _workers() if self.count == 1 else []
        for pid in workers:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        if not workers:
            if self.count == 1:
                print("[tinytron] SIGINT before the workers started: exiting", file=sys.stderr, flush=True)
            self.count = max(self.count, 2)
            raise SignalException(f"Process {os.getpid()} got signal: SIGINT", sigval=signal.SIGINT)


def main(argv: list[str] | None = None) -> None:
    # Only where /proc lists the workers (Linux); elsewhere torchrun handles Ctrl-C itself.
    interrupts = _Interrupts() if os.path.isdir("/proc/self") else None
    args = sys.argv[1:] if argv is None else argv
    # Unless the user chose torchrun's signals (--signals-to-handle): torchrun handles the others.
    own_signals = interrupts is not None and SIGNALS_ENV not in os.environ and not any(
        a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in args)
    if own_signals:
        os.environ[SIGNALS_ENV] = "SIGTERM,SIGHUP,SIGQUIT"
        previous = signal.signal(signal.SIGINT, interrupts)
    else:
        interrupts = None
    restart = LocalElasticAgent._restart_workers

    def no_restart_after_ctrl_c(agent, group) -> None:
        """A worker that failed after Ctrl-C (its stop's save, say) ends the job: not restarted."""
        if interrupts is not None and interrupts.count:
            interrupts.count = 2   # quiet from here on: the workers said why
            raise SignalException(f"Process {os.getpid()} got signal: SIGINT", sigval=signal.SIGINT)
        restart(agent, group)

    LocalElasticAgent._restart_workers = no_restart_after_ctrl_c
    with tempfile.TemporaryDirectory(prefix="tinytron-torchrun-") as folder:
        path = os.path.join(folder, "bad_input")
        os.environ[BAD_INPUT_FILE_ENV] = path   # the workers inherit it
        set_here = UNSHARED_STORE_ENV not in os.environ
        os.environ.setdefault(UNSHARED_STORE_ENV, "1")   # read by torchrun's rendezvous, in this process
        quiet = _QuietAfter(path, interrupts or _Interrupts())
        loggers = [logging.getLogger()] + [logging.getLogger(name) for name in logging.root.manager.loggerDict]
        for handler in {h for logger in loggers for h in logger.handlers}:   # torch's, wherever attached
            handler.addFilter(quiet)
        try:
            torchrun.main(argv)
        except ChildFailedError:
            if os.path.exists(path):
                raise SystemExit(2) from None
            raise
        except SignalException as e:
            if e.sigval != signal.SIGINT or interrupts is None:
                raise
            raise SystemExit(INTERRUPTED_EXIT_CODE) from None   # the workers said why
        finally:   # main() called in-process (tests): later processes must not inherit the file
            os.environ.pop(BAD_INPUT_FILE_ENV, None)
            if set_here:
                os.environ.pop(UNSHARED_STORE_ENV, None)
            LocalElasticAgent._restart_workers = restart
            if own_signals:
                os.environ.pop(SIGNALS_ENV)
                signal.signal(signal.SIGINT, previous)
            for handler in {h for logger in loggers for h in logger.handlers}:
                handler.removeFilter(quiet)


if __name__ == "__main__":
    main()

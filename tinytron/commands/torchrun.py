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
"""

import logging
import os
import tempfile

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from tinytron.distributed.abort import BAD_INPUT_FILE_ENV

UNSHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


class _QuietAfter(logging.Filter):
    """Drops every log record once `path` exists."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        return not os.path.exists(self.path)


def main(argv: list[str] | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="tinytron-torchrun-") as folder:
        path = os.path.join(folder, "bad_input")
        os.environ[BAD_INPUT_FILE_ENV] = path   # the workers inherit it
        set_here = UNSHARED_STORE_ENV not in os.environ
        os.environ.setdefault(UNSHARED_STORE_ENV, "1")   # read by torchrun's rendezvous, in this process
        quiet = _QuietAfter(path)
        loggers = [logging.getLogger()] + [logging.getLogger(name) for name in logging.root.manager.loggerDict]
        for handler in {h for logger in loggers for h in logger.handlers}:   # torch's, wherever attached
            handler.addFilter(quiet)
        try:
            torchrun.main(argv)
        except ChildFailedError:
            if os.path.exists(path):
                raise SystemExit(2) from None
            raise
        finally:   # main() called in-process (tests): later processes must not inherit the file
            os.environ.pop(BAD_INPUT_FILE_ENV, None)
            if set_here:
                os.environ.pop(UNSHARED_STORE_ENV, None)
            for handler in {h for logger in loggers for h in logger.handlers}:
                handler.removeFilter(quiet)


if __name__ == "__main__":
    main()

"""Fail together: an error on one rank ends every rank within seconds, with the same line.

A rank that fails alone (a file only it reads is corrupt, an exception before a collective) would
leave its peers waiting in their next collective until --dist_timeout_minutes (NCCL), or failing
later with an unrelated "connection closed" (gloo). Instead, `fail` posts the one-line message
and exit code in the job's key-value store (the TCPStore at MASTER_ADDR:MASTER_PORT that
torch.distributed already uses, through a connection of our own); a daemon thread on every rank
(`watch`) checks the store every second (one small request per rank) and, once a message is
there, prints it and exits with its code. The first message posted wins, so every rank prints
the same line. Before exiting, rank 0 waits (at most a few seconds) until every rank has read the
message: it may host the store, and leaving early would hide the message from the slower ranks.
The other ranks leave once they have read it: a store call after rank 0 left would fail, and
print a page of C++ stack (TCPStore's recvValue) under the line.

Before a failing process exits, the callables given to `before_exit` run (e.g. removing a run
folder that never trained a step).
"""

import json
import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

# Set by tinytron-torchrun (tinytron/commands/torchrun.py) for its workers: the file the first of
# them to reject its input writes its line to (see claim_bad_input_report).
BAD_INPUT_FILE_ENV = "TINYTRON_BAD_INPUT_FILE"
POLL_SECONDS = 1.0  # how often the watcher looks for a message
READ_TIMEOUT_SECONDS = 10.0  # how long a rank waits for the others to read the message

_channel = None
_before_exit = []  # callables run once by a failing process before it exits
_exit_lock = threading.Lock()  # taken once, by the thread that prints and exits


class _Channel:
    """The message slot of this attempt of the job in the store, and the thread watching it."""

    def __init__(self, world_size: int):
        self.world_size, self.rank = world_size, dist.get_rank()
        self.readers = world_size  # how many ranks read the message before rank 0 leaves (read sets it)
        self.host_may_be_here = self.rank == 0
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=60))
        # torchrun may keep one store for all restarts of a job: one slot per attempt.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"tinytron/abort/{attempt}", store)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="tinytron-abort", daemon=True)
        self.thread.start()

    def post(self, message: str, code: int, printer: int | None = None, readers: int | None = None):
        """Post the message unless another rank did first; -> the posted one (see read), marked as read."""
        if self.store.add("posted", 1) == 1:
            self.store.set("message", json.dumps([message, code, printer, readers or self.world_size]))
        return self.read()

    def read(self) -> tuple[str | None, int]:
        """-> (the posted message, or None where another rank is its only printer; its exit code)."""
        message, code, printer, self.readers = json.loads(self.store.get("message"))  # get waits until it is set
        self.store.add("read", 1)
        return (message if printer in (None, self.rank) else None), code

    def wait_until_read(self) -> None:
        deadline = time.monotonic() + READ_TIMEOUT_SECONDS
        while self.store.add("read", 0) < self.readers and time.monotonic() < deadline:
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            try:
                if not self.store.check(["message"]):
                    continue
                message, code = self.read()
            except Exception:  # noqa: BLE001 - the store is gone (its host exited): nothing to relay
                return
            # On a line of its own: rank 0's progress bar may be open on this line.
            _exit(message and "\n" + message, code, self)


def before_exit(fn) -> None:
    """Run fn() (errors ignored) when this process fails through `fail` or a relayed failure."""
    _before_exit.append(fn)


def cancel_before_exit(fn) -> None:
    if fn in _before_exit:
        _before_exit.remove(fn)


def watch(world_size: int) -> None:
    """Start relaying other ranks' failures to this process (after init_process_group, env://)."""
    global _channel
    if world_size > 1 and _channel is None and "MASTER_ADDR" in os.environ:
        _channel = _Channel(world_size)


def stop_watching() -> None:
    """Before a normal exit: the store may go away with rank 0."""
    global _channel
    if _channel is not None:
        _channel.stopped.set()
        _channel.thread.join()
        _channel = None


def fail(message: str, code: int, post: bool = True, printer: int | None = None, readers: int | None = None) -> None:
    """Print one line and leave with `code`, on every rank: post it for the other ranks (or, with
    post=False, for a symptom such as a failed collective, only print it, unless another rank
    already posted the cause, which is printed instead). printer: only that rank prints the line,
    the others leave in silence; readers: how many ranks will read it (default all; fewer when
    some are known not to answer), rank 0 waits for them before leaving. Does not return."""
    channel = _channel
    if channel is not None:
        try:
            if post:
                message, code = channel.post(message, code, printer, readers)
            elif channel.store.check(["message"]):
                message, code = channel.read()
            else:
                channel = None
        except Exception:  # noqa: BLE001 - the store's host is gone: this rank's own line
            channel = None
    _exit(message, code, channel)


def claim_bad_input_report(message: str) -> bool:
    """Whether this process prints `message`, its bad-input line (exit 2): always, except under
    tinytron-torchrun once another process of this node has: every rank finds the same bad input,
    and the launcher shows the line once. The first process to create the launcher's file writes
    its line there, which also tells the launcher to exit 2 without torchrun's failure report."""
    path = os.environ.get(BAD_INPUT_FILE_ENV)
    if not path:
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    except OSError:   # the launcher's folder is gone: print, as without it
        return True
    with os.fdopen(fd, "w") as f:
        f.write(message.strip() + "\n")
    return True


def _exit(message: str | None, code: int, channel) -> None:
    """Run the before_exit callables, print the line (None: nothing; bad input: once per node under
    tinytron-torchrun), on rank 0 wait for the other ranks to read it, and leave without waiting
    on peers (no process-group teardown: they may be gone)."""
    _exit_lock.acquire()  # never released: a second failure (e.g. the watcher) waits for os._exit
    for fn in _before_exit:
        try:
            fn()
        except Exception:  # noqa: BLE001 - leaving anyway; the line below is what matters
            pass
    if message is not None and (code != 2 or claim_bad_input_report(message)):
        print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    if channel is not None and channel.host_may_be_here:
        try:
            channel.wait_until_read()
        except Exception:  # noqa: BLE001 - the store's host left first: nobody else to wait for
            pass
    os._exit(code)

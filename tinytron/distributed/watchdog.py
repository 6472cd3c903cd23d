"""Hang detection: a rank that stops making progress ends the job within minutes, with the Python
stacks of every live rank and one line naming the rank(s) that stopped.

A daemon thread per rank, talking to the job's store (like abort.py's, through a connection of
its own: one small request per step and one per second):

  - it publishes the rank's last completed step (`done/<rank>`) as soon as the step ends, so the
    ranks' progress is known without a collective or a host sync of the step;
  - once this process completed its first step (start-up, loading and compilation are bounded by
    --dist_timeout_minutes), it times each training step (`step()` around it): a step lasting
    `timeout` longer than the step before it is a hang. Only the step is timed: validation,
    --eval_tasks, saves and resume keep the process group's --dist_timeout_minutes;
  - on a hang seen by any rank (`hang` posted), it writes this process's Python stacks (all
    threads, faulthandler) to <folder>/rank<r>.txt and answers: its main thread's innermost frame
    and whether that frame waits on the peers (in torch.distributed, tinytron.distributed or one of
    the `wait_points` files).

The rank that posted `hang` waits ANSWER_SECONDS for the answers and ends the job through
abort.fail with one line, printed by itself (describe_hang). A rank that does not answer
(stopped, dead, or holding the GIL in C code) writes no stacks.

Why a thread rather than the process group's timeout: torch can shorten a group's timeout after
creation (torch.distributed.distributed_c10d._set_pg_timeout, private, gloo and NCCL), but a
timed-out collective raises only on the ranks that waited (gloo), or aborts the process from
NCCL's C++ watchdog with no Python stacks, and it would bound validation and saves too unless
raised around them. The thread works the same on gloo and NCCL, on every torch since 2.11.
"""

import faulthandler
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

from tinytron.distributed import abort

POLL_SECONDS = 1.0    # how often the thread looks at the clock and for a hang posted in the store
ANSWER_SECONDS = 3.0  # how long the rank that saw the hang waits for the others' stacks
STORE_TIMEOUT = timedelta(seconds=30)
# A main thread whose innermost frame is in one of these waits on its peers.
_WAITING = tuple(os.sep + os.path.join(*p) + os.sep for p in (("torch", "distributed"), ("tinytron", "distributed")))


class Watchdog:
    """Bounds this rank's training steps (see the module). world_size 1 or no MASTER_ADDR: only
    `step()`, a no-op. timeout_minutes: --step_timeout_minutes; hang_root: <run folder>/hangs;
    wait_points: more source files where the main thread waits on its peers (the step's
    statistics, whose .tolist() waits for the all-reduce on CUDA)."""

    def __init__(self, rank: int, world_size: int, timeout_minutes: float, hang_root: str,
                 wait_points: tuple[str, ...] = ()):
        self.rank, self.world_size = rank, world_size
        self.timeout_minutes = timeout_minutes
        self.hang_root, self.wait_points = hang_root, wait_points
        self.last_step = None    # the last step this process completed (main thread writes)
        self._started = None     # monotonic start of the step in progress, None between steps
        self._previous = 0.0     # seconds the last completed step took
        self._thread = None
        if world_size > 1 and "MASTER_ADDR" in os.environ:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=STORE_TIMEOUT)
            self.attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self.store = dist.PrefixStore(f"tinytron/watchdog/{self.attempt}", store)
            self._stopped = threading.Event()
            self._wake = threading.Event()   # set by step(): publish the new last step now
            self._thread = threading.Thread(target=self._watch, name="tinytron-watchdog", daemon=True)
            self._thread.start()

    @contextmanager
    def step(self, step: int):
        """Around training step `step` (0-based): times it; on exit it is this rank's last completed one."""
        start = self._started = time.monotonic()
        yield
        self._started = None
        self._previous = time.monotonic() - start
        self.last_step = step
        if self._thread is not None:
            self._wake.set()

    def close(self) -> None:
        """Stop and join the thread (before the process group goes)."""
        if self._thread is not None:
            self._stopped.set()
            self._wake.set()
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ the thread
    def _watch(self) -> None:
        published, poll = None, time.monotonic() + POLL_SECONDS
        while not self._stopped.is_set():
            self._wake.wait(max(0.0, poll - time.monotonic()))
            self._wake.clear()
            try:
                if self.last_step != published:   # at once: a rank stopped right after a step is named by it
                    published = self.last_step
                    self.store.set(f"done/{self.rank}", json.dumps(published))
            except Exception:  # noqa: BLE001 - the store did not answer: publish with the next step
                pass
            if time.monotonic() < poll:
                continue
            poll = time.monotonic() + POLL_SECONDS
            try:
                if self.store.check(["hang"]):
                    self._answer(self.store.get("hang").decode())
                    return   # abort.py's thread ends this process with the posted line
            except Exception:  # noqa: BLE001 - the store did not answer: look again, the clock still runs
                pass
            started = self._started
            if started is not None and self.last_step is not None:
                waited = time.monotonic() - started
                if waited > 60 * self.timeout_minutes + self._previous:
                    self._hang(waited)
                    return

    def _hang(self, waited: float) -> None:
        """This rank's step overran: post the hang (unless another rank did), collect the answers, end the job."""
        try:
            if self.store.add("declared", 1) > 1:   # another rank saw it first: answer it
                self._answer(self.store.get("hang").decode())
                return
            folder = _new_folder(os.path.join(self.hang_root, self.attempt))
            self.store.set("hang", folder)
            self._answer(folder)
            deadline = time.monotonic() + ANSWER_SECONDS
            while self.store.add("answered", 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(0.1)
            answers = {r: json.loads(self.store.get(f"answer/{r}")) for r in range(self.world_size)
                       if self.store.check([f"answer/{r}"])}
            done = {r: json.loads(self.store.get(f"done/{r}")) if self.store.check([f"done/{r}"]) else None
                    for r in range(self.world_size)}
        except Exception as e:  # noqa: BLE001 - the store's host (rank 0's process) does not answer
            folder = os.path.join(self.hang_root, self.attempt)   # each rank on its own: the same folder
            self._write_stacks(folder)
            # Both lines start on a line of their own: rank 0's progress bar may be open on the console.
            abort.fail(f"\n[tinytron] error: hang: rank {self.rank} waited {waited:.0f} s in step "
                       f"{self.last_step + 1} (--step_timeout_minutes {self.timeout_minutes}) and the job's store "
                       f"does not answer ({type(e).__name__}: rank 0, its host, stopped or died?); its Python "
                       f"stacks: {folder}", 1, post=False)
            return
        line = describe_hang(done, answers, self.world_size)
        abort.fail(f"\n[tinytron] error: hang: {line} (no step ended within --step_timeout_minutes "
                   f"{self.timeout_minutes} of the step before); Python stacks: {folder}/rank<r>.txt", 1,
                   printer=self.rank, readers=len(answers))


    def _answer(self, folder: str) -> None:
        where, waiting = self._write_stacks(folder)
        self.store.set(f"answer/{self.rank}", json.dumps({"where": where, "waiting": waiting}))
        self.store.add("answered", 1)

    def _write_stacks(self, folder: str) -> tuple[str, bool]:
        """All threads' Python stacks to <folder>/rank<r>.txt, after a line saying where the main
        thread is; -> (that place, whether it waits on the peers)."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        path = os.path.abspath(frame.f_code.co_filename) if frame else ""
        where = f"{os.path.basename(path)}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else "?"
        waiting = any(p in path for p in _WAITING) or path in map(os.path.abspath, self.wait_points)
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{self.rank}.txt"), "w") as f:
                f.write(f"rank {self.rank}: last completed step {self.last_step}; main thread "
                        f"{'waits on its peers' if waiting else 'runs'} at {where}\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
        except OSError as e:   # an unwritable run folder: the answer still names this rank
            print(f"[tinytron] rank {self.rank}: cannot write its stacks to {folder}: {e}", file=sys.stderr)
        return where, waiting


def _new_folder(path: str) -> str:
    """`path`, or `path`.1, .2, ... where an earlier launch of the run left that one."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def describe_hang(done: dict[int, int | None], answers: dict[int, dict], world_size: int) -> str:
    """The ranks that stopped making progress, by their last completed step, then those waiting on
    them. done: each rank's last completed step (None: none yet); answers: {rank: {"where", "waiting"}}
    of the ranks that answered. Stopped: the ranks that did not answer and those whose main thread
    does not wait on its peers; when every rank answered and waits, the ones behind in steps (a
    collective some ranks never called); when they are all at the same step, none is singled out."""
    silent = [r for r in range(world_size) if r not in answers]
    busy = [r for r, a in sorted(answers.items()) if not a["waiting"]]
    stopped = sorted(silent + busy)
    if not stopped:
        steps = {done[r] for r in range(world_size)}
        if len(steps) > 1 and None not in steps:
            stopped = [r for r in range(world_size) if done[r] == min(steps)]
    if not stopped:
        return (f"every rank waits on its peers {_after(done[0])} (collectives called in a different order "
                "on some ranks?)")
    groups = {}
    for r in stopped:
        why = ("does not answer: stopped, dead or holding the GIL" if r in silent else
               f"runs outside any collective at {answers[r]['where']}" if r in busy else "behind the others")
        groups.setdefault((done[r], why), []).append(r)
    parts = [f"{_ranks(rs)} stopped making progress {_after(step)} ({why})"
             for (step, why), rs in groups.items()]
    waiting = [r for r in range(world_size) if r not in stopped]
    return "; ".join(parts) + (f"; {_ranks(waiting)} wait{'s' if len(waiting) == 1 else ''} on "
                               f"{'it' if len(stopped) == 1 else 'them'}" if waiting else "")


def _after(step: int | None) -> str:
    return "in its first step" if step is None else f"after step {step}"


def _ranks(ranks: list[int]) -> str:
    """[0, 2, 3, 4, 7] -> "ranks 0, 2-4, 7"; [1] -> "rank 1"."""
    spans = []
    for r in ranks:
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"

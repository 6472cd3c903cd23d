"""--async_save: checkpoints written in the background, training blocked only while the state is
copied to host memory.

`AsyncSaver.save` copies the model, optimizer and RNG state of this rank into host memory (the
staging, into the same buffers at every save; the loop goes on once it is done; of the tensors
every rank holds whole, each rank copies only those it writes) and hands the copy to a thread, which writes the same
folder a synchronous save writes (checkpoint_save.write: DCP for the tensors, every rank its own
shards), agrees with the other ranks' threads that every write succeeded, and only then has rank 0
write COMPLETE and rename the folder: a crash during the background write leaves the previous
checkpoint the newest complete one. The threads' collectives run on a gloo process group of their
own (the training's collectives go on meanwhile on the others; on NCCL too, the background
exchanges only small plans and results between host buffers).

At most one save is in flight: the next save, a stop, the end of training (and so the exit) wait
for it first (`wait`). Why a thread of our own around DCP's save rather than dcp.async_save: its
default staging does not copy tensors that are already in host memory (a CPU run would write the
state the next steps change) and knows nothing of the Chunks of sharded_checkpoint.py, and its
future completes per rank, while COMPLETE must wait for every rank's write.
"""

import copy
import os
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tinytron.distributed.sharded_checkpoint import Chunk
from tinytron.training import checkpoint_save
from tinytron.training.checkpoint import rng_state, sharded_model_state, step_dir


def stage(value, cache: dict | None = None, key: str = ""):
    """A host-memory copy of a state value (sharded_checkpoint.py's kinds) that later steps do
    not change: tensors (a DTensor keeps its placement, its local shard copied), Chunks and lists
    of them; other objects deep-copied. `cache` ({key: host tensor}): the buffers of the previous
    save, reused when the shape and dtype match (no new allocation, no page faults, per save)."""
    if isinstance(value, DTensor):
        return DTensor.from_local(stage(value.to_local(), cache, key), value.device_mesh, value.placements,
                                  shape=value.shape, stride=value.stride(), run_check=False)
    if isinstance(value, torch.Tensor):
        old = None if cache is None else cache.get(key)
        if old is None or old.shape != value.shape or old.dtype != value.dtype:
            old = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda)
            if cache is not None:
                cache[key] = old
        return old.copy_(value.detach())
    if isinstance(value, Chunk):
        return Chunk(stage(value.tensor, cache, key), value.offsets, value.global_shape)
    if isinstance(value, list):
        return [stage(v, cache, f"{key}/{i}") for i, v in enumerate(value)]
    return copy.deepcopy(value)


def owned(sizes: dict[str, int], world_size: int, rank: int) -> set[str]:
    """The keys of the replicated tensors (every rank holds them whole: ZeRO-1's parameters) that
    `rank` stages and writes, each by one rank: largest first, to the rank with the fewest bytes
    so far (ties: the lowest rank), so every rank copies about 1/world_size of them. The same
    on every rank: `sizes` ({key: bytes}) is."""
    load, mine = [0] * world_size, set()
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = load.index(min(load))
        load[r] += sizes[key]
        if r == rank:
            mine.add(key)
    return mine


def own_model_state(state: dict) -> dict:
    """sharded_model_state without the replicated tensors other ranks write (DCP would write each
    once anyway: only their copy is saved)."""
    if not dist.is_initialized():
        return state
    plain = {k: v.nbytes for k, v in state.items() if type(v) is torch.Tensor}
    mine = owned(plain, dist.get_world_size(), dist.get_rank())
    return {k: v for k, v in state.items() if k not in plain or k in mine}


def staged_state(model, optimizer, cache: dict | None = None) -> tuple[dict, dict]:
    """Host copies of the model state this rank writes and of its optimizer state (stage)."""
    model_state = own_model_state(sharded_model_state(model))
    return ({k: stage(v, cache, f"model/{k}") for k, v in model_state.items()},
            {k: stage(v, cache, f"optimizer/{k}") for k, v in optimizer.checkpoint_state().items()})


class SyncSaver:
    """The Trainer's checkpoint writer without --async_save: `save` writes (collective)."""

    def __init__(self, console):
        self.console = console   # prints a line on rank 0

    def save(self, root: str, step: int, model, optimizer, meta: dict, keep_last_n: int = 0) -> str:
        """Write checkpoint `step` (checkpoint_save.save_checkpoint); -> its folder."""
        start = time.monotonic()
        path = checkpoint_save.save_checkpoint(root, step, model, optimizer, meta, keep_last_n)
        self.console(f"[tinytron] saved {path} ({time.monotonic() - start:.1f} s)")
        return path

    def wait(self) -> None:
        """Nothing is ever in flight."""


class AsyncSaver(SyncSaver):
    """Background checkpoint writes of one run. Construction is collective (the gloo group)."""

    def __init__(self, console):
        super().__init__(console)
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._thread = None
        self._outcome = None   # (folder, seconds) or the exception of the write in flight
        self._cache = {}       # the host buffers of the staged state, reused save after save

    def save(self, root: str, step: int, model, optimizer, meta: dict, keep_last_n: int = 0) -> str:
        """Wait for the save in flight, stage checkpoint `step` and start writing it; -> its
        folder (complete once `wait` returns). Collective."""
        self.wait()
        start = time.monotonic()
        final, tmp = step_dir(root, step), os.path.join(root, f".tmp_step_{step:08d}")
        checkpoint_save.prepare(root, final, tmp)
        args = (root, step, tmp, *staged_state(model, optimizer, self._cache), rng_state(), meta, keep_last_n,
                self.group)
        staged = time.monotonic()
        self._thread = threading.Thread(target=self._write, args=(args, staged), name="tinytron-async-save",
                                        daemon=True)
        self._thread.start()
        self.console(f"[tinytron] saving {final} in the background (staged in {staged - start:.1f} s)")
        return final

    def _write(self, args, start: float) -> None:
        try:
            self._outcome = (checkpoint_save.write(*args), time.monotonic() - start)
        except BaseException as e:  # noqa: BLE001 - raised in the training thread by wait()
            self._outcome = e

    def wait(self) -> None:
        """Wait for the save in flight, if any (collective: its threads agree on the outcome).
        Its failure is raised here (CheckpointWriteError: on every rank)."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread, outcome, self._outcome = None, self._outcome, None
        if isinstance(outcome, BaseException):
            raise outcome
        self.console(f"[tinytron] saved {outcome[0]} ({outcome[1]:.1f} s in the background)")

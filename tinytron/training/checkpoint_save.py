"""Writing a checkpoint folder (the layout is in checkpoint.py): every rank writes its shards
into `.tmp_step_<n>`, fsyncs them, and rank 0 marks the folder COMPLETE and renames it.

A write that fails with an operating-system error (no space left, permission denied, a vanished
mount) fails the save on every rank alike: after writing, the ranks share what failed (one small
gather per save, never per step), rank 0 removes the partial folder, and every rank raises the
same CheckpointWriteError, whose one line names the checkpoint and the OS reason; the
previous checkpoint stays the newest complete one.
"""

import contextlib
import errno
import glob
import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

from tinytron.distributed.sharded_checkpoint import save_state
from tinytron.training.checkpoint import (
    COMPLETE,
    _fsync,
    _rank,
    _world_group,
    find_latest,
    fsync_folders,
    list_complete,
    remove_checkpoint,
    rng_state,
    sharded_model_state,
    step_dir,
    step_of,
)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (an OS error); one-line message, the same on every rank."""


def _reason(e: Exception, folder: str) -> str:
    """The OS reason of a failed write into `folder`: the OSError's, else (torch's serializer
    reports a short write as a RuntimeError, "unexpected pos") the one a probe write finds."""
    if not isinstance(e, OSError):
        e = _probe(folder) or e
    if not isinstance(e, OSError):
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    return f"{e.strerror or e}{f' ({name})' if name else ''}"


def _probe(folder: str) -> OSError | None:
    """Write and fsync 64 KiB in `folder` (then remove it): the OSError it meets, or None."""
    path = os.path.join(folder, f".probe_rank{_rank()}")
    try:
        with open(path, "wb") as f:
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
    return None


def _failed(final: str, root: str, reason: str) -> CheckpointWriteError:
    newest = find_latest(root)
    return CheckpointWriteError(f"cannot write checkpoint {final}: {reason}; the partial folder was removed, the "
                                f"newest complete checkpoint is {newest or 'none (nothing saved yet)'}")


def agree_written(root: str, final: str, tmp: str, error: Exception | None, group=None) -> None:
    """Collective over `group` (the world's ranks; in place of a barrier): raise
    CheckpointWriteError on every rank if any rank's write failed (the lowest such rank's
    reason), once rank 0 has removed the partial folder."""
    failure = None if error is None else _reason(error, tmp)
    failures = [failure]
    if dist.is_initialized():
        failures = [None] * dist.get_world_size(group)
        dist.all_gather_object(failures, failure, group=group)
    failure = next((f for f in failures if f), None)
    if failure is not None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _failed(final, root, failure)


def prepare(root: str, final: str, tmp: str) -> None:
    """Rank 0 removes the leftovers of killed saves (whatever their step: one save at a time per
    run folder) and creates `tmp`. Collective over the world (the agreement)."""
    error = None
    try:
        if _rank() == 0:
            for leftover in glob.glob(os.path.join(root, ".tmp_step_*")):
                shutil.rmtree(leftover, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
    except OSError as e:
        error = e
    agree_written(root, final, tmp, error)


def write(root: str, step: int, tmp: str, model_state: dict, optimizer_state: dict, rng: dict, meta: dict,
          keep_last_n: int, group) -> str:
    """Write the states into `tmp` (each rank its own shards: model_state and optimizer_state as
    sharded_checkpoint.save_state takes them), fsync them, agree that every rank did, then rank 0
    marks it COMPLETE, renames it and drops the checkpoints beyond keep_last_n; -> the folder.
    Collective over `group` (the world's ranks; None without a process group)."""
    final, error = step_dir(root, step), None
    try:
        files = save_state(os.path.join(tmp, "model"), model_state, group)
        files += save_state(os.path.join(tmp, "optimizer"), optimizer_state, group)
        files.append(os.path.join(tmp, "rng", f"rank{_rank()}.pt"))
        torch.save(rng, files[-1])
        if _rank() == 0:
            files.append(os.path.join(tmp, "meta.pt"))
            torch.save(meta, files[-1])
        for path in files:
            _fsync(path)   # by the rank that wrote it: on a shared file system, from its node
    except (OSError, RuntimeError) as e:   # DCP hands a rank's failure to every rank of its collective
        error = e
    agree_written(root, final, tmp, error, group)   # every rank's files are on disk from here on
    if _rank() == 0:
        try:
            _complete(root, final, tmp, step)
        except OSError as e:   # rank 0 alone: the others learn it through abort.fail's post
            shutil.rmtree(tmp, ignore_errors=True)
            raise _failed(final, root, _reason(e, tmp)) from None
        if keep_last_n > 0:  # only now that the new one is complete; never the new one itself
            older = [d for d in list_complete(root) if step_of(d) < step]
            for old in older[:max(0, len(older) - (keep_last_n - 1))]:
                remove_checkpoint(old)
    if dist.is_initialized():
        dist.barrier(group)
    return final


def save_checkpoint(root: str, step: int, model: nn.Module, optimizer, meta: dict, keep_last_n: int = 0) -> str:
    """Write checkpoint `step` atomically and durably, straight from the live state. Collective:
    every rank calls it. keep_last_n > 0: then keep it and the newest keep_last_n - 1 older
    checkpoints, delete the rest (never the one just written). An OS error on any rank:
    CheckpointWriteError on every rank, nothing left behind."""
    tmp = os.path.join(root, f".tmp_step_{step:08d}")
    prepare(root, step_dir(root, step), tmp)
    return write(root, step, tmp, sharded_model_state(model), optimizer.checkpoint_state(), rng_state(), meta,
                 keep_last_n, _world_group())


def _complete(root: str, final: str, tmp: str, step: int) -> None:
    """Rank 0, once every rank's files are on disk: mark `tmp` COMPLETE and rename it `final`."""
    fsync_folders(tmp)  # every file and its name on disk before the marker says complete
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    if os.path.isdir(final):
        remove_checkpoint(final)
    os.rename(tmp, final)
    _fsync(root)  # the rename itself survives a power loss

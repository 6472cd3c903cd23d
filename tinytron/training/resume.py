"""Resuming a run: which checkpoint (rank 0 decides, every rank gets its choice), loading it on
every rank with a fallback to the previous complete one, and the branch it continues or starts
(see checkpoint.py's lineage)."""

import os
import sys
from dataclasses import dataclass

import torch.distributed as dist

from tinytron.training import checkpoint as ckpt
from tinytron.training.config import Config, ConfigError, resume_changes


@dataclass
class ResumePoint:
    path: str | None         # the checkpoint resumed (None: a fresh start)
    step: int                # optimizer steps done
    skipped_steps: int       # non-finite steps skipped so far
    wandb_id: str | None     # the W&B run to continue (None: a new one)
    branch: dict             # id, resume_path, skip_data_steps, start_step (checkpoint.py)
    data_offset: int         # data steps skipped on this branch's lineage (--skip_data_steps)
    rewind_to: int           # the logs keep only the steps before this one


def resume(config: Config, run_dir: str, model, optimizer, is_main: bool) -> ResumePoint:
    """Choose the checkpoint to resume, load it into `model` and `optimizer` (falling back to the
    previous complete one when unreadable, unless --resume_path named it), and continue its
    branch or start a new one: see checkpoint.plan_resume. A new branch moves the checkpoints it
    abandons aside. Collective: every rank calls it."""
    c = config.checkpoint
    root = os.path.join(run_dir, "checkpoints")
    plan, new_id = on_rank0(lambda: (ckpt.plan_resume(run_dir, c.resume_path, c.skip_data_steps),
                                     ckpt.new_branch_id()), is_main)
    # The optimizer's hyper-parameters as the flags set them; loading its state replaces them.
    from_flags = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    for path, new_branch in plan:
        meta = _load_agreed(config, path, model, optimizer, is_main, explicit=new_branch and bool(c.resume_path))
        if meta is not None:
            break
    else:
        if plan:
            raise ckpt.CheckpointError(f"no complete checkpoint in {root} can be read")
        path, new_branch, meta = None, True, {"step": 0}  # a fresh start
    for group, values in zip(optimizer.param_groups, from_flags):
        group.update(values)
    step = meta["step"]
    branch = meta.get("branch", {"id": "", "resume_path": "", "skip_data_steps": 0, "start_step": 0})
    data_offset = meta.get("data_offset", 0)
    if new_branch:
        key = ckpt.branch_key(c.resume_path, run_dir) or branch["resume_path"]
        branch = {"id": new_id, "resume_path": key, "skip_data_steps": c.skip_data_steps, "start_step": step}
        data_offset += c.skip_data_steps
    if is_main and path:
        later = ckpt.superseded(root, path)
        if later:
            dest = ckpt.move_aside(root, later, new_id)
            print(f"[tinytron] moved {len(later)} checkpoint(s) of the abandoned branch to {dest}", flush=True)
        print(f"[tinytron] resumed from {path} at step {step} (data step {step + data_offset}"
              f"{', new branch' if new_branch else ''})", flush=True)
    # Rewind the logs to the step resumed; to 0 for a fresh start (drop what an aborted attempt
    # logged) or another run's checkpoint (nothing before its step is this run's).
    rewind_to = step if path and ckpt.is_inside(path, run_dir) else 0
    return ResumePoint(path=path, step=step, skipped_steps=meta.get("skipped_steps", 0), wandb_id=meta.get("wandb_id"),
                       branch=branch, data_offset=data_offset, rewind_to=rewind_to)


def on_rank0(fn, is_main: bool):
    """fn() on rank 0 only, its result sent to every rank; a checkpoint, config or file-system
    error on rank 0 is raised on every rank (none waits for a broadcast that never comes)."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except (ConfigError, ckpt.CheckpointError, OSError) as e:
            error = str(e)
    if dist.is_initialized():
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise ckpt.CheckpointError(error)
    return result


def _first_error(error: str | None) -> str | None:
    """The first rank's error of a step every rank did, or None: so all ranks act alike."""
    if not dist.is_initialized():
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _load_agreed(config: Config, path: str, model, optimizer, is_main: bool, explicit: bool) -> dict | None:
    """Load checkpoint `path` on every rank; -> its meta, or None (a warning) when some rank
    cannot read it. explicit (--resume_path named it): an unreadable checkpoint is an error.
    A config that may not change is an error either way."""
    meta = error = None
    try:
        meta = ckpt.read_meta(path)
    except ckpt.CheckpointError as e:
        error = str(e)
    error = _first_error(error)
    if error is None:
        changes = resume_changes(meta.get("config", {}), config, path)
        try:
            ckpt.load_checkpoint(path, model, optimizer)
        except ckpt.CheckpointError as e:
            error = str(e)
        error = _first_error(error)
    if error is None:
        if is_main:
            for change in changes:
                print(f"[tinytron] resume: {change}", flush=True)
        return meta
    if explicit:
        raise ckpt.CheckpointError(error)
    if is_main:
        print(f"[tinytron] warning: {error}; falling back to the previous complete checkpoint", file=sys.stderr,
              flush=True)
    return None

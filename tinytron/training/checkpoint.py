"""Checkpoint folders: atomic, complete-or-absent, layout-independent.

    <run_dir>/checkpoints/step_00000100/
        model/         model state (all experts, fp32), sharded: torch.distributed.checkpoint
                       folder, each tensor written by one rank (see sharded_checkpoint.py)
        optimizer/     optimizer state keyed by parameter name, each rank writes its own ZeRO-1
                       shard (DistributedOptimizer.save)
        meta.pt        step, tokens seen, data position, branch, config, layout (rank 0)
        rng/rank{r}.pt RNG states of python, numpy, torch CPU and CUDA of rank r
        COMPLETE       written last: a folder without it is ignored
    <run_dir>/checkpoints/abandoned/<branch id>/step_*/
                       checkpoints moved aside by a rewind: kept, never resumed automatically

No rank gathers the full state: each writes its own shard, and reads back the ranges it holds in
its layout, whatever layout wrote them. An older checkpoint (model.pt: the full state dict;
optimizer/optimizer.pt: the gathered optimizer state) still loads.

A checkpoint is written into `.tmp_step_<n>`, fsynced, and renamed when complete, so a crash
mid-save (or a power loss after it) leaves the previous checkpoints intact and the half-written
one invisible (the next save removes it); a save that fails with an OS error (no space left,
permission denied) removes it at once and ends the run in one line (checkpoint_save.py).

Lineage: the checkpoints of a run folder form one branch of training. meta.pt records the branch
(`branch`: id, the --resume_path and --skip_data_steps that started it, its first step), so a
restart of the same command continues the branch from its newest checkpoint, and a new
--resume_path (a rewind, or a start from another run) starts a new branch, moving the checkpoints
it abandons aside (`plan_resume`, `move_aside`). This layer only handles folders, markers and
meta.pt; it does not depend on the format of the model and optimizer files.
"""

import glob
import os
import random
import shutil
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tinytron.distributed import parallel_state as ps
from tinytron.distributed.fsdp.apply import full_tensor, local_rows
from tinytron.distributed.sharded_checkpoint import Chunk, load_state, read_full_state, read_metadata

COMPLETE = "COMPLETE"
ABANDONED = "abandoned"
LEGACY_MODEL_FILE = "model.pt"


class CheckpointError(RuntimeError):
    """A missing, corrupt or incompatible checkpoint; one-line message."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def step_of(path: str) -> int:
    """The step of a checkpoint folder `.../step_<n>`."""
    return int(os.path.basename(os.path.normpath(path))[len("step_"):])


def list_complete(root: str) -> list[str]:
    """Complete checkpoint folders under root, oldest first."""
    dirs = sorted(glob.glob(os.path.join(root, "step_*")))
    return [d for d in dirs if os.path.isfile(os.path.join(d, COMPLETE))]


def find_latest(path: str) -> str | None:
    """`path` may be a checkpoint folder, a checkpoints root or a run folder; returns the newest
    complete checkpoint folder in it, or None."""
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = list_complete(root)
        if found:
            return found[-1]
    return None


def _expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if getattr(p, "is_expert", False)}


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on CPU with every expert: expert tensors (local slice [E/ep, ...] on
    each rank of the EP group) are all-gathered over the EP group and concatenated in rank order.
    Collective over the EP group when expert parallelism is on."""
    state = {k: full_tensor(v.detach()).cpu() for k, v in model.state_dict().items()}
    group, ep = ps.get_ep_group(), ps.get_ep_size()
    if ep > 1:
        for name, p in _expert_params(model).items():
            local = full_tensor(p.detach()).contiguous()   # with --fsdp: gathered over DP first
            parts = [torch.empty_like(local) for _ in range(ep)]
            dist.all_gather(parts, local, group=group)
            state[name] = torch.cat(parts).cpu()
    return state


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a full state dict into `model` in place (so parameters that are views into flat
    buffers stay views), keeping only this rank's experts. Shape mismatches raise CheckpointError."""
    own = model.state_dict()
    experts = _expert_params(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source} holds another model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    ep, ep_rank = ps.get_ep_size(), ps.get_ep_rank()
    with torch.no_grad():
        for name, target in own.items():
            value = state[name]
            if name in experts and ep > 1:
                n = target.shape[0]
                if value.shape[0] != n * ep:
                    raise CheckpointError(f"{source}: {name} has {value.shape[0]} experts, the model {n * ep}")
                value = value[ep_rank * n:(ep_rank + 1) * n]
            if value.shape != target.shape:
                raise CheckpointError(f"{source} holds a model of another shape: {name} is "
                                      f"{tuple(value.shape)} there, {tuple(target.shape)} here")
            target.copy_(value)


def sharded_model_state(model: nn.Module) -> dict:
    """{name: tensor} of the model for save_state / load_state: every tensor whole (the same on
    every rank: written by one), except expert tensors, which are the Chunk of the global (all
    experts) tensor that this expert-parallel rank holds. With --fsdp: DTensors (DCP writes and
    reads each rank's shard), experts the Chunk of this rank's rows of its expert-parallel rank's."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    ep = ps.get_ep_size()
    if ep > 1:
        for name, p in _expert_params(model).items():
            n = p.shape[0]
            local, start = local_rows(p.detach())
            state[name] = Chunk(local, (ps.get_ep_rank() * n + start,) + (0,) * (p.dim() - 1),
                                (ep * n, *p.shape[1:]))
    return state


def _world_group():
    return dist.group.WORLD if dist.is_initialized() else None


def load_sharded_model(directory: str, model: nn.Module, source: str) -> None:
    """Copy the model state saved in `directory` into `model` in place (views into flat buffers
    stay views), each rank reading only what it holds. Collective. Another model's folder (names,
    shapes) raises CheckpointError before anything is read."""
    state = sharded_model_state(model)
    saved = read_metadata(directory).state_dict_metadata
    missing, unexpected = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    if missing or unexpected:
        raise CheckpointError(f"{source} holds another model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, value in state.items():
        shape = value.global_shape if isinstance(value, Chunk) else tuple(value.shape)
        if tuple(saved[name].size) != tuple(shape):
            raise CheckpointError(f"{source} holds a model of another shape: {name} is "
                                  f"{tuple(saved[name].size)} there, {tuple(shape)} here")
    load_state(directory, state, _world_group())


def read_model_state(path: str) -> dict[str, torch.Tensor]:
    """The full model state dict (CPU, all experts) of checkpoint folder `path`, assembled in this
    process (no process group): for export and inspection. Reads the older model.pt too."""
    legacy = os.path.join(path, LEGACY_MODEL_FILE)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    return read_full_state(os.path.join(path, "model"))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": [v.tolist() if isinstance(v, np.ndarray) else v
                                                      for v in np.random.get_state()],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({type(e).__name__})") from None


def _fsync(path: str) -> None:
    """Flush a file's or a folder's (its entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folders(path: str) -> None:
    """fsync path and every folder under it (their entries: the names of the files in them)."""
    for folder, _, _ in os.walk(path):
        _fsync(folder)


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint folder: its COMPLETE marker first (made durable), so a crash during
    the deletion leaves an ignored folder, never a "complete" checkpoint with files missing."""
    marker = os.path.join(path, COMPLETE)
    if os.path.exists(marker):
        os.remove(marker)
        _fsync(path)
    shutil.rmtree(path, ignore_errors=True)


def new_branch_id() -> str:
    """A branch id that sorts by creation time: UTC timestamp + random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def move_aside(root: str, paths: list[str], branch_id: str) -> str:
    """Move checkpoint folders into root/abandoned/<branch_id>/ (kept for inspection; auto-resume
    never looks there); -> that folder. Each rename is atomic and made durable."""
    dest = os.path.join(root, ABANDONED, branch_id)
    os.makedirs(dest, exist_ok=True)
    for path in paths:
        os.rename(path, os.path.join(dest, os.path.basename(path)))
    _fsync(dest)
    _fsync(root)
    return dest


def superseded(root: str, path: str) -> list[str]:
    """The complete checkpoints of `root` that resuming checkpoint `path` abandons: the later
    ones, or all of them when `path` is not one of root's (another run's, or an abandoned one)."""
    own = list_complete(root)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(root):
        return own
    return [d for d in own if step_of(d) > step_of(path)]


def _read_payload(path: str, model: nn.Module, optimizer) -> None:
    """Load the model and optimizer state of checkpoint folder `path` (either format).
    Collective. Unreadable or foreign files raise CheckpointError."""
    legacy = os.path.join(path, LEGACY_MODEL_FILE)
    model_dir = os.path.join(path, "model")
    if os.path.isfile(legacy):
        if any(hasattr(p, "device_mesh") for p in model.parameters()):   # --fsdp: DTensor shards
            raise CheckpointError(f"{path} holds the older, gathered format (model.pt), which loads without "
                                  "--fsdp only: resume it once without --fsdp, then go on with --fsdp")
        load_full_model_state_dict(model, _load(legacy), path)
    else:
        try:
            load_sharded_model(model_dir, model, path)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - as in _load
            raise CheckpointError(f"model state in {model_dir} is corrupt or unreadable "
                                  f"({type(e).__name__})") from None
    optimizer_dir = os.path.join(path, "optimizer")
    try:
        optimizer.load(optimizer_dir)
    except Exception as e:  # noqa: BLE001 - as in _load; ValueError: another model's parameter names
        raise CheckpointError(f"optimizer state in {optimizer_dir} is corrupt, unreadable or of another "
                              f"model ({type(e).__name__})") from None


def read_meta(path: str) -> dict:
    """meta.pt of a checkpoint folder; CheckpointError if unreadable."""
    return _load(os.path.join(path, "meta.pt"))


def branch_key(resume_path: str, run_dir: str) -> str:
    """--resume_path as recorded in the branch it starts ("" for none): relative to the run
    folder when inside it (so a moved run folder keeps its lineage), else absolute."""
    if not resume_path:
        return ""
    path, run = os.path.realpath(resume_path), os.path.realpath(run_dir)
    return os.path.relpath(path, run) if path == run or is_inside(path, run) else path


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` lies under `folder` (after resolving links)."""
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def plan_resume(run_dir: str, resume_path: str, skip_data_steps: int) -> list[tuple[str, bool]]:
    """The checkpoints to try, in order (the first readable one is resumed), each with whether
    resuming it starts a new branch. [] means a fresh start. Rank 0 decides (see resume.py).

    The run's branch is the one of its newest checkpoint with a readable meta.pt. The command
    continues that branch when its --resume_path is empty or the one that started the branch,
    and its --skip_data_steps is the branch's: newest first, falling back to older ones of the
    branch (then to --resume_path itself). Otherwise it starts a new branch: from --resume_path
    when given (an explicit choice: no fallback), else from the newest checkpoint (only
    --skip_data_steps changed)."""
    own = list_complete(os.path.join(run_dir, "checkpoints"))[::-1]  # newest first
    key = branch_key(resume_path, run_dir)
    branch = None
    for path in own:
        try:
            branch = read_meta(path).get("branch", {})
            break
        except CheckpointError:
            continue
    start = find_latest(resume_path) if resume_path and os.path.exists(resume_path) else None
    if branch is not None and (not key or branch.get("resume_path", "") == key) \
            and branch.get("skip_data_steps", 0) == skip_data_steps:
        if not key:
            return [(path, False) for path in own]
        first = branch.get("start_step", 0)
        return [(path, False) for path in own if step_of(path) > first] + ([(start, True)] if start else [])
    if key:
        if not os.path.exists(resume_path):
            raise CheckpointError(f"--resume_path {resume_path} does not exist")
        if start is None:
            raise CheckpointError(f"--resume_path {resume_path} holds no complete checkpoint")
        return [(start, True)]
    return [(path, True) for path in own]


def load_checkpoint(path: str, model: nn.Module, optimizer) -> dict:
    """Load model, optimizer and this rank's RNG state from a complete checkpoint folder; return
    its meta. RNG states are restored only when the world size is the one that saved them."""
    meta = read_meta(path)
    _read_payload(path, model, optimizer)
    rng_file = os.path.join(path, "rng", f"rank{_rank()}.pt")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta.get("world_size") == world and os.path.isfile(rng_file):
        set_rng_state(_load(rng_file))
    return meta

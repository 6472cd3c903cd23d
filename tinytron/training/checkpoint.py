"""Checkpoint folders: atomic, complete-or-absent, layout-independent.

    <run_dir>/checkpoints/step_00000100/
        model/         model state (all experts, fp32), sharded: torch.distributed.checkpoint
                       folder, each tensor written by one rank (see sharded_checkpoint.py)
        optimizer/     optimizer state keyed by parameter name, each rank writes its own ZeRO-1
                       shard (DistributedOptimizer.save)
        meta.pt        step, tokens seen, data position, config, layout (rank 0)
        rng/rank{r}.pt RNG states of python, numpy, torch CPU and CUDA of rank r
        COMPLETE       written last: a folder without it is ignored

No rank gathers the full state: each writes its own shard, and reads back the ranges it holds in
its layout, whatever layout wrote them. An older checkpoint (model.pt: the full state dict;
optimizer/optimizer.pt: the gathered optimizer state) still loads.

A checkpoint is written into `.tmp_step_<n>` and renamed when complete, so a crash mid-save
leaves the previous checkpoints intact and the half-written one invisible (the next save
removes it).
"""

import dataclasses
import glob
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tinytron.distributed import parallel_state as ps
from tinytron.distributed.sharded_checkpoint import (Chunk, load_state, read_full_state,
                                                     read_metadata, save_state)

COMPLETE = "COMPLETE"
LEGACY_MODEL_FILE = "model.pt"
# Model fields that may change on resume without changing any tensor shape or meaning.
_RESUMABLE_MODEL_FIELDS = {"dropout", "block_size", "moe_aux_loss_coeff", "moe_z_loss_coeff"}


class CheckpointError(RuntimeError):
    """A missing, corrupt or incompatible checkpoint; one-line message."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


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
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    group, ep = ps.get_ep_group(), ps.get_ep_size()
    if ep > 1:
        for name, p in _expert_params(model).items():
            parts = [torch.empty_like(p.data) for _ in range(ep)]
            dist.all_gather(parts, p.data.contiguous(), group=group)
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
    experts) tensor that this expert-parallel rank holds."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    ep = ps.get_ep_size()
    if ep > 1:
        for name, p in _expert_params(model).items():
            n = p.shape[0]
            state[name] = Chunk(p.data, (ps.get_ep_rank() * n,) + (0,) * (p.dim() - 1),
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


def _write_payload(tmp: str, model: nn.Module, optimizer) -> list[str]:
    """Write the model, optimizer and RNG state into checkpoint folder `tmp`, each rank its own
    shard; return the files this rank wrote. Collective."""
    files = save_state(os.path.join(tmp, "model"), sharded_model_state(model), _world_group())
    files += optimizer.save(os.path.join(tmp, "optimizer"))
    rng_file = os.path.join(tmp, "rng", f"rank{_rank()}.pt")
    torch.save(rng_state(), rng_file)
    return files + [rng_file]


def _read_payload(path: str, model: nn.Module, optimizer) -> None:
    """Load the model and optimizer state of checkpoint folder `path` (either format).
    Collective. Unreadable or foreign files raise CheckpointError."""
    legacy = os.path.join(path, LEGACY_MODEL_FILE)
    model_dir = os.path.join(path, "model")
    if os.path.isfile(legacy):
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


def save_checkpoint(root: str, step: int, model: nn.Module, optimizer, meta: dict,
                    keep_last_n: int = 0) -> str:
    """Write checkpoint `step` atomically. Collective: every rank calls it."""
    final, tmp = step_dir(root, step), os.path.join(root, f".tmp_step_{step:08d}")
    rank = _rank()
    if rank == 0:
        # Leftovers of killed saves, whatever their step (one save at a time per run folder).
        for leftover in glob.glob(os.path.join(root, ".tmp_step_*")):
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier()
    _write_payload(tmp, model, optimizer)
    _barrier()
    if rank == 0:
        torch.save(meta, os.path.join(tmp, "meta.pt"))
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        if keep_last_n > 0:  # only now that the new one is complete
            for old in list_complete(root)[:-keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str, model: nn.Module, optimizer, model_config=None) -> dict:
    """Load model, optimizer and this rank's RNG state from a complete checkpoint folder; return
    its meta. RNG states are restored only when the world size is the one that saved them.
    With `model_config` (a dataclass), a checkpoint of another architecture is refused first."""
    meta = _load(os.path.join(path, "meta.pt"))
    if model_config is not None:
        saved = meta.get("config", {}).get("model", {})
        for name, value in dataclasses.asdict(model_config).items():
            if name in saved and saved[name] != value and name not in _RESUMABLE_MODEL_FIELDS:
                raise CheckpointError(f"{path} holds a checkpoint of another model: "
                                      f"{name} {saved[name]} there, {value} here")
    _read_payload(path, model, optimizer)
    rng_file = os.path.join(path, "rng", f"rank{_rank()}.pt")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta.get("world_size") == world and os.path.isfile(rng_file):
        set_rng_state(_load(rng_file))
    return meta

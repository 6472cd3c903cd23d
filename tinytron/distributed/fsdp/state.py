"""FSDP optimizer state in ZeRO-1's checkpoint layout (zero1/optimizer_state.py), so a folder saved
by either engine loads into the other at any world size or --sep_size:
    "elem/<name>/<key>"   per-element state (AdamW's exp_avg, exp_avg_sq; Muon's momentum_buffer),
                          flattened: a 1-D tensor of the parameter's global numel (experts: all
                          of them, global index)
    "param/<name>/<key>"  per-parameter state ('step'), whole
    "param_groups", "shapes"   hyper-parameters with parameter names; {name: global shape}
A rank's dim-0 shard of a parameter (rows [a, b) of a [rows, ...] tensor, expert rows shifted by
this expert-parallel rank's first expert) is one contiguous flat range, written and read as one
Chunk: no rank gathers anything. A Muon matrix (muon.py) is whole on its owner, which writes and
reads its momentum as one Chunk at the matrix's global offset (several, for several experts).
"""

import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from tinytron.distributed.fsdp.apply import local_rows
from tinytron.distributed.sharded_checkpoint import Chunk, load_state, read_metadata, save_state
from tinytron.distributed.zero1.optimizer_state import (
    CHECKPOINT_FILE,
    check_same_groups,
    saved_param_groups,
    split_key,
)


def _expert_parallel(opt, p: nn.Parameter) -> tuple[int, int]:
    """(size, rank) of the expert-parallel group for an expert param, (1, 0) for a dense one."""
    group = opt.expert_parallel_group
    if not getattr(p, "is_expert", False) or group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def global_shape(opt, p: nn.Parameter) -> tuple[int, ...]:
    ep, _ = _expert_parallel(opt, p)
    return (ep * p.shape[0], *p.shape[1:])


def flat_chunk(opt, p: nn.Parameter, local: torch.Tensor, start_row: int) -> Chunk:
    """`local` (rows from `start_row` of param p's local, this expert-parallel rank's tensor) as
    a chunk of p's global flattened state."""
    ep, ep_rank = _expert_parallel(opt, p)
    row = math.prod(p.shape[1:])   # from the shape: indexing a DTensor (p[0]) is a collective
    offset = (ep_rank * p.shape[0] + start_row) * row if p.dim() else 0
    return Chunk(local.reshape(-1), (offset,), (ep * p.numel(),))


def _per_element(value, p: nn.Parameter) -> bool:
    return isinstance(value, DTensor) and value.shape == p.shape


def _stepped(opt) -> list[tuple[torch.Tensor, nn.Parameter, int | None]]:
    """(what the wrapped optimizer steps, its model param, the matrix's first dim-0 row or None),
    in param-group order: each param's DTensor itself (None), or (Muon, muon.py) the whole
    matrices this rank owns."""
    matrix = opt._whole.stepped
    return [(q, matrix[q].param, matrix[q].first) if q in matrix else (q, q, None)
            for g in opt.param_groups for q in g["params"]]


def save(opt, directory: str) -> list[str]:
    """See FSDPOptimizer.save."""
    return save_state(directory, checkpoint_state(opt), opt.process_group)


def checkpoint_state(opt) -> dict:
    """What save() writes. A Muon matrix's momentum is one chunk, written by its owner."""
    state = {"param_groups": saved_param_groups(opt.optimizer, opt._group_names),
             "shapes": {opt._names[p]: global_shape(opt, p) for p in opt._params}}
    for q, p, first in _stepped(opt):
        for key, value in opt.optimizer.state.get(q, {}).items():
            name = opt._names[p]
            if first is not None and torch.is_tensor(value) and value.shape == p.shape[-2:]:
                state.setdefault(f"elem/{name}/{key}", []).append(flat_chunk(opt, p, value, first))
            elif first is None and _per_element(value, p):
                local, start = local_rows(value)
                if local.numel():   # a rank may hold no rows of a small tensor
                    state[f"elem/{name}/{key}"] = flat_chunk(opt, p, local, start)
            else:
                state[f"param/{name}/{key}"] = value
    return state


def load(opt, directory: str) -> None:
    """See FSDPOptimizer.load: each rank reads the flat ranges of its own shards."""
    if os.path.isfile(os.path.join(directory, CHECKPOINT_FILE)):
        raise ValueError(f"{directory} holds the older, gathered optimizer.pt format, which loads "
                         "without --fsdp only")
    saved = {}   # name -> [(kind, key, DCP key, metadata)]
    for dcp_key, md in read_metadata(directory).state_dict_metadata.items():
        kind, name, key = split_key(dcp_key)
        saved.setdefault(name, []).append((kind, key, dcp_key, md))
    targets, values = {"param_groups": None}, {}
    for q, p, first in _stepped(opt):
        for kind, key, dcp_key, md in saved.get(opt._names[p], []):
            if kind == "elem" and first is not None:   # an owned Muon matrix: its [m, n] chunk
                value = torch.empty(p.shape[-2:], dtype=md.properties.dtype, device=p.device)
                targets.setdefault(dcp_key, []).append(flat_chunk(opt, p, value, first))
            elif kind == "elem":
                value = torch.zeros_like(p, dtype=md.properties.dtype)   # a DTensor sharded like p
                local, start = local_rows(value)
                if local.numel():
                    targets[dcp_key] = flat_chunk(opt, p, local, start)   # read into its shard
            elif kind == "param":
                value = (torch.empty(md.size, dtype=md.properties.dtype)
                         if isinstance(md, TensorStorageMetadata) else None)
                targets[dcp_key] = value
            else:
                continue
            values.setdefault(q, {})[key] = (kind, dcp_key, value)
    load_state(directory, targets, opt.process_group)
    saved_groups = targets["param_groups"]
    check_same_groups(saved_groups, opt._group_names)
    # Re-expressed as the wrapped optimizer's own state_dict (params numbered in group order), so
    # that its load_state_dict does the casting and checks it always does.
    state, groups, index = {}, [], 0
    for group, saved_group in zip(opt.param_groups, saved_groups):
        ids = []
        for p in group["params"]:
            if p in values:
                state[index] = {k: v if kind == "elem" else targets[dcp_key]
                                for k, (kind, dcp_key, v) in values[p].items()}
            ids.append(index)
            index += 1
        groups.append(dict({k: v for k, v in saved_group.items() if k != "params"}, params=ids))
    opt.optimizer.load_state_dict({"state": state, "param_groups": groups})


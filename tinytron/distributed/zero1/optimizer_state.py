"""The optimizer state of a DistributedOptimizer, independent of the layout that holds it: the
full state dict (state_dict / load_state_dict) and sharded checkpoints (save / load, through
torch.distributed.checkpoint), so a state saved at one world size, bucket size, expert-parallel
size or shard setting loads at any other.

Format of state_dict(): {"state": {name: {key: value}}, "param_groups": [{hyper-parameters...,
"params": [names]}]}. A state tensor shaped like the (piece of the) parameter it belongs to, with
at least one dim, is per-element (AdamW's exp_avg, exp_avg_sq) and is saved with the parameter's
full shape (expert params: all experts, global index); anything else (AdamW's 'step') is
per-parameter and saved as is.
"""

import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tinytron.distributed.sharded_checkpoint import Chunk, load_state, read_full_state, read_metadata, save_state
from tinytron.distributed.zero1.grad_buffer import FlatBuffer, all_gather, group_rank, group_size

CHECKPOINT_FILE = "optimizer.pt"   # the older format: the full state, gathered (see load())


class OptimizerStateMixin:
    """The state methods of DistributedOptimizer (a mixin: they read its buffers, `_owner`,
    `_names`, `_group_names` and the wrapped `optimizer`)."""

    def state_dict(self) -> dict:
        """The full optimizer state, tensors on CPU, on every rank. Collective over every group
        (all ranks call it)."""
        ep = self._expert_parallel_size()
        state = {}
        for buf in self._buffers:
            full = self._full_local_state(buf)
            if buf in self._expert_buffers and ep > 1:
                self._concat_experts(buf, full)
            for p, st in full.items():
                state[self._names[p]] = {k: v.detach().to("cpu", copy=True)
                                         if torch.is_tensor(v) else v for k, v in st.items()}
        return {"state": state, "param_groups": self._saved_param_groups()}

    def _saved_param_groups(self) -> list[dict]:
        return saved_param_groups(self.optimizer, self._group_names)

    def _expert_parallel_size(self) -> int:
        """How many ranks hold different experts: process_group = expert group x this."""
        ep = group_size(self.expert_parallel_group)
        if any(buf.size * ep != group_size(self.process_group) for buf in self._expert_buffers):
            raise ValueError("expert params differ across process_group ranks outside the "
                             "expert_process_group: saving or loading their optimizer state needs "
                             "the expert_parallel_group")
        return ep

    def _full_local_state(self, buf: FlatBuffer) -> dict[nn.Parameter, dict]:
        """param -> its state with per-element tensors of the param's local shape, for every
        param of buf that has state. Collective over buf.group when buf is sharded."""
        by_param, state = self._stepped_by_param(), self.optimizer.state
        stepped = {p: qs[0][0] for p, qs in by_param.items()}   # one of p's stepped tensors
        if not buf.sharded:
            return {p: _whole_state(p, [q for q, _ in by_param[p]], state)
                    for p in buf.offsets if stepped[p] in state}

        # Which keys each param has (per-element: their dtype; else: the value), merged over the
        # group: a param's pieces, and so its state, may live on several ranks.
        local = {}
        for p in buf.offsets:
            q = stepped.get(p)
            for k, v in state.get(q, {}).items():
                if _per_element(v, q):
                    v = v.dtype
                elif torch.is_tensor(v):
                    v = v.detach().cpu()   # e.g. a 'step' on the GPU: pickled below
                local.setdefault(p, {})[k] = v
        gathered = [None] * buf.size
        dist.all_gather_object(gathered, {self._names[p]: st for p, st in local.items()},
                               group=buf.group)
        merged = {}
        for rank_state in gathered:
            for name, st in rank_state.items():
                merged.setdefault(name, {}).update(st)
        full = {p: {k: v for k, v in merged[self._names[p]].items()
                    if not isinstance(v, torch.dtype)}
                for p in buf.offsets if self._names[p] in merged}
        per_element = sorted({(k, v) for st in merged.values() for k, v in st.items()
                              if isinstance(v, torch.dtype)}, key=str)

        # Per-element state: fill this rank's shard of each bucket, all-gather the bucket.
        for key, dtype in per_element:
            for b, ((start, end), members) in enumerate(zip(buf.buckets, buf.bucket_params)):
                lo, hi = buf.shard_range((start, end))
                shard = torch.zeros(hi - lo, dtype=dtype, device=buf.param_data.device)
                for p in members:
                    for q, q_start in by_param.get(p, []):
                        if key in state.get(q, {}):
                            p_lo = buf.offsets[p] + q_start
                            shard[p_lo - lo:p_lo - lo + q.numel()] = state[q][key].reshape(-1)
                # At most one bucket of gathered state on the device at a time.
                bucket = buf.gather_bucket(b, shard).cpu()
                for p in members:
                    if _is_dtype(merged.get(self._names[p], {}).get(key), dtype):
                        o = buf.offsets[p] - start
                        full[p][key] = bucket[o:o + p.numel()].view_as(p)
        return full

    def _concat_experts(self, buf: FlatBuffer, full: dict[nn.Parameter, dict]) -> None:
        """Replace each per-element expert state tensor [E_local, ...] by the concatenation over
        expert_parallel_group, [E_local * ep, ...] (global expert index). Collective."""
        ep = group_size(self.expert_parallel_group)
        for p in buf.offsets:
            for k in sorted(full.get(p, {}), key=str):
                v = full[p][k]
                if _per_element(v, p):
                    out = torch.empty((ep * p.shape[0], *p.shape[1:]), dtype=v.dtype,
                                      device=v.device)
                    all_gather(out, v.contiguous(), self.expert_parallel_group)
                    full[p][k] = out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from state_dict() of a run at any world size / bucket size / shard
        setting (every rank passes the full state; no communication). Raises ValueError if its
        param groups do not hold the same parameter names as this optimizer's."""
        ep = self._expert_parallel_size()

        def local_state(q, p, start):
            saved = state_dict["state"].get(self._names[p])
            p_ep = ep if getattr(p, "is_expert", False) else 1
            return None if saved is None else {k: self._local_value(v, p, q, start, p_ep)
                                               for k, v in saved.items()}
        self._load_local_state(state_dict["param_groups"], local_state)

    def _load_local_state(self, saved_groups: list[dict], local_state) -> None:
        """Hand the wrapped optimizer saved hyper-parameters and, for each stepped tensor q (the
        piece of param p from flat element `start`), local_state(q, p, start): its state, or None.
        Re-expressed as the wrapped optimizer's own state_dict (params numbered in group order)
        so that its load_state_dict does the casting and checks it always does."""
        check_same_groups(saved_groups, self._group_names)
        state, groups, index = {}, [], 0
        for group, saved in zip(self.optimizer.param_groups, saved_groups):
            ids = []
            for q in group["params"]:
                st = local_state(q, *self._owner[q])
                if st is not None:
                    state[index] = st
                ids.append(index)
                index += 1
            groups.append(dict({k: v for k, v in saved.items() if k != "params"}, params=ids))
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _local_value(self, value, p: nn.Parameter, q: nn.Parameter, start: int, ep: int):
        """This rank's part of one saved state value of param p, for the stepped tensor q (p
        itself, or the piece of flattened p from `start`); ep > 1: p holds chunk
        rank(expert_parallel_group) of ep along dim 0. Always a fresh tensor: the optimizer
        updates its state in place."""
        if not torch.is_tensor(value):
            return value
        shape = torch.Size((ep * p.shape[0], *p.shape[1:])) if ep > 1 else p.shape
        if value.dim() == 0 or value.shape != shape:
            return value.clone()
        if ep > 1:
            value = value.chunk(ep)[group_rank(self.expert_parallel_group)]
        return value.reshape(-1)[start:start + q.numel()].view_as(q).clone()

    # ---- Sharded checkpoints (torch.distributed.checkpoint) ------------------------------------
    #
    # Keys of a save() folder (see sharded_checkpoint.py), nothing in them depends on the layout:
    #   "elem/<name>/<key>"   per-element state, flattened: a 1-D tensor of the parameter's
    #                         global numel (expert params: all experts, global index first); each
    #                         rank writes the flat ranges of its shard pieces, and reads back the
    #                         ranges of its new pieces, whatever the layout that wrote them
    #   "param/<name>/<key>"  per-parameter state ('step'), whole
    #   "param_groups"        hyper-parameters and parameter names, as in state_dict()
    #   "shapes"              {name: global shape}, to unflatten in read_state_dict()
    # Replicated values (per-parameter state, unsharded buffers, experts' state on their DP
    # replicas) are written once, by one of the ranks holding them.

    def _flat_chunk(self, p: nn.Parameter, start: int, tensor: torch.Tensor) -> Chunk:
        """`tensor`, the piece of flattened p from local element `start`, as a chunk of p's
        global (all experts) flattened state."""
        ep, n = 1, p.numel()
        if getattr(p, "is_expert", False):
            ep = self._expert_parallel_size()
            start += group_rank(self.expert_parallel_group) * n if ep > 1 else 0
        return Chunk(tensor.reshape(-1), (start,), (ep * n,))

    def _global_shape(self, p: nn.Parameter) -> tuple[int, ...]:
        ep = self._expert_parallel_size() if getattr(p, "is_expert", False) else 1
        return (ep * p.shape[0], *p.shape[1:]) if ep > 1 else tuple(p.shape)

    def _stepped_by_param(self) -> dict[nn.Parameter, list[tuple[nn.Parameter, int]]]:
        """param -> [(stepped tensor, its flat start in the param)] on this rank, in flat order:
        one shard piece (or the param itself), or the 2-D matrices of a whole_matrices param."""
        out = {}
        for q, (p, start) in self._owner.items():
            out.setdefault(p, []).append((q, start))
        return out

    def save(self, directory: str) -> list[str]:
        """Collective over process_group: every rank writes its own shard of the state into the
        folder, straight from the state tensors (no gather, no copy of the state; GPU tensors are
        copied to host memory as they are written). Returns the paths of the files this rank
        wrote, fsynced."""
        return save_state(directory, self.checkpoint_state(), self.process_group)

    def checkpoint_state(self) -> dict:
        """What save() writes (sharded_checkpoint.py's state: Chunks of this rank's shard, views
        of the live state tensors, and small objects), for a writer of its own (async saves)."""
        state = {"param_groups": self._saved_param_groups(),   # the same on every rank
                 "shapes": {self._names[p]: self._global_shape(p)
                            for buf in self._buffers for p in buf.offsets}}
        for p, qs in self._stepped_by_param().items():
            st, start = self.optimizer.state.get(qs[0][0], {}), qs[0][1]
            for k, v in st.items():
                if _per_element(v, qs[0][0]):   # a param's matrices (whole_matrices): one chunk
                    v = v if len(qs) == 1 else torch.cat([self.optimizer.state[q][k].reshape(-1) for q, _ in qs])
                    state[f"elem/{self._names[p]}/{k}"] = self._flat_chunk(p, start, v)
                else:
                    state[f"param/{self._names[p]}/{k}"] = v
        return state

    def load(self, directory: str) -> None:
        """Collective over process_group: load a folder written by save() at any world size /
        bucket size / expert-parallel size / shard setting; each rank reads only the ranges of
        its own shard. A folder of the older format (one optimizer.pt with the full state) is
        read whole by every rank."""
        legacy = os.path.join(directory, CHECKPOINT_FILE)
        if os.path.isfile(legacy):
            self.load_state_dict(torch.load(legacy, map_location="cpu", weights_only=True, mmap=True))
            return
        saved = {}   # name -> [(kind, key, DCP key, its metadata)]
        for dcp_key, md in read_metadata(directory).state_dict_metadata.items():
            kind, name, key = split_key(dcp_key)
            saved.setdefault(name, []).append((kind, key, dcp_key, md))
        targets, keys_of, by_param = {"param_groups": None}, {}, self._stepped_by_param()
        for p, qs in by_param.items():
            start, numel = qs[0][1], sum(q.numel() for q, _ in qs)
            for kind, key, dcp_key, md in saved.get(self._names[p], []):
                if kind == "elem":   # read straight into this rank's piece: no full tensor
                    piece = torch.empty(numel, dtype=md.properties.dtype, device=qs[0][0].device)
                    targets[dcp_key] = self._flat_chunk(p, start, piece)
                elif kind == "param":
                    targets[dcp_key] = (torch.empty(md.size, dtype=md.properties.dtype)
                                        if isinstance(md, TensorStorageMetadata) else None)
                keys_of.setdefault(p, {})[key] = dcp_key
        load_state(directory, targets, self.process_group)

        def local_state(q, p, start):
            if p not in keys_of:
                return None
            first = by_param[p][0][1]
            values = {k: targets[dcp_key] for k, dcp_key in keys_of[p].items()}
            return {k: v.tensor[start - first:start - first + q.numel()].view_as(q) if isinstance(v, Chunk)
                    else v for k, v in values.items()}
        self._load_local_state(targets["param_groups"], local_state)


def saved_param_groups(optimizer: torch.optim.Optimizer, group_names: list[list[str]]) -> list[dict]:
    """Each param group's hyper-parameters, with its parameters' names (group_names) as 'params':
    the "param_groups" of a saved state, whatever the engine."""
    return [dict(copy.deepcopy({k: v for k, v in g.items() if k not in ("params", "param_names")}),
                 params=names) for g, names in zip(optimizer.param_groups, group_names)]


def check_same_groups(saved_groups: list[dict], group_names: list[list[str]]) -> None:
    """ValueError unless the saved param groups hold the same parameter names, group by group,
    as an optimizer whose groups hold `group_names` (whatever the engine)."""
    if [set(g["params"]) for g in saved_groups] != [set(n) for n in group_names]:
        raise ValueError("optimizer state's param groups do not hold the same parameter names "
                         "as this optimizer's")


def read_state_dict(directory: str) -> dict:
    """The state_dict() (full tensors) of the optimizer that saved `directory`, assembled in this
    process alone (no process group): for inspection, conversion and tests."""
    legacy = os.path.join(directory, CHECKPOINT_FILE)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    saved = read_full_state(directory)
    state = {}
    for dcp_key, value in saved.items():
        kind, name, key = split_key(dcp_key)
        if kind == "elem":
            value = value.view(saved["shapes"][name])
        if kind in ("elem", "param"):
            state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def split_key(dcp_key: str) -> tuple[str, str, str]:
    """"elem/<name>/<key>" -> ("elem", name, key); "shapes" -> ("shapes", "", "")."""
    kind, _, rest = dcp_key.partition("/")
    name, _, key = rest.rpartition("/")
    return kind, name, key


def _whole_state(p: nn.Parameter, stepped: list[nn.Parameter], state) -> dict:
    """The state of param p from that of the tensors stepped for it, in flat order: p itself, or
    (whole_matrices) each of its 2-D matrices, whose per-element tensors are concatenated."""
    if len(stepped) == 1 and stepped[0] is p:
        return dict(state[p])
    return {k: torch.cat([state[q][k].reshape(-1) for q in stepped]).view_as(p) if _per_element(v, stepped[0])
            else v for k, v in state[stepped[0]].items()}


def _per_element(value, stepped: nn.Parameter) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == stepped.shape


def _is_dtype(value, dtype: torch.dtype) -> bool:
    return isinstance(value, torch.dtype) and value == dtype

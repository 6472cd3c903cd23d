"""ZeRO-1 (Rajbhandari et al., arXiv 1910.02054, stage 1): every rank keeps the optimizer state of
only its 1/N shard of the parameters.

One optimizer step, N = size of the group a parameter is reduced over:

    backward(s)        grads accumulate in place into a flat grad buffer (see grad_buffer.py)
    reduce_gradients   reduce-scatter (SUM) each bucket: rank r gets the summed grads of shard r;
                       multiply by grad_scale (e.g. 1/dp: mean over data-parallel replicas)
    clip_grad_norm     global norm from each rank's shard, ONE scalar all-reduce, scale the shard
    step               the wrapped optimizer updates only this rank's shard of the params
                       (its state exists only for that shard), then all-gather each bucket

Overlap (both on by default; the same collectives on the same buffers, only launched earlier, so
the numbers are bitwise those of the non-overlapped path):
  overlap_grad_reduce   inside `with micro_step(last=True)`, the last micro-step's backward, a
                        post-accumulate-grad hook launches each bucket's reduce-scatter as soon as
                        every grad in it is final; reduce_gradients only waits for them.
  overlap_param_gather  step() launches the all-gathers without waiting; a forward pre-hook on
                        each top-level block of `model` waits for the buckets holding its params
                        just before it runs; finish_param_gather() waits for all of them.
Buckets are packed in reverse model order (the order backward finishes grads) and launched in one
fixed order, the same on every rank, so each process group sees its collectives in the same order.

A reduce-scatter plus an all-gather move the same bytes as the all-reduce of plain data
parallelism, so sharding the state costs no extra communication. With shard=False the same
buffers are all-reduced and every rank steps every parameter (plain data parallelism, no torch
DDP).

Two kinds of parameters (the `is_expert` attribute tells them apart):
  dense  - the same on every rank: reduced and sharded over `process_group` (the whole world,
           dp x sep ranks);
  expert - stacked MoE expert weights, different on each expert-parallel (SEP) rank: reduced and
           sharded over `expert_process_group` (the DP group), whose replicas hold the same experts.

The wrapped optimizer is any torch optimizer that updates each element from that element's
gradient and state alone (AdamW, SGD, Adam, Lion...): it is handed 1-D shard pieces. Optimizers
that need a parameter's shape (Muon, Shampoo, Adafactor) must use shard=False.
"""

import contextlib
import copy
import functools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tinytron.distributed.sharded_checkpoint import (Chunk, load_state, read_full_state,
                                                     read_metadata, save_state)
from tinytron.distributed.zero1.grad_buffer import (FlatBuffer, Pending, all_gather, group_rank,
                                                    group_size)

CHECKPOINT_FILE = "optimizer.pt"   # the older format: the full state, gathered (see load())


class DistributedOptimizer:
    """Wraps an already-constructed torch optimizer; see the module docstring.

    Args:
        optimizer: its param groups (and their hyper-parameters) are kept; each group's params are
            replaced by this rank's shard pieces (1-D nn.Parameter views into the flat param
            buffer, `.grad` a view into the flat grad buffer), and its state is cleared.
        process_group: the group dense params are reduced and sharded over (the trainer passes the
            world). None (or a group of size 1): no communication at all.
        expert_process_group: the group `is_expert` params are reduced and sharded over (the DP
            group); a subgroup of process_group. Default: process_group.
        expert_parallel_group: the group across which expert params differ (the SEP group); the
            full expert tensor is the concatenation, along dim 0 in rank order, of the local ones.
            Used only to save and load optimizer state. Default: none (all experts local).
        grad_scale: reduced grads are multiplied by it. Default 1 / size(process_group).
        shard: False = plain data parallelism (all-reduce, full optimizer state on every rank).
        bucket_size_mb: most bytes per collective (a bigger parameter gets a bucket of its own).
        param_names: {param: name} or an iterable of (name, param) such as
            model.named_parameters(); names key the saved state, and their order is taken as the
            model's (buckets are packed in reverse). Default: the optimizer's own 'param_names',
            else "<group>.<index>".
        model: the module whose forward uses the params; needed to overlap the param all-gather
            (forward pre-hooks on its top-level blocks: its children, ModuleLists expanded, and
            itself for its own params). A block must not use another block's params before that
            block has run. None: step() waits for its all-gathers.
        overlap_grad_reduce, overlap_param_gather: see the module docstring; False launches each
            collective only when reduce_gradients / step is called and waits for it there.

    Construction is collective over process_group. Construct after the model is on its final
    device and dtype: the model's params become views into the flat buffers.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, process_group=None, *,
                 expert_process_group=None, expert_parallel_group=None,
                 grad_scale: float | None = None, shard: bool = True,
                 bucket_size_mb: float = 40.0, param_names=None, model: nn.Module | None = None,
                 overlap_grad_reduce: bool = True, overlap_param_gather: bool = True):
        if process_group is None and (expert_process_group is not None
                                      or expert_parallel_group is not None):
            raise ValueError("expert process groups were given without a process_group")
        for label, group in (("process_group", process_group),
                             ("expert_process_group", expert_process_group),
                             ("expert_parallel_group", expert_parallel_group)):
            if group is not None and group_rank(group) < 0:
                raise ValueError(f"this rank (global rank {dist.get_rank()}) is not a member of "
                                 f"the {label}")
        if expert_process_group is None:
            expert_process_group = process_group
        elif not (set(dist.get_process_group_ranks(expert_process_group))
                  <= set(dist.get_process_group_ranks(process_group))):
            raise ValueError("expert_process_group has ranks outside process_group")
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb {bucket_size_mb} must be positive")

        self.optimizer = optimizer
        self.process_group = process_group
        self.expert_parallel_group = expert_parallel_group
        self.grad_scale = 1.0 / group_size(process_group) if grad_scale is None else grad_scale
        self._names = _resolve_names(optimizer, param_names)
        params = list(dict.fromkeys(p for g in optimizer.param_groups for p in g["params"]))
        for p in params:
            if p not in self._names:
                raise ValueError(f"optimizer parameter of shape {tuple(p.shape)} is not among the "
                                 "named parameters")
            if not p.requires_grad:
                raise ValueError(f"optimizer parameter {self._names[p]} has requires_grad=False")
        # Reverse model order: backward finishes the last layers' grads first.
        self._backward_rank = {p: -i for i, p in enumerate(self._names)}
        params.sort(key=self._backward_rank.get)
        self._check_same_layout(params, shard, bucket_size_mb)

        self._buffers: list[FlatBuffer] = []
        self._expert_buffer: FlatBuffer | None = None
        buffer_of: dict[nn.Parameter, FlatBuffer] = {}
        for is_expert, group in ((False, process_group), (True, expert_process_group)):
            members = [p for p in params if getattr(p, "is_expert", False) == is_expert]
            if not members:
                continue
            bucket_numel = max(1, int(bucket_size_mb * 2**20) // members[0].element_size())
            buf = FlatBuffer(members, group, bucket_numel, shard)
            if buf.size > 1:   # replicas start identical, as with torch DDP
                dist.broadcast(buf.param_data, src=dist.get_global_rank(group, 0), group=group)
            self._buffers.append(buf)
            buffer_of.update(dict.fromkeys(members, buf))
            if is_expert:
                self._expert_buffer = buf

        # Hand the optimizer, group by group, what this rank updates: the shard piece of each
        # param of a sharded buffer (if it has one), else the param itself.
        self._group_names = [[self._names[p] for p in g["params"]] for g in optimizer.param_groups]
        self._owner: dict[nn.Parameter, tuple[nn.Parameter, int]] = {}  # stepped -> (param, start)
        pieces = {p: rng for buf in self._buffers if buf.sharded
                  for p, rng in buf.local_pieces().items()}
        for group in optimizer.param_groups:
            stepped = []
            for p in group["params"]:
                buf = buffer_of[p]
                if not buf.sharded:
                    self._owner[p] = (p, 0)
                    stepped.append(p)
                elif p in pieces:
                    lo, hi = pieces[p]
                    piece = nn.Parameter(buf.param_data[lo:hi])
                    piece.grad = buf.grad_data[lo:hi]
                    self._owner[piece] = (p, lo - buf.offsets[p])
                    stepped.append(piece)
            group["params"] = stepped
            if "param_names" in group:
                group["param_names"] = [self._names[self._owner[q][0]] for q in stepped]
        optimizer.state.clear()
        self._init_overlap(model, overlap_grad_reduce, overlap_param_gather)

    def _init_overlap(self, model, overlap_grad_reduce: bool, overlap_param_gather: bool) -> None:
        """The launch order of the buckets of all buffers (slots), and the hooks that launch and
        wait for their collectives."""
        # A bucket's grads are final when its last-packed param's are (packing is reverse model
        # order): launching in that order sends the first ready first, the same order on every rank.
        self._slots = sorted(((buf, b) for buf in self._buffers for b in range(len(buf.buckets))),
                             key=lambda s: self._backward_rank[s[0].bucket_params[s[1]][-1]])
        self._slot_of = {p: i for i, (buf, b) in enumerate(self._slots)
                         for p in buf.bucket_params[b]}
        self._reducing: list[Pending] = []   # launched reductions, slot order
        self._unready: list[set] = []        # per slot: params whose grads are not final yet
        self._armed = False                  # inside the last micro-step's backward
        self._gathering: dict[int, object] = {}   # slot -> its all-gather's Work, in flight
        self._overlap_grad = overlap_grad_reduce and any(buf.size > 1 for buf in self._buffers)
        if self._overlap_grad:
            for p in self._slot_of:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._overlap_param = (overlap_param_gather and model is not None
                               and any(buf.sharded for buf in self._buffers))
        if self._overlap_param:
            for block, block_params in _blocks(model):
                slots = sorted({self._slot_of[p] for p in block_params if p in self._slot_of})
                if slots:
                    block.register_forward_pre_hook(functools.partial(self._wait_for_gathers,
                                                                      slots))

    def _check_same_layout(self, params, shard, bucket_size_mb) -> None:
        """Every rank of process_group must build the same buffers, or the bucket collectives
        would silently mix unrelated elements."""
        if group_size(self.process_group) == 1:
            return
        layout = ([(self._names[p], tuple(p.shape), p.dtype, getattr(p, "is_expert", False))
                   for p in params], shard, bucket_size_mb)
        layouts = [None] * group_size(self.process_group)
        dist.all_gather_object(layouts, layout, group=self.process_group)
        for rank, other in enumerate(layouts):
            if other != layout:
                raise ValueError(f"ranks of process_group disagree on the parameters or buffer "
                                 f"options: group rank {rank} differs from group rank "
                                 f"{group_rank(self.process_group)}")

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's param groups (set 'lr' here, e.g. from a schedule)."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        """Zero the flat grad buffers (grads stay views into them; never set to None)."""
        for buf in self._buffers:
            buf.zero_grad()

    @contextlib.contextmanager
    def micro_step(self, last: bool):
        """Wrap each micro-step's backward. In the last one (last=True, with overlap_grad_reduce)
        each bucket's reduction is launched as soon as every grad in it is final (and every
        bucket before it in the launch order has been launched); buckets still waiting when the
        backward returns (a param that got no grad in it) are launched then. Earlier micro-steps
        launch nothing: their grads are not final."""
        if not (last and self._overlap_grad):
            yield
            return
        self._unready = [set(buf.bucket_params[b]) for buf, b in self._slots]
        self._armed = True
        try:
            yield
        finally:
            self._armed = False
        self._launch_reductions(len(self._slots))

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        """Post-accumulate-grad hook: p's grad of this backward is accumulated."""
        if not self._armed:
            return
        slot = self._slot_of[p]
        if slot < len(self._reducing):
            raise RuntimeError(f"the grad of {self._names[p]} was accumulated after its bucket's "
                               "reduction was launched: run one backward per micro_step()")
        self._unready[slot].discard(p)
        ready = len(self._reducing)
        while ready < len(self._slots) and not self._unready[ready]:
            ready += 1
        self._launch_reductions(ready)

    def _launch_reductions(self, until: int) -> None:
        """Launch the reductions of the slots not launched yet, up to slot `until` (excluded)."""
        for buf, b in self._slots[len(self._reducing):until]:
            self._reducing.append(buf.start_grad_reduce(b, self.grad_scale))

    def reduce_gradients(self) -> None:
        """Once per optimizer step, after the last micro-step's backward: sum grads over each
        buffer's group (reduce-scatter, or all-reduce when not sharded), times grad_scale. Waits
        for the reductions launched during the backward and launches the others. After it, only
        this rank's shard of a sharded buffer's grads is meaningful."""
        self._launch_reductions(len(self._slots))
        for pending in self._reducing:
            pending.wait()
        self._reducing = []

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """After reduce_gradients. Returns the global L2 norm of the reduced grads (before
        clipping) as a 0-dim fp32 tensor on the grads' device, the same on every rank of
        process_group, and, if max_norm > 0, scales the grads by min(1, max_norm / (norm + 1e-6))
        (as torch.nn.utils.clip_grad_norm_), without a host sync.

        Each rank sums the squares of its shard of every bucket. Dense shards partition the dense
        grads over process_group; expert shards partition one expert-parallel rank's experts over
        its DP group, and different expert-parallel ranks hold different experts; so one all-reduce
        over process_group counts every gradient element exactly once (also with shard=False,
        where the full grads are replicated but each rank still contributes only its shard).
        """
        views = [v for buf in self._buffers for v in buf.norm_grad_views()]
        sq = torch.stack([torch.linalg.vector_norm(v, dtype=torch.float32) for v in views])
        sq = sq.square().sum()
        if group_size(self.process_group) > 1:
            dist.all_reduce(sq, group=self.process_group)
        norm = sq.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for buf in self._buffers:
                for g in buf.step_grad_views():
                    g.mul_(coef.to(g.dtype))
        return norm

    def step(self) -> None:
        """Update this rank's shard (or all params when not sharded), then all-gather the params:
        launched in forward order (the reverse of the reduction order), waited for by the next
        forward's block pre-hooks with overlap_param_gather, else here."""
        self.finish_param_gather()   # an unused param's gather may still read the shard we update
        self.optimizer.step()
        for slot in reversed(range(len(self._slots))):
            buf, b = self._slots[slot]
            work = buf.start_param_gather(b)
            if work is not None:
                self._gathering[slot] = work
        if not self._overlap_param:
            self.finish_param_gather()

    def finish_param_gather(self) -> None:
        """Wait for every param all-gather in flight. Call before reading the params other than
        in a forward of `model` (a checkpoint save, an evaluation, an export)."""
        self._wait_for_gathers(sorted(self._gathering))

    @torch.compiler.disable   # a compiled block runs its pre-hooks: keep this wait out of graphs
    def _wait_for_gathers(self, slots: list[int], module=None, args=None) -> None:
        """Wait for the all-gathers of `slots` still in flight (also a forward pre-hook)."""
        if self._gathering:
            for slot in slots:
                work = self._gathering.pop(slot, None)
                if work is not None:
                    work.wait()

    # ---- Layout-independent state -------------------------------------------------------------
    #
    # Format: {"state": {name: {key: value}}, "param_groups": [{hyper-parameters...,
    # "params": [names]}]}. A state tensor shaped like the (piece of the) parameter it belongs to,
    # with at least one dim, is per-element (AdamW's exp_avg, exp_avg_sq) and is saved with the
    # parameter's full shape (expert params: all experts, global index); anything else (AdamW's
    # 'step') is per-parameter and saved as is. Nothing in it depends on N or the buckets, so a
    # state saved at one world size loads at any other.

    def state_dict(self) -> dict:
        """The full optimizer state, tensors on CPU, on every rank. Collective over every group
        (all ranks call it)."""
        ep = self._expert_parallel_size()
        state = {}
        for buf in self._buffers:
            full = self._full_local_state(buf)
            if buf is self._expert_buffer and ep > 1:
                self._concat_experts(full)
            for p, st in full.items():
                state[self._names[p]] = {k: v.detach().to("cpu", copy=True)
                                         if torch.is_tensor(v) else v for k, v in st.items()}
        return {"state": state, "param_groups": self._saved_param_groups()}

    def _saved_param_groups(self) -> list[dict]:
        """Each group's hyper-parameters, with its parameters' names as 'params'."""
        return [dict(copy.deepcopy({k: v for k, v in g.items()
                                    if k not in ("params", "param_names")}), params=names)
                for g, names in zip(self.optimizer.param_groups, self._group_names)]

    def _expert_parallel_size(self) -> int:
        """How many ranks hold different experts: process_group = expert group x this."""
        ep = group_size(self.expert_parallel_group)
        if (self._expert_buffer is not None
                and self._expert_buffer.size * ep != group_size(self.process_group)):
            raise ValueError("expert params differ across process_group ranks outside the "
                             "expert_process_group: saving or loading their optimizer state needs "
                             "the expert_parallel_group")
        return ep

    def _full_local_state(self, buf: FlatBuffer) -> dict[nn.Parameter, dict]:
        """param -> its state with per-element tensors of the param's local shape, for every
        param of buf that has state. Collective over buf.group when buf is sharded."""
        stepped = {p: q for q, (p, _) in self._owner.items()}
        state = self.optimizer.state
        if not buf.sharded:
            return {p: dict(state[stepped[p]]) for p in buf.offsets if stepped[p] in state}

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
            for (start, end), members in zip(buf.buckets, buf.bucket_params):
                lo, hi = buf.shard_range((start, end))
                shard = torch.zeros(hi - lo, dtype=dtype, device=buf.param_data.device)
                for p in members:
                    q = stepped.get(p)
                    if q is not None and key in state.get(q, {}):
                        p_lo = buf.offsets[p] + self._owner[q][1]
                        shard[p_lo - lo:p_lo - lo + q.numel()] = state[q][key]
                bucket = torch.empty((end - start), dtype=dtype, device=shard.device)
                all_gather(bucket, shard, buf.group)
                bucket = bucket.cpu()  # at most one bucket of gathered state on the device at a time
                for p in members:
                    if _is_dtype(merged.get(self._names[p], {}).get(key), dtype):
                        o = buf.offsets[p] - start
                        full[p][key] = bucket[o:o + p.numel()].view_as(p)
        return full

    def _concat_experts(self, full: dict[nn.Parameter, dict]) -> None:
        """Replace each per-element expert state tensor [E_local, ...] by the concatenation over
        expert_parallel_group, [E_local * ep, ...] (global expert index). Collective."""
        ep = group_size(self.expert_parallel_group)
        for p in self._expert_buffer.offsets:
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
        if [set(g["params"]) for g in saved_groups] != [set(n) for n in self._group_names]:
            raise ValueError("optimizer state's param groups do not hold the same parameter names "
                             "as this optimizer's")
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

    def save(self, directory: str) -> list[str]:
        """Collective over process_group: every rank writes its own shard of the state into the
        folder, straight from the state tensors (no gather, no copy of the state; GPU tensors are
        copied to host memory as they are written). Returns the paths of the files this rank
        wrote, fsynced."""
        state = {"param_groups": self._saved_param_groups(),   # the same on every rank
                 "shapes": {self._names[p]: self._global_shape(p)
                            for buf in self._buffers for p in buf.offsets}}
        for q, st in self.optimizer.state.items():
            p, start = self._owner[q]
            for k, v in st.items():
                if _per_element(v, q):
                    state[f"elem/{self._names[p]}/{k}"] = self._flat_chunk(p, start, v)
                else:
                    state[f"param/{self._names[p]}/{k}"] = v
        return save_state(directory, state, self.process_group)

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
            kind, name, key = _split_key(dcp_key)
            saved.setdefault(name, []).append((kind, key, dcp_key, md))
        targets, keys_of = {"param_groups": None}, {}
        for q, (p, start) in self._owner.items():
            for kind, key, dcp_key, md in saved.get(self._names[p], []):
                if kind == "elem":   # read straight into this rank's piece: no full tensor
                    piece = torch.empty(q.numel(), dtype=md.properties.dtype, device=q.device)
                    targets[dcp_key] = self._flat_chunk(p, start, piece)
                elif kind == "param":
                    targets[dcp_key] = (torch.empty(md.size, dtype=md.properties.dtype)
                                        if isinstance(md, TensorStorageMetadata) else None)
                keys_of.setdefault(q, {})[key] = dcp_key
        load_state(directory, targets, self.process_group)

        def local_state(q, p, start):
            if q not in keys_of:
                return None
            values = {k: targets[dcp_key] for k, dcp_key in keys_of[q].items()}
            return {k: v.tensor.view_as(q) if isinstance(v, Chunk) else v for k, v in values.items()}
        self._load_local_state(targets["param_groups"], local_state)


def read_state_dict(directory: str) -> dict:
    """The state_dict() (full tensors) of the optimizer that saved `directory`, assembled in this
    process alone (no process group): for inspection, conversion and tests."""
    legacy = os.path.join(directory, CHECKPOINT_FILE)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    saved = read_full_state(directory)
    state = {}
    for dcp_key, value in saved.items():
        kind, name, key = _split_key(dcp_key)
        if kind == "elem":
            value = value.view(saved["shapes"][name])
        if kind in ("elem", "param"):
            state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def _split_key(dcp_key: str) -> tuple[str, str, str]:
    """"elem/<name>/<key>" -> ("elem", name, key); "shapes" -> ("shapes", "", "")."""
    kind, _, rest = dcp_key.partition("/")
    name, _, key = rest.rpartition("/")
    return kind, name, key


def _blocks(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(block, the params it holds, its submodules' included) for each top-level block of model:
    its children, ModuleList/ModuleDict containers (they have no forward) expanded; and (model,
    its own params)."""
    blocks, todo = [(model, list(model.parameters(recurse=False)))], list(model.children())
    while todo:
        module = todo.pop(0)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            todo[:0] = module.children()
        else:
            blocks.append((module, list(module.parameters())))
    return blocks


def _per_element(value, stepped: nn.Parameter) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == stepped.shape


def _is_dtype(value, dtype: torch.dtype) -> bool:
    return isinstance(value, torch.dtype) and value == dtype


def _resolve_names(optimizer: torch.optim.Optimizer, param_names) -> dict[nn.Parameter, str]:
    if param_names is None:
        if all("param_names" in g for g in optimizer.param_groups):
            return {p: n for g in optimizer.param_groups
                    for p, n in zip(g["params"], g["param_names"])}
        return {p: f"{gi}.{pi}" for gi, g in enumerate(optimizer.param_groups)
                for pi, p in enumerate(g["params"])}
    items = param_names.items() if isinstance(param_names, dict) else \
        ((p, n) for n, p in param_names)
    names: dict[nn.Parameter, str] = {}
    for p, n in items:
        names.setdefault(p, n)   # a tied param listed twice keeps its first name
    return names

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
gradient and state alone (AdamW, SGD, Adam, Lion...): it is handed 1-D shard pieces. A param group
marked "whole_matrices" (Muon's) is handed whole 2-D matrices instead: each of its params is owned
by one rank, which steps it from its full reduced gradient (whole_matrices.py).
"""

import contextlib
import functools
import weakref

import torch
import torch.distributed as dist
from torch import nn

from tinytron.distributed import parallel_state as ps
from tinytron.distributed.zero1.grad_buffer import FlatBuffer, Pending, group_rank, group_size
from tinytron.distributed.zero1.optimizer_state import OptimizerStateMixin
from tinytron.distributed.zero1.whole_matrices import matrices, owner_layout

# process_group's default: the topology of parallel_state (see DistributedOptimizer).
FROM_PARALLEL_STATE = "parallel_state"


class DistributedOptimizer(OptimizerStateMixin):
    """Wraps an already-constructed torch optimizer; see the module docstring.

    Args:
        optimizer: its param groups (and their hyper-parameters) are kept; each group's params are
            replaced by this rank's shard pieces (1-D nn.Parameter views into the flat param
            buffer, `.grad` a view into the flat grad buffer; in a group with "whole_matrices":
            2-D views of the matrices this rank owns), and its state is cleared.
        model: the module whose forward uses the params. Its params are REBOUND: `p.data` becomes
            a view into the flat param buffer and `p.grad` one into the flat grad buffer (see
            grad_buffer.py), and `model.zero_grad()` (of it and of every submodule) zeroes grads
            in place, keeping those views. Also used to overlap the param all-gather (forward
            pre-hooks on its top-level blocks: its children, ModuleLists expanded, and itself for
            its own params; a block must not use another block's params before that block has
            run) and, without param_names, to name the params. None: step() waits for its
            all-gathers, and model.zero_grad() must not be called (it would un-bind the grads).
        shard: False = plain data parallelism (all-reduce, full optimizer state on every rank).
        bucket_size_mb: most bytes per collective (a bigger parameter gets a bucket of its own).
        overlap_grad_reduce, overlap_param_gather: see the module docstring; False launches each
            collective only when reduce_gradients / step is called and waits for it there.
        param_names: {param: name} or an iterable of (name, param) such as
            model.named_parameters(); names key the saved state, and their order is taken as the
            model's (buckets are packed in reverse). Default: model.named_parameters(), else the
            optimizer's own 'param_names', else "<group>.<index>".
    The reduction topology, by default that of parallel_state (`FROM_PARALLEL_STATE`): dense
    params over the world, expert params over the DP group, expert-parallel over the SEP group,
    grads averaged over DP; no communication without a process group. Tests and tools may pass
    their own groups instead:
        process_group: the group dense params are reduced and sharded over. None (or a group of
            size 1): no communication at all.
        expert_process_group: the group `is_expert` params are reduced and sharded over (the DP
            group); a subgroup of process_group. Default: process_group.
        expert_parallel_group: the group across which expert params differ (the SEP group); the
            full expert tensor is the concatenation, along dim 0 in rank order, of the local ones.
            Used only to save and load optimizer state. Default: none (all experts local).
        grad_scale: reduced grads are multiplied by it. Default 1 / size(expert_process_group)
            (1 / dp: the mean over data-parallel replicas).

    Construction is collective over process_group. Construct after the model is on its final
    device and dtype.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None, *,
                 shard: bool = True, bucket_size_mb: float = 40.0,
                 overlap_grad_reduce: bool = True, overlap_param_gather: bool = True,
                 param_names=None, process_group=FROM_PARALLEL_STATE, expert_process_group=None,
                 expert_parallel_group=None, grad_scale: float | None = None):
        process_group, expert_process_group, expert_parallel_group = _reduction_groups(
            process_group, expert_process_group, expert_parallel_group)
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb {bucket_size_mb} must be positive")
        if param_names is None and model is not None:
            param_names = model.named_parameters()

        self.optimizer = optimizer
        self.process_group = process_group
        self.expert_parallel_group = expert_parallel_group
        self.grad_scale = 1.0 / group_size(expert_process_group) if grad_scale is None else grad_scale
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
        self._expert_buffers: list[FlatBuffer] = []
        buffer_of: dict[nn.Parameter, FlatBuffer] = {}
        whole = {p for g in optimizer.param_groups if g.get("whole_matrices") for p in g["params"]}
        for is_expert, group in ((False, process_group), (True, expert_process_group)):
            for is_whole in (False, True):   # element-wise shards; whole matrices (whole_matrices.py)
                members = [p for p in params if getattr(p, "is_expert", False) == is_expert
                           and (p in whole) == is_whole]
                if not members:
                    continue
                bucket_numel = max(1, int(bucket_size_mb * 2**20) // members[0].element_size())
                buf = FlatBuffer(members, group, bucket_numel, shard, owner_layout if is_whole and shard else None)
                if buf.size > 1:   # replicas start identical, as with torch DDP
                    dist.broadcast(buf.param_data, src=dist.get_global_rank(group, 0), group=group)
                self._buffers.append(buf)
                buffer_of.update(dict.fromkeys(members, buf))
                if is_expert:
                    self._expert_buffers.append(buf)

        # Hand the optimizer, group by group, what this rank updates: the shard piece of each
        # param of a sharded buffer (if it has one), else the param itself; in a whole_matrices
        # group, the 2-D matrices of each param this rank owns (or of every param, unsharded).
        self._group_names = [[self._names[p] for p in g["params"]] for g in optimizer.param_groups]
        self._owner: dict[nn.Parameter, tuple[nn.Parameter, int]] = {}  # stepped -> (param, start)
        pieces = {p: rng for buf in self._buffers if buf.sharded
                  for p, rng in buf.local_pieces().items()}
        for group in optimizer.param_groups:
            stepped = []
            for p in group["params"]:
                buf = buffer_of[p]
                if p in whole and (p in pieces or not buf.sharded):
                    for view, grad, start in matrices(buf.param_data, buf.grad_data, buf.offsets[p], p.shape):
                        stepped.append(nn.Parameter(view))
                        stepped[-1].grad = grad
                        self._owner[stepped[-1]] = (p, start)
                elif not buf.sharded:
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
        if model is not None:
            for module in model.modules():
                module.zero_grad = functools.partial(_zero_grad_in_place, module)

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
            # Weakly: tensor hooks live on the C++ side, unseen by the garbage collector; a strong
            # one would keep this optimizer (params, grads, state) alive once its Trainer is dropped.
            method = weakref.WeakMethod(self._on_grad_ready)

            def on_grad_ready(p: nn.Parameter) -> None:
                if (live := method()) is not None:   # None: this optimizer was dropped
                    live(p)
            for p in self._slot_of:
                p.register_post_accumulate_grad_hook(on_grad_ready)
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


def _reduction_groups(process_group, expert_process_group, expert_parallel_group):
    """-> (process_group, expert_process_group, expert_parallel_group), checked: the given ones, or
    parallel_state's for FROM_PARALLEL_STATE (the world, the DP group, the SEP group)."""
    if process_group == FROM_PARALLEL_STATE:
        if expert_process_group is not None or expert_parallel_group is not None:
            raise ValueError("expert process groups were given without a process_group")
        if not dist.is_initialized():
            return None, None, None
        process_group, expert_process_group = dist.group.WORLD, ps.get_dp_group()
        expert_parallel_group = ps.get_ep_group()
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
    return process_group, expert_process_group, expert_parallel_group


def _zero_grad_in_place(module: nn.Module, set_to_none: bool = True) -> None:
    """`module.zero_grad()` of a model wrapped by a DistributedOptimizer: zero the grads in place
    whatever `set_to_none` says, since a grad set to None would no longer be its view into the
    flat grad buffer (the next backward would write its grad elsewhere)."""
    nn.Module.zero_grad(module, set_to_none=False)


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

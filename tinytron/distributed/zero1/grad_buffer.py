"""Flat, bucketed parameter and gradient buffers: the memory layout behind ZeRO-1 and plain DP.

One `FlatBuffer` holds every parameter reduced over one process group. Layout, in elements:

    param_data, grad_data: [ bucket 0 | bucket 1 | ... ]      (1-D, same dtype/device as the params)
    bucket b:              [ p_i | p_i+1 | ... | zero pad ]   L_b elements, a multiple of N
                                                              (N = group size)
    rank r's shard of b:   elements [r * L_b / N, (r + 1) * L_b / N) of the bucket

Each model parameter becomes a view into `param_data` (`p.data = param_data[o:o+n].view_as(p)`)
and its `.grad` a view into `grad_data`, so autograd accumulates micro-step gradients in place
(no copy, gradient accumulation for free). A parameter never spans two buckets, but may span two
shards. Buckets bound the size of one collective (NCCL pipelines them; large messages are where
bandwidth is reached). Collectives are issued per bucket, never per parameter, asynchronously:
the DistributedOptimizer decides when each is launched and waited for.
"""

import torch
import torch.distributed as dist
from torch import nn

from tinytron.distributed.zero1.whole_matrices import broadcast_from_owners, reduce_to_owners


def group_size(group) -> int:
    """Size of `group`; a None group means "no communication" and has size 1."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in `group` (-1 if it is not a member); 0 for a None group."""
    return 0 if group is None else dist.get_rank(group)


class Pending:
    """A collective launched with async_op=True (`work`; None: nothing to wait for) and the local
    steps that complete it. wait() blocks the host on gloo; on NCCL it only makes the current
    stream wait for the collective (no host sync)."""

    def __init__(self, work=None, *then):
        self.work, self.then = work, list(then)

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        for fn in self.then:
            fn()


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group) -> Pending:
    """Launch output[:] = sum over the ranks of `group` of their chunk `rank` of `input`
    (input: [N * k], output: [k]; output may be this rank's chunk of input); complete with wait().

    NCCL: the native op. gloo (CPU) has the op too, but it is slower than an all-reduce of the same
    buffer (torch 2.13, world 2, 19 MiB: 31 ms vs 20 ms); an all-to-all then a local sum moves
    exactly a reduce-scatter's bytes (14 ms for the all-to-all).
    """
    if dist.get_backend(group) == "gloo":
        chunks = torch.empty_like(input).view(dist.get_world_size(group), -1)
        work = dist.all_to_all_single(chunks, input, group=group, async_op=True)
        return Pending(work, lambda: torch.sum(chunks, dim=0, out=output))
    op = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return Pending(op(output, input, group=group, async_op=True))   # torch 2.13 renamed it


def all_gather(output: torch.Tensor, input: torch.Tensor, group, async_op: bool = False):
    """output ([N * k]) = concatenation over ranks, in rank order, of input ([k]). In place
    when input is this rank's chunk of output. async_op: returns the Work to wait() for."""
    op = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return op(output, input, group=group, async_op=async_op)   # torch 2.13 renamed it


def bucket_layout(numels: list[int], bucket_numel: int, size: int
                  ) -> tuple[list[int], list[tuple[int, int]], list[list[int]]]:
    """Where FlatBuffer puts tensors of `numels` elements, in order: buckets of at most
    `bucket_numel` elements (a bigger tensor gets a bucket of its own), each padded to a multiple
    of the group `size`. Returns (flat start of each tensor, [start, end) of each bucket, the
    tensor indices of each bucket). A pure function: `tinytron.training.memory` sizes buffers with it."""
    offsets, buckets, members = [], [], []
    current: list[int] = []
    start = end = 0

    def close() -> int:
        buckets.append((start, start + -(-(end - start) // size) * size))
        members.append(current)
        return buckets[-1][1]

    for i, n in enumerate(numels):
        if current and end + n - start > bucket_numel:
            start = end = close()
            current = []
        offsets.append(end)
        current.append(i)
        end += n
    close()
    return offsets, buckets, members


def shard_of(bucket: tuple[int, int], size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank `rank`'s shard of `bucket` (padded to a multiple of `size`)."""
    start, end = bucket
    shard = (end - start) // size
    return start + rank * shard, start + (rank + 1) * shard


class FlatBuffer:
    """Flat params and grads of `params` (distinct, same dtype and device), reduced over `group`.

    sharded=True: gradients are reduce-scattered (each rank keeps its shard of each bucket) and
    params all-gathered after the optimizer updated the shards. sharded=False: gradients are
    all-reduced and every rank updates every param. A group of size 1 (or None) never communicates.
    layout: bucket_layout (equal shards), or whole_matrices.owner_layout (uneven shards, each param
    inside one rank's: reduced to and broadcast from its owner, see whole_matrices.py).
    """

    def __init__(self, params: list[nn.Parameter], group, bucket_numel: int, sharded: bool, layout=None):
        self.group = group
        self.size, self.rank = group_size(group), group_rank(group)
        self.sharded = sharded and self.size > 1
        dtype, device = params[0].dtype, params[0].device
        for p in params:
            if p.dtype != dtype or p.device != device:
                raise ValueError(f"parameters reduced over one group must share dtype and device; "
                                 f"got {dtype}/{device} and {p.dtype}/{p.device}")

        offsets, self.buckets, members, *segments = (layout or bucket_layout)(
            [p.numel() for p in params], bucket_numel, self.size)
        self.segments = segments[0] if segments else None   # per bucket: [lo, hi) of each rank's shard
        if self.segments:
            self._segment_of = {bucket: seg[self.rank] for bucket, seg in zip(self.buckets, self.segments)}
        self.offsets: dict[nn.Parameter, int] = dict(zip(params, offsets))  # param -> flat start
        self.bucket_params = [[params[i] for i in m] for m in members]      # the params of each bucket
        numel = self.buckets[-1][1]

        self.param_data = torch.zeros(numel, dtype=dtype, device=device)
        self.grad_data = torch.zeros(numel, dtype=dtype, device=device)
        for p, o in self.offsets.items():
            n = p.numel()
            self.param_data[o:o + n].copy_(p.data.reshape(-1))
            p.data = self.param_data[o:o + n].view_as(p)
            p.grad = self.grad_data[o:o + n].view_as(p)
        self._grads = {p: p.grad for p in self.offsets}

    def shard_range(self, bucket: tuple[int, int]) -> tuple[int, int]:
        """[lo, hi) of this rank's shard of `bucket`, in flat-buffer elements."""
        if self.segments:
            return self._segment_of[bucket]
        return shard_of(bucket, self.size, self.rank)

    def local_pieces(self) -> dict[nn.Parameter, tuple[int, int]]:
        """param -> [lo, hi): the flat range of param that lies in this rank's shard (only the
        params that have one)."""
        pieces = {}
        for bucket, members in zip(self.buckets, self.bucket_params):
            s_lo, s_hi = self.shard_range(bucket)
            for p in members:
                lo, hi = max(self.offsets[p], s_lo), min(self.offsets[p] + p.numel(), s_hi)
                if lo < hi:
                    pieces[p] = (lo, hi)
        return pieces

    def norm_grad_views(self) -> list[torch.Tensor]:
        """This rank's shard of the grads of every bucket. The shards partition the buffer over
        the group, so summing squares over the group counts every element once, sharded or not."""
        return [self.grad_data[slice(*self.shard_range(b))] for b in self.buckets]

    def step_grad_views(self) -> list[torch.Tensor]:
        """The reduced grads the optimizer reads: this rank's shards, or the whole buffer."""
        return self.norm_grad_views() if self.sharded else [self.grad_data]

    def zero_grad(self) -> None:
        self.grad_data.zero_()

    def start_grad_reduce(self, b: int, scale: float) -> Pending:
        """Launch the sum of bucket b's grads over the group (reduce-scatter into this rank's
        shard, or all-reduce); wait() completes it and multiplies the reduced grads by `scale`.
        One collective per bucket, on NCCL queued on its stream (no host sync)."""
        for p in self.bucket_params[b]:
            if p.grad is not self._grads[p]:
                raise RuntimeError("a parameter's .grad is no longer its view into the flat grad "
                                   "buffer (it was set to None or replaced); zero grads with "
                                   "model.zero_grad() or the DistributedOptimizer's zero_grad()")
        full = self.grad_data[slice(*self.buckets[b])]
        reduced = self.grad_data[slice(*self.shard_range(self.buckets[b]))] if self.sharded else full
        if self.size == 1:
            pending = Pending()
        elif self.segments:
            pending = Pending(reduce_to_owners(self.grad_data, self.segments[b], self.group))
        elif self.sharded:
            pending = reduce_scatter(reduced, full, self.group)
        else:
            pending = Pending(dist.all_reduce(full, group=self.group, async_op=True))
        if scale != 1.0:
            pending.then.append(lambda: reduced.mul_(scale))
        return pending

    def start_param_gather(self, b: int):
        """After the optimizer updated this rank's shard of bucket b: launch the in-place
        all-gather that gives every rank the whole bucket. Returns its Work (None if unsharded)."""
        if not self.sharded:
            return None
        if self.segments:
            return broadcast_from_owners(self.param_data, self.segments[b], self.group)
        return all_gather(self.param_data[slice(*self.buckets[b])],
                          self.param_data[slice(*self.shard_range(self.buckets[b]))], self.group,
                          async_op=True)

    def gather_bucket(self, b: int, shard: torch.Tensor) -> torch.Tensor:
        """Bucket b of a tensor laid out like this (sharded) buffer, whole on every rank, from
        each rank's `shard` of it (collective over the group)."""
        start, end = self.buckets[b]
        out = torch.empty(end - start, dtype=shard.dtype, device=shard.device)
        if not self.segments:
            all_gather(out, shard, self.group)
            return out
        lo, hi = self.shard_range(self.buckets[b])
        out[lo - start:hi - start] = shard
        broadcast_from_owners(out, [(lo - start, hi - start) for lo, hi in self.segments[b]], self.group).wait()
        return out

"""Whole-matrix ownership: ZeRO-1 for optimizers that need a parameter's full shape (Muon).

An element-wise optimizer (AdamW) can step any flat range of a parameter, so ZeRO-1 cuts buckets
into equal shards wherever they fall. Muon orthogonalises each weight matrix as a whole, so a
param group marked `"whole_matrices": True` goes into a flat buffer of its own whose layout
(`owner_layout`) puts every tensor inside exactly one rank's segment: the "distributed Muon" of
Moonlight (Liu et al., arXiv 2502.16982).

    bucket b:        [ segment of rank 0 | segment of rank 1 | ... ]   no padding
    segment r:       the tensors of the bucket that rank r owns, whole (possibly none)

Per bucket, one reduce per non-empty segment (SUM, to its owner) hands each owner the fully
reduced gradients of its tensors, the owner steps them (each 2-D matrix of them, see `matrices`),
and one broadcast per non-empty segment (from its owner) returns the updated tensors to every
rank: the bytes of a reduce-scatter and an all-gather, in at most N collectives per bucket
(segments are uneven, which reduce-scatter and all-gather do not take without padding).

Owners are chosen greedily in packing order: each tensor goes to the rank that owns the fewest
elements so far (ties: the lowest rank), so no rank owns more than 1/N of the elements plus one
tensor (Graham's list-scheduling bound), and so holds no more optimizer state than that.
"""

import torch
import torch.distributed as dist

Segments = list[tuple[int, int]]   # [lo, hi) of each rank's segment of one bucket, flat elements


def owner_layout(numels: list[int], bucket_numel: int, size: int
                 ) -> tuple[list[int], list[tuple[int, int]], list[list[int]], list[Segments]]:
    """Where a whole-matrix FlatBuffer puts tensors of `numels` elements (in packing order), for a
    group of `size` ranks: grad_buffer.bucket_layout's triple (flat start of each tensor, [start,
    end) of each bucket, the tensor indices of each bucket in packing order; buckets of at most
    `bucket_numel` elements, a bigger tensor alone, here unpadded) and the segments of each bucket.
    A pure function: tinytron.training.memory sizes buffers with it."""
    owned = [0] * size                        # elements each rank owns so far
    offsets = [0] * len(numels)
    buckets, members, segments = [], [], []
    current: list[int] = []
    start = total = 0

    def close() -> int:
        owner_of = dict(zip(current, greedy_owners([numels[i] for i in current], owned)))
        lo, bounds = start, []
        for r in range(size):
            hi = lo
            for i in current:
                if owner_of[i] == r:
                    offsets[i], hi = hi, hi + numels[i]
            bounds.append((lo, hi))
            lo = hi
        buckets.append((start, lo))
        members.append(current)
        segments.append(bounds)
        return lo

    for i, n in enumerate(numels):
        if current and total + n > bucket_numel:
            start, current, total = close(), [], 0
        current.append(i)
        total += n
    close()
    return offsets, buckets, members, segments


def greedy_owners(numels: list[int], owned: list[int]) -> list[int]:
    """The owner of each tensor of `numels` elements, in order: the rank that owns the fewest
    elements so far (`owned`, one count per rank, updated in place; ties: the lowest rank)."""
    owners = []
    for n in numels:
        owners.append(min(range(len(owned)), key=lambda r: (owned[r], r)))
        owned[owners[-1]] += n
    return owners


class Works:
    """Several collectives launched with async_op=True, waited for together."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()


def reduce_to_owners(data: torch.Tensor, segments: Segments, group) -> Works:
    """Launch, for each non-empty segment r ([lo, hi) of the flat buffer `data`), its sum over
    `group` into rank r's copy (the other ranks' copies are left undefined)."""
    return Works([dist.reduce(data[lo:hi], dst=dist.get_global_rank(group, r), group=group, async_op=True)
                  for r, (lo, hi) in enumerate(segments) if hi > lo])


def broadcast_from_owners(data: torch.Tensor, segments: Segments, group) -> Works:
    """Launch, for each non-empty segment r of the flat buffer `data`, its broadcast from rank r."""
    return Works([dist.broadcast(data[lo:hi], src=dist.get_global_rank(group, r), group=group, async_op=True)
                  for r, (lo, hi) in enumerate(segments) if hi > lo])


def matrices(param_data: torch.Tensor, grad_data: torch.Tensor, offset: int, shape: torch.Size
             ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """The 2-D matrices of the tensor of `shape` at flat `offset` of a buffer's param_data /
    grad_data: (param view, grad view, flat start inside the tensor) for the tensor itself if it
    is 2-D, or for each [i] of a stacked [E, m, n] tensor (one MoE expert's matrix each)."""
    rows = shape[1:] if len(shape) == 3 else shape
    if len(rows) != 2:
        raise ValueError(f"whole_matrices groups hold 2-D or stacked 3-D tensors, not {tuple(shape)}")
    n, count = rows.numel(), shape.numel() // rows.numel()
    return [(param_data[offset + i * n:offset + (i + 1) * n].view(rows),
             grad_data[offset + i * n:offset + (i + 1) * n].view(rows), i * n) for i in range(count)]

"""Whole-matrix ownership: ZeRO-1 for optimizers that need a parameter's full shape (Muon).

An element-wise optimizer (AdamW) can step any flat range of a parameter, so ZeRO-1 cuts buckets
into equal shards wherever they fall. Muon orthogonalises each weight matrix as a whole, so a
param group marked `"whole_matrices": True` goes into a flat buffer of its own whose layout
(`owner_layout`) puts every tensor inside exactly one rank's shard: the "distributed Muon" of
Moonlight (Liu et al., arXiv 2502.16982), with the same collectives as ZeRO-1:

    bucket b:        [ segment of rank 0 | segment of rank 1 | ... ]   N equal segments
    segment r:       [ the tensors rank r owns, whole | zero pad ]

The bucket's reduce-scatter hands rank r the fully reduced gradients of the tensors it owns, rank r
steps them (each 2-D matrix of them, see `matrices`), and the bucket's all-gather returns the
updated tensors to every rank. Owners are chosen greedily in packing order, each tensor going to
the rank that owns the fewest elements so far (ties: the lowest rank), so no rank owns more than
1/N of the elements plus one tensor (Graham's list-scheduling bound), and consecutive tensors of
a bucket, mostly of similar sizes, spread over the ranks (little padding).
"""

import torch


def owner_layout(numels: list[int], bucket_numel: int, size: int
                 ) -> tuple[list[int], list[tuple[int, int]], list[list[int]]]:
    """Where a whole-matrix FlatBuffer puts tensors of `numels` elements (in packing order), for a
    group of `size` ranks: the same triple as grad_buffer.bucket_layout (flat start of each
    tensor, [start, end) of each bucket, the tensor indices of each bucket in packing order).
    A bucket closes before the tensor that would take it over `bucket_numel` elements, once it
    holds at least `size` tensors (so that every rank owns one). Rank r's shard of a bucket is its
    segment r. A pure function: tinytron.training.memory sizes buffers with it."""
    owned = [0] * size                        # elements each rank owns so far
    offsets = [0] * len(numels)
    buckets, members = [], []
    current: list[int] = []
    start = 0

    def close() -> int:
        loads = [0] * size
        owner_of = {}
        for i in current:
            r = min(range(size), key=lambda r: (owned[r], r))
            owner_of[i] = r
            owned[r] += numels[i]
            loads[r] += numels[i]
        segment = max(loads)
        fill = [start + r * segment for r in range(size)]
        for i in current:
            offsets[i] = fill[owner_of[i]]
            fill[owner_of[i]] += numels[i]
        buckets.append((start, start + size * segment))
        members.append(current)
        return buckets[-1][1]

    total = 0
    for i, n in enumerate(numels):
        if current and total + n > bucket_numel and len(current) >= size:
            start, current, total = close(), [], 0
        current.append(i)
        total += n
    close()
    return offsets, buckets, members


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

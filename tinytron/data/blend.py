"""Blended corpora: every global batch mixes C corpora in fixed proportions (e.g. 70% web, 30% code).

Weights are quantised to integers W_c summing to M = 2^32 (|W_c / M - w_c| < 2^-32). Corpus c's
target per optimizer step is W_c * G / M sequences (G: global batch): it gets its floor b_c
every step, and the r = G - sum(b_c) remaining sequences go to r distinct corpora, chosen by
systematic sampling with a rotating offset: the fractional parts phi_c = W_c * G mod M are laid
end to end on [0, r*M), and at step t the points u_t + k*M (k < r, u_t = t*a mod M, a odd, near
M / golden ratio) pick the corpora whose stretch holds one. Hence, for every step and corpus:
  * n_c(t) is floor or ceil of W_c * G / M: the share of every global batch is within one sequence;
  * the counts sum to G;
  * over any M consecutive steps u_t takes every value once, so corpus c gets exactly phi_c extras:
    the long-run share is exactly W_c / M, and the low-discrepancy rotation keeps the running
    count within a few sequences of it at every step.
Corpus c's running count A_c(s) = s * b_c + (extras before s) is a sum of floors, evaluated in
O(log M) with `floor_sum`, so step s costs O(G + C log M) whatever s and the corpus sizes.

Corpus c reads its own stream: its k-th sequence is `epoch_permutation(N_c, seed, k // N_c,
stream=c + 1)(k % N_c)`, so it is walked without repetition within each of its own epochs, and
a small corpus simply starts its next epoch sooner. A step's G indices are finally shuffled (one
more seeded permutation of [0, G)), so every DP rank and micro-batch gets a mix. Everything is a
function of (seed, step, sizes, weights): layout-invariant, and resumes exactly.
"""

import numpy as np
from torch.utils.data import ConcatDataset

from tinytron.data.sampler import epoch_permutation

_M = 2**32
_A = 0x9E3779B9  # round(2^32 / golden ratio), odd: t -> t * _A mod 2^32 is a low-discrepancy bijection


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum_{i=0}^{n-1} floor((a*i + b) / m) for n >= 0, m >= 1, any integers a, b, in O(log m)
    (the Euclid-like recursion, e.g. AtCoder Library's floor_sum). Python ints: no overflow."""
    total = 0
    if a < 0 or a >= m:
        total += (n - 1) * n // 2 * (a // m)
        a %= m
    if b < 0 or b >= m:
        total += n * (b // m)
        b %= m
    while True:
        if a >= m:
            total += (n - 1) * n // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y_max = a * n + b
        if y_max < m:
            return total
        n, b, m, a = y_max // m, y_max % m, a, m


def quantise_weights(weights) -> list[int]:
    """Positive weights -> integers summing to 2^32 in the same proportions (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    scaled = w / w.sum() * _M
    q = np.floor(scaled).astype(np.int64)
    q[np.argsort(-(scaled - q), kind="stable")[:_M - int(q.sum())]] += 1
    return [int(v) for v in q]


class Blend:
    """The mixing rule for corpora of `sizes` sequences (N_c) and positive `weights` (any scale)."""

    def __init__(self, sizes, weights):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"{len(sizes)} corpora but {len(weights)} weights")
        if min(sizes) < 1:
            raise ValueError(f"every corpus needs at least one sequence, got sizes {list(sizes)}")
        if not all(np.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"weights must be positive numbers, got {list(weights)}")
        self.sizes = [int(n) for n in sizes]
        self.weights = quantise_weights(weights)
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes)[:-1])).astype(np.int64)

    def _quota(self, global_batch: int):
        """(b_c, the stretch ends Phi_c on [0, r*M)) for a global batch of G sequences."""
        scaled = [w * global_batch for w in self.weights]
        base = [s // _M for s in scaled]
        ends = np.cumsum([s % _M for s in scaled]).tolist()
        return base, [0] + ends

    def consumed_before(self, step: int, global_batch: int) -> list[int]:
        """A_c(step): sequences each corpus contributed to steps 0 .. step-1."""
        base, ends = self._quota(global_batch)
        # extras of corpus c at step t: floor((t*a - Phi_{c-1}) / M) - floor((t*a - Phi_c) / M)
        sums = [floor_sum(step, _M, _A, -phi) for phi in ends]
        return [step * b + sums[c] - sums[c + 1] for c, b in enumerate(base)]

    def counts_of_step(self, step: int, global_batch: int) -> list[int]:
        """n_c(step): sequences of each corpus in the global batch of `step` (they sum to G)."""
        base, ends = self._quota(global_batch)
        u = step * _A % _M
        # -(-x // M) is ceil(x / M): points u + k*M inside [Phi_{c-1}, Phi_c).
        return [b - (-(ends[c + 1] - u) // _M) + (-(ends[c] - u) // _M) for c, b in enumerate(base)]

    def indices_of_step(self, step: int, global_batch: int, seed: int) -> np.ndarray:
        """The G indices (int64, into the corpora's concatenation) of global step `step`."""
        starts = self.consumed_before(step, global_batch)
        parts = []
        for c, (start, count) in enumerate(zip(starts, self.counts_of_step(step, global_batch))):
            n = self.sizes[c]
            positions = np.arange(start, start + count, dtype=np.int64)
            epochs, within = np.divmod(positions, n)
            local = np.empty_like(positions)
            for e in np.unique(epochs):  # one or two epochs, unless the corpus is tiny
                mask = epochs == e
                local[mask] = epoch_permutation(n, seed, int(e), stream=c + 1)(within[mask])
            parts.append(self.offsets[c] + local)
        batch = np.concatenate(parts)
        shuffle = epoch_permutation(global_batch, seed, step, stream=len(self.sizes) + 1)
        return batch[shuffle(np.arange(global_batch, dtype=np.int64))]


class BlendedDataset(ConcatDataset):
    """The concatenation of `datasets` (index = offset of the corpus + index within it), with the
    `blend` that `GlobalBatchSampler` uses to mix them by `weights`."""

    def __init__(self, datasets, weights):
        super().__init__(datasets)
        self.blend = Blend([len(d) for d in datasets], weights)


def parse_list(value: str, count: int, flag: str) -> list[str]:
    """A comma-separated flag value with one entry per corpus, or a single entry for all."""
    items = [v.strip() for v in value.split(",")] if value else [""]
    if len(items) == 1:
        return items * count
    if len(items) != count:
        raise ValueError(f"--{flag} has {len(items)} comma-separated values for {count} corpora "
                         "in --dataset (give one per corpus, or one for all)")
    return items


def parse_weights(value: str, count: int) -> list[float]:
    """--dataset_weights "0.7,0.3" -> [0.7, 0.3]; empty: equal weights."""
    if not value:
        return [1.0] * count
    try:
        weights = [float(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"--dataset_weights {value!r} must be comma-separated numbers") from None
    if len(weights) != count:
        raise ValueError(f"--dataset_weights has {len(weights)} values for {count} corpora in --dataset")
    if not all(np.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"--dataset_weights {value!r}: every weight must be a positive number")
    return weights

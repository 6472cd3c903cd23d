"""Layout-invariant data order, in O(global batch) time and memory per step whatever the dataset size.

The sequences of optimizer step `s` in epoch `e` are `perm_e(s*G + j)` for j < G, where `perm_e`
is a pseudo-random permutation of [0, N) keyed by (seed, e) and G the global batch in sequences
(total_batch_size / seq_len). They depend on nothing else: not on the data-parallel size, the
micro-batch size or gradient accumulation. Each DP rank takes a contiguous slice of the global
batch and splits it into micro-batches, so every layout sees the same global batches and loss
curves are comparable across layouts. All ranks of one SEP group read the same sequences.

`perm_e` is never materialised (that costs O(N) per step: 9 s and 700 MB at N = 1e8): it is a
Feistel network, a bijection of [0, 4^k) for the smallest 4^k >= N, restricted to [0, N) by
cycle-walking (apply it again until the value falls below N; 4^k < 4N, so under 4 walks on
average). Evaluating it on the G positions of one step is a few vectorised int64 operations.
"""

import numpy as np

_ROUNDS = 6  # Luby-Rackoff: 4 rounds already give a pseudo-random permutation; 6 mix small domains better


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of uint64 (the round function's core)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A seeded bijection of [0, n): `perm(i)` for an int64 array i (any shape) in O(len(i)).

    keys: `_ROUNDS` uint64 round keys (e.g. from a seeded generator); the same keys give the same
    permutation on every machine (only integer arithmetic). n up to 2^62.
    """

    def __init__(self, n: int, keys: np.ndarray):
        if not 1 <= n <= 2**62:
            raise ValueError(f"permutation size {n} must be in [1, 2^62]")
        self.n = n
        self.half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)  # domain 4^half_bits >= n
        self.keys = np.asarray(keys, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        """One pass of the balanced Feistel network over [0, 4^half_bits)."""
        bits = np.uint64(self.half_bits)
        mask = np.uint64((1 << self.half_bits) - 1)
        left, right = x >> bits, x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << bits) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        x = self._encrypt(np.asarray(i, dtype=np.uint64))
        # Cycle-walking: the walk from a value < n returns below n before it could revisit a value,
        # so this stays a bijection of [0, n).
        outside = np.flatnonzero(x >= np.uint64(self.n))
        while outside.size:
            x[outside] = self._encrypt(x[outside])
            outside = outside[x[outside] >= np.uint64(self.n)]
        return x.astype(np.int64)


def epoch_permutation(num_samples: int, seed: int, epoch: int, stream: int = 0) -> FeistelPermutation:
    """The permutation of epoch `epoch` of [0, num_samples), keyed by (seed, epoch, stream) only
    (`stream` tells apart independent orders, e.g. the corpora of a blend)."""
    keys = np.random.default_rng([seed, epoch, stream]).integers(0, 2**63, size=_ROUNDS, dtype=np.uint64)
    return FeistelPermutation(num_samples, keys)


class GlobalBatchSampler:
    """A batch sampler (for `DataLoader(batch_sampler=...)`) yielding this DP rank's micro-batches
    of sample indices, `grad_accum_steps` per optimizer step, from optimizer step `start_step` on,
    forever (the trainer decides when to stop).

    global_batch: sequences per optimizer step over all DP ranks (G); micro_batch: sequences per
    micro-step per rank; G must equal micro_batch * grad_accum * dp_size.
    blend: a `tinytron.data.blend.Blend` (corpus sizes and weights): then the indices are those of
    the corpora's concatenation, mixed as `Blend.indices_of_step` describes, and num_samples must
    be their total.
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int, start_step: int = 0, blend=None):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {global_batch} is not divisible by micro batch "
                             f"{micro_batch} x data-parallel size {dp_size}")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} sequences, fewer than one global batch "
                             f"of {global_batch} (--total_batch_size / --seq_len)")
        if blend is not None and sum(blend.sizes) != num_samples:
            raise ValueError(f"the blend's corpora hold {sum(blend.sizes)} sequences, not {num_samples}")
        self.num_samples, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.start_step = dp_rank, dp_size, seed, start_step
        self.blend = blend
        self.steps_per_epoch = num_samples // global_batch  # the last partial global batch is dropped

    def indices_of_step(self, step: int) -> np.ndarray:
        """The G sample indices (int64) of global optimizer step `step` (counted over all epochs)."""
        if self.blend is not None:
            return self.blend.indices_of_step(step, self.global_batch, self.seed)
        epoch, s = divmod(step, self.steps_per_epoch)
        positions = np.arange(s * self.global_batch, (s + 1) * self.global_batch, dtype=np.int64)
        return epoch_permutation(self.num_samples, self.seed, epoch)(positions)

    def __iter__(self):
        per_rank = self.global_batch // self.dp_size
        step = self.start_step
        while True:
            mine = self.indices_of_step(step)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
            for m in range(0, per_rank, self.micro_batch):
                yield mine[m:m + self.micro_batch].tolist()
            step += 1


def validation_indices(num_samples: int, max_samples: int) -> np.ndarray:
    """The validation sequences one evaluation scores: all of them when max_samples is 0 or at
    least num_samples, else `max_samples` evenly strided ones, floor(k * num_samples / max_samples)
    for k < max_samples. A fixed subset: the same at every evaluation, on every layout and for
    every seed, spread over the whole split (all corpora of a blend, the whole corpus' tail)."""
    if not max_samples or max_samples >= num_samples:
        return np.arange(num_samples, dtype=np.int64)
    return np.arange(max_samples, dtype=np.int64) * num_samples // max_samples


"""Layout-invariant data order.

The sequences of optimizer step `s` in epoch `e` are `perm_e[s*G : (s+1)*G]`, where `perm_e` is a
permutation of the dataset seeded by (seed, e) and G the global batch in sequences
(total_batch_size / seq_len). They depend on nothing else: not on the data-parallel size, the
micro-batch size or gradient accumulation. Each DP rank takes a contiguous slice of the global
batch and splits it into micro-batches, so every layout sees the same global batches and loss
curves are comparable across layouts. All ranks of one SEP group read the same sequences.
"""

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class GlobalBatchSampler:
    """A batch sampler (for `DataLoader(batch_sampler=...)`) yielding this DP rank's micro-batches
    of sample indices, `grad_accum_steps` per optimizer step, from optimizer step `start_step` on,
    forever (the trainer decides when to stop).

    global_batch: sequences per optimizer step over all DP ranks (G); micro_batch: sequences per
    micro-step per rank; G must equal micro_batch * grad_accum * dp_size.
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int, start_step: int = 0):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {global_batch} is not divisible by micro batch "
                             f"{micro_batch} x data-parallel size {dp_size}")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} sequences, fewer than one global batch "
                             f"of {global_batch} (--total_batch_size / --seq_len)")
        self.num_samples, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.start_step = dp_rank, dp_size, seed, start_step
        self.steps_per_epoch = num_samples // global_batch  # the last partial global batch is dropped

    def indices_of_step(self, step: int) -> np.ndarray:
        """The G sample indices of global optimizer step `step` (counted over all epochs)."""
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = epoch_permutation(self.num_samples, self.seed, epoch)
        return perm[s * self.global_batch:(s + 1) * self.global_batch]

    def __iter__(self):
        per_rank = self.global_batch // self.dp_size
        step = self.start_step
        while True:
            mine = self.indices_of_step(step)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
            for m in range(0, per_rank, self.micro_batch):
                yield mine[m:m + self.micro_batch].tolist()
            step += 1

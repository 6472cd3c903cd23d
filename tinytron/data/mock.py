"""Deterministic mock data with learnable structure.

Sample i is an arithmetic progression modulo the vocabulary, `x_t = (a + b * t) mod V`, with a
start `a` and a stride `b` in [1, 16] drawn from a generator seeded by (seed, split, i), plus 5%
random tokens. A model learns to read the stride from the context, so the loss falls quickly well
below log(V), yet the noise keeps it above zero. Identical on every rank, no files.
"""

import numpy as np
import torch
from torch.utils.data import Dataset

_NOISE = 0.05


class MockDataset(Dataset):
    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int, split: str = "train"):
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed
        self.split_id = {"train": 0, "val": 1}[split]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        """-> LongTensor [seq_len + 1] (inputs are [:-1], targets [1:])."""
        rng = np.random.default_rng([self.seed, self.split_id, i])
        start, stride = rng.integers(self.vocab_size), rng.integers(1, 17)
        tokens = (start + stride * np.arange(self.seq_len + 1)) % self.vocab_size
        noise = rng.random(self.seq_len + 1) < _NOISE
        tokens[noise] = rng.integers(self.vocab_size, size=int(noise.sum()))
        return torch.from_numpy(tokens.astype(np.int64))

"""Deterministic mock data with learnable structure.

Each sample follows one of four fixed random permutations of the vocabulary as a Markov chain,
`x_{t+1} = perm_c[x_t]`, from a random start, with 5% of the tokens replaced by random ones (the
chain continues from the token actually emitted). Chain c and start are drawn from a generator
seeded by (seed, split, i). A model first learns the bigram mixture (loss falls from log V to
about log 4), then reads the chain from the context (down towards the noise floor), so the loss
clearly falls; it never reaches zero. Identical on every rank, no files.
"""

import numpy as np
import torch
from torch.utils.data import Dataset

_NUM_CHAINS = 4
_NOISE = 0.05


class MockDataset(Dataset):
    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int, split: str = "train"):
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed
        self.split_id = {"train": 0, "val": 1}[split]
        rng = np.random.default_rng([seed, 1000])
        self.chains = np.stack([rng.permutation(vocab_size) for _ in range(_NUM_CHAINS)])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        """-> LongTensor [seq_len + 1] (inputs are [:-1], targets [1:])."""
        rng = np.random.default_rng([self.seed, self.split_id, i])
        chain = self.chains[rng.integers(_NUM_CHAINS)]
        noise = rng.random(self.seq_len + 1) < _NOISE
        random_tokens = rng.integers(self.vocab_size, size=self.seq_len + 1)
        tokens = np.empty(self.seq_len + 1, dtype=np.int64)
        tokens[0] = random_tokens[0]
        for t in range(1, self.seq_len + 1):
            tokens[t] = random_tokens[t] if noise[t] else chain[tokens[t - 1]]
        return torch.from_numpy(tokens)

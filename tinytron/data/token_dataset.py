"""Map-style dataset of fixed-length token windows over a token cache written by tokenize.py."""

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tinytron.data.tokenize import INDEX_FILE, TOKENS_FILE


class TokenWindowDataset(Dataset):
    """Non-overlapping windows of one split of the token cache at `path`.

    Sample i is tokens[start + i*seq_len : start + i*seq_len + seq_len + 1], a LongTensor of shape
    (seq_len + 1,): inputs are [:-1], targets [1:]. Consecutive windows share one token (window i's
    last is window i+1's first), so every token of the split is predicted exactly once
    (nanoGPT/Megatron). Windows ignore document boundaries; EOS tokens mark them. `len` is
    (split tokens - 1) // seq_len; the tail that does not fill a window is dropped.

    The token file is memory-mapped on first access, not in __init__, and never pickled: each
    DataLoader worker maps it itself.
    """

    def __init__(self, path: str | Path, seq_len: int, split: str = "train"):
        self.path = Path(path)
        index = json.loads((self.path / INDEX_FILE).read_text())
        if split not in index["splits"]:
            raise ValueError(f"split {split!r} is not one of {sorted(index['splits'])}")
        if seq_len <= 0:
            raise ValueError(f"--seq_len {seq_len} must be positive")
        self.seq_len, self.split = seq_len, split
        self.start, end = index["splits"][split]
        self.num_tokens = end - self.start  # tokens in this split
        self.vocab_size: int = index["vocab_size"]
        # The largest token id of the whole cache (None: a cache written before it was recorded);
        # the Trainer checks it against --vocab_size before the first step.
        self.max_token_id: int | None = index.get("max_token_id")
        self.eos_token_id: int = index["eos_token_id"]
        self.tokenizer: str = index["tokenizer"]
        self._dtype, self._total = np.dtype(index["dtype"]), index["num_tokens"]
        self._len = (self.num_tokens - 1) // seq_len
        if self._len <= 0:
            raise ValueError(f"the {split} split has {self.num_tokens} tokens, fewer than --seq_len "
                             f"{seq_len} + 1 (lower --seq_len, or raise --val_fraction for val)")
        self._tokens = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range for {self._len} {self.split} samples")
        if self._tokens is None:
            self._tokens = np.memmap(self.path / TOKENS_FILE, dtype=self._dtype, mode="r",
                                     shape=(self._total,))
        begin = self.start + i * self.seq_len
        # astype copies out of the read-only map into int64, the dtype embeddings index with.
        return torch.from_numpy(self._tokens[begin:begin + self.seq_len + 1].astype(np.int64))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

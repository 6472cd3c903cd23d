"""Data: pre-tokenized corpora on disk (tokenize.py) read as fixed-length windows (token_dataset.py)."""

from tinytron.data.token_dataset import TokenWindowDataset
from tinytron.data.tokenize import prepare_token_shards, prepare_token_shards_distributed

__all__ = ["TokenWindowDataset", "prepare_token_shards", "prepare_token_shards_distributed"]

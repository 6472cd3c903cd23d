"""--document_mask in the Trainer: which token ends a document, and the per-micro-batch layout
(tinytron/model/document_mask.py) computed from the FULL sequences before the sequence-parallel
split."""

import torch

from tinytron.model.document_mask import document_layout
from tinytron.training.config import Config, ConfigError


def dataset_eos_id(config: Config, dataset) -> int:
    """The EOS id for --document_mask: --eos_token_id, else the dataset's `eos_token_id` (a token
    cache's, TokenWindowDataset), or that of all its corpora (a ConcatDataset / BlendedDataset).
    Raises ConfigError when there is none or the flag contradicts the dataset."""
    flag = config.data.eos_token_id
    found = {getattr(d, "eos_token_id", None) for d in getattr(dataset, "datasets", [dataset])} - {None}
    if flag >= 0 and found and found != {flag}:
        raise ConfigError(f"--eos_token_id {flag} differs from the dataset's EOS id {sorted(found)}")
    if flag >= 0:
        return flag
    if len(found) != 1:
        what = f"several EOS ids {sorted(found)}" if found else "no eos_token_id"
        raise ConfigError(f"--document_mask: the training dataset has {what}; pass --eos_token_id")
    return found.pop()


def document_layout_fn(config: Config, dataset, device: torch.device):
    """None without --document_mask, else fn(inputs [B, T] full sequences, positions [1, T/sep] of
    this rank's chunk) -> (DocumentMask over the full sequences, the chunk's position ids).
    flex_attention on CUDA; SDPA's boolean mask elsewhere, or with --dropout (flex_attention has
    no dropout)."""
    if not config.data.document_mask:
        return None
    eos, reset = dataset_eos_id(config, dataset), config.data.reset_position_ids
    use_flex = device.type == "cuda" and config.model.dropout == 0

    def layout(inputs: torch.Tensor, positions: torch.Tensor):
        return document_layout(inputs, eos, positions, reset, use_flex)
    return layout

"""Ulysses sequence parallelism (DeepSpeed-Ulysses, arXiv 2309.14509).

Each rank of the sequence-parallel (SEP) group holds a chunk `[B, T/sep, ...]` of every activation
(`sequence_chunk` cuts it). Around the core attention op, one all-to-all turns q (and one more k
and v together) from "sequence-sharded, all heads" into "full sequence, heads sharded", causal
attention runs over the full sequence for `H/sep` heads, and a third all-to-all returns the output
to sequence-sharded. Everything else in the model is token-local, so it needs no communication.
`apply_sequence_parallel` wraps each attention module's core op in `UlyssesAttention`; the model
itself is unchanged.
"""

import torch
import torch.distributed as dist
from torch import nn

from tinytron.distributed.all_to_all import all_to_all
from tinytron.model.document_mask import DocumentMask
from tinytron.model.gpt import Attention


def kv_heads_to_send(num_kv_heads: int, sep_size: int) -> int:
    """How many kv heads go through the all-to-all: the kv heads as they are when they split evenly
    over the group, else each replicated just enough to give every rank one (never up to all query
    heads). Raises ValueError for layouts where neither holds."""
    if num_kv_heads % sep_size == 0:
        return num_kv_heads
    if sep_size % num_kv_heads == 0:
        return sep_size
    raise ValueError(f"--num_key_value_heads {num_kv_heads} and --sep_size {sep_size}: one must "
                     "divide the other for Ulysses sequence parallelism")


def sequence_chunk(inputs: torch.Tensor, targets: torch.Tensor, sep_rank: int, sep_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs, targets: [B, T] full sequences, the same on every rank of the SEP group -> this
    rank's chunk `sep_rank` of each, [B, T/sep], and the chunk's global position ids [1, T/sep]
    (on inputs' device), which the model needs for RoPE."""
    chunk = inputs.shape[1] // sep_size
    start = sep_rank * chunk
    positions = torch.arange(start, start + chunk, device=inputs.device)[None]
    return inputs[:, start:start + chunk], targets[:, start:start + chunk], positions


class UlyssesAttention(nn.Module):
    """Runs `attention` (the core op: causal attention on full-sequence tensors [B, T, h, D], GQA
    allowed) on sequence-sharded inputs over `group` (the SEP group).

    forward: q [B, T/sep, H, D], k, v [B, T/sep, Hkv, D], chunk `sep_rank` of the sequences, RoPE
    already applied with global positions, and optionally the attention's mask over the FULL
    sequences (a `DocumentMask`), passed on as it is -> [B, T/sep, H, D], sequence-sharded like q. Raises
    ValueError unless H % sep == 0 and Hkv, sep divide one another.
    """

    def __init__(self, attention: nn.Module, group):
        super().__init__()
        self.attention = attention
        self.group = group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_mask: DocumentMask | None = None) -> torch.Tensor:
        sep = dist.get_world_size(self.group)
        if q.shape[2] % sep:
            # Every rank must get the same number of whole query heads; raised identically on every
            # rank before any collective, so no rank is left waiting in an all-to-all.
            raise ValueError(f"--num_attention_heads {q.shape[2]} is not divisible by --sep_size {sep} "
                             "for Ulysses sequence parallelism")
        num_kv = k.shape[2]
        send_kv = kv_heads_to_send(num_kv, sep)
        if send_kv != num_kv:
            # Rank i receives kv head i // (sep / Hkv): the one its query heads i*H/sep.. belong to.
            k = k.repeat_interleave(send_kv // num_kv, dim=2)
            v = v.repeat_interleave(send_kv // num_kv, dim=2)
        q = all_to_all(q, self.group, scatter_dim=2, gather_dim=1)                      # [B, T, H/sep, D]
        kv = all_to_all(torch.stack((k, v)), self.group, scatter_dim=3, gather_dim=2)   # [2, B, T, Hkv', D]
        y = self.attention(q, kv[0], kv[1], document_mask)                              # [B, T, H/sep, D]
        return all_to_all(y, self.group, scatter_dim=1, gather_dim=2)                   # [B, T/sep, H, D]


def apply_sequence_parallel(model: nn.Module, group) -> None:
    """Make every `Attention` of `model` run Ulysses over `group`: its core op is wrapped in
    `UlyssesAttention` (no parameters move, so the state_dict is unchanged). The caller feeds each
    rank its sequence chunk and its global position ids (`sequence_chunk`)."""
    for module in list(model.modules()):
        if isinstance(module, Attention):
            if isinstance(module.core_attention, UlyssesAttention):
                raise ValueError("apply_sequence_parallel was already applied to this model")
            module.core_attention = UlyssesAttention(module.core_attention, group)

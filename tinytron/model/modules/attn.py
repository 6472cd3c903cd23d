"""Grouped-query causal self-attention on `F.scaled_dot_product_attention`.

Works with no process group. When `sp_group` is set (by
`tinytron.distributed.sequence_parallel.apply_sequence_parallel`), the module receives a sequence
chunk `[B, T/sep, C]` and attention runs over the full sequence through Ulysses all-to-alls: the
model's one seam with sequence parallelism.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tinytron.distributed.sequence_parallel.ulysses import ulysses_attention
from tinytron.model.config import ModelConfig
from tinytron.model.modules.emb import apply_rope


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """q: [B, T, H, D]; k, v: [B, T, Hkv, D] with H % Hkv == 0 -> [B, T, H, D].

    Query head h attends with kv head h // (H / Hkv). SDPA picks flash / memory-efficient kernels on
    CUDA and expands kv heads itself (enable_gqa), so kv is never materialised per query head.
    """
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        # One fused projection for q, k and v: one matmul instead of three.
        self.qkv_proj = nn.Linear(config.hidden_size,
                                  (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.sp_group = None  # sequence-parallel process group, or None for a local sequence

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, T, C] (T = local chunk under sequence parallelism); cos, sin: [B or 1, T, D] for
        the global positions of those tokens -> [B, T, C]."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
             self.num_kv_heads * self.head_dim], dim=-1)
        q = apply_rope(q.view(B, T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        dropout_p = self.dropout if self.training else 0.0
        if self.sp_group is None:
            y = causal_attention(q, k, v, dropout_p)
        else:
            y = ulysses_attention(q, k, v, self.sp_group,
                                  lambda q, k, v: causal_attention(q, k, v, dropout_p))
        return self.resid_dropout(self.o_proj(y.reshape(B, T, -1)))

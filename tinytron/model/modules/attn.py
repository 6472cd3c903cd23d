"""Grouped-query causal self-attention on `F.scaled_dot_product_attention`.

The core op (`CausalAttention`: q, k, v -> attention output, no parameters) is a submodule of its
own so that parallelism can be applied around it without the model knowing:
`tinytron.distributed.sequence_parallel.apply_sequence_parallel` wraps it in Ulysses all-to-alls,
after which `Attention` receives a sequence chunk `[B, T/sep, C]` and still attends over the full
sequence.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tinytron.model.config import ModelConfig
from tinytron.model.modules.emb import apply_rope


class CausalAttention(nn.Module):
    """q: [B, T, H, D]; k, v: [B, T, Hkv, D] with H % Hkv == 0 -> [B, T, H, D], with dropout on the
    attention weights in training mode.

    Query head h attends with kv head h // (H / Hkv). SDPA picks flash / memory-efficient kernels on
    CUDA and expands kv heads itself (enable_gqa), so kv is never materialised per query head.
    """

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0, is_causal=True,
            enable_gqa=q.shape[2] != k.shape[2])
        return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # One fused projection for q, k and v: one matmul instead of three.
        self.qkv_proj = nn.Linear(config.hidden_size,
                                  (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.core_attention = CausalAttention(config.dropout)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

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
        y = self.core_attention(q, k, v)
        return self.resid_dropout(self.o_proj(y.reshape(B, T, -1)))

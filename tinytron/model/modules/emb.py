"""Rotary position embedding (RoPE), half-split rotation as in Llama / GPT-NeoX.

Positions are passed in explicitly, so a rank that holds only a chunk of the sequence (sequence
parallelism) rotates its tokens by their global positions.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # Not persistent: derived from the config, so checkpoints stay free of it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [B or 1, T] integer -> (cos, sin), each [B or 1, T, head_dim] fp32."""
        # fp32 throughout (angles up to T need it): autocast lowers only matmul-like ops, none here.
        angles = position_ids.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B or 1, T, D] -> x rotated, same shape and dtype as x."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)

"""Feed-forward layers: the SwiGLU MLP."""

import torch
import torch.nn.functional as F
from torch import nn

from tinytron.model.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x: [..., C] -> [..., C]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # gate and up fused into one matmul; split in forward.
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.dropout(self.down_proj(F.silu(gate) * up))

"""The GPT model: a pre-norm decoder with RoPE, RMSNorm, GQA attention, SwiGLU and a tied head.

Read top to bottom: `Block` is one layer, `GPT` stacks them. The model knows nothing of data or
parallelism: `tinytron.distributed` wraps or swaps submodules around it (the core attention op,
the MoE expert computation) without changing its parameters.
"""

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinytron.model.config import ModelConfig
from tinytron.model.modules.attn import Attention
from tinytron.model.modules.emb import RotaryEmbedding
from tinytron.model.modules.loss import cross_entropy_loss
from tinytron.model.modules.mlp import MLP, MoE, MoEStats
from tinytron.model.modules.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.use_moe = config.use_moe
        self.mlp = MoE(config) if config.use_moe else MLP(config)
        self.recompute_mlp = False  # set by GPT.set_activation_checkpointing

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, MoEStats | None]:
        """x: [B, T, C] -> ([B, T, C], the MoE layer's statistics or None for a dense MLP)."""
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if self.recompute_mlp and self.training:
            y, stats = checkpoint(self._mlp, x, use_reentrant=False)
        else:
            y, stats = self._mlp(x)
        return x + y, stats

    def _mlp(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        y = self.mlp(self.mlp_norm(x))
        return y if self.use_moe else (y, None)


class GPTOutput(NamedTuple):
    """What `GPT.forward(..., return_aux=True)` returns."""
    logits: torch.Tensor               # [B, T, V]
    aux_loss: torch.Tensor             # scalar fp32: sum over MoE layers of MoEStats.aux_loss (0 if dense)
    expert_load: torch.Tensor | None   # [num_layer, E] int64 (MoEStats.expert_load per layer), or None


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layer))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tied_lm_head:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = "none"
        self.reset_parameters()

    def set_activation_checkpointing(self, mode: str) -> None:
        """Trade compute for memory in training: "none"; "full" recomputes every block in the
        backward pass (only block inputs are kept); "selective" recomputes only the MLP (norm +
        SwiGLU or MoE), whose hidden activations are the largest per token. Results are
        identical (the RNG state is replayed for dropout)."""
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"--activation_checkpointing {mode} is not one of none, full, selective")
        self.activation_checkpointing = mode
        for layer in self.layers:
            layer.recompute_mlp = mode == "selective"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix; the projections that write into the residual
        stream get std / sqrt(2 * num_layer) so the residual variance stays O(1) with depth
        (GPT-2). Norm weights start at 1. Uses the global torch RNG: seed it for reproducibility."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "mlp.down_proj")):
                nn.init.normal_(p, 0.0, residual_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_aux: bool = False):
        """idx: [B, T] token ids; targets: [B, T] (-100 = ignore); position_ids: [B or 1, T]
        (default 0..T-1; a sequence-parallel rank passes its global positions).

        Returns logits [B, T, V], or (logits, loss) when targets are given, loss being the mean
        token cross-entropy over valid targets plus the auxiliary (MoE) loss. With `return_aux`,
        a `GPTOutput` instead (targets unused), for a caller that computes its own loss.
        """
        if position_ids is None:
            position_ids = torch.arange(idx.shape[1], device=idx.device)[None]
        cos, sin = self.rope(position_ids)
        x = self.dropout(self.embed(idx))
        # A tensor even for dense models (callers add it to their loss); zeros fills on the device,
        # no host-to-device copy to wait for.
        aux_loss, expert_load = torch.zeros((), dtype=torch.float32, device=idx.device), []
        for layer in self.layers:
            if self.activation_checkpointing == "full" and self.training:
                x, stats = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x, stats = layer(x, cos, sin)
            if stats is not None:
                aux_loss = aux_loss + stats.aux_loss
                expert_load.append(stats.expert_load)
        logits = self.lm_head(self.norm(x))
        if return_aux:
            return GPTOutput(logits, aux_loss, torch.stack(expert_load) if expert_load else None)
        if targets is None:
            return logits
        return logits, cross_entropy_loss(logits, targets) + aux_loss

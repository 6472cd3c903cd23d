"""The GPT model, in one file to read top to bottom: the losses, RMSNorm, RoPE, grouped-query
attention, the SwiGLU MLP, `Block` (one pre-norm layer) and `GPT` (the stack, with an optionally
tied head). The Mixture-of-Experts layer is in moe.py.

The model knows nothing of data or parallelism: `tinytron.distributed` wraps or swaps submodules
around it (the core attention op, the MoE expert computation) without changing its parameters, so
it runs in a notebook with no process group.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinytron.model.config import ModelConfig
from tinytron.model.document_mask import DocumentMask, document_attention
from tinytron.model.moe import MoE, MoEStats

# Language-model loss: computed in fp32 on logits of any dtype; targets equal to -100 are ignored.
IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits: [B, T, V], targets: [B, T] -> scalar sum of the token losses over valid targets.

    Returning the sum (not the mean) lets a caller divide by a token count taken over more than
    this tensor, e.g. the full sequence when this rank holds one sequence-parallel chunk.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token loss over valid targets (0 when there are none)."""
    return cross_entropy_sum(logits, targets) / (targets != IGNORE_INDEX).sum().clamp(min=1)


# Training's loss without full-vocabulary logits: the head and the cross-entropy together, a chunk
# of tokens at a time. A plain head + `F.cross_entropy` over B x T tokens holds [B*T, V] logits,
# their fp32 copy, the fp32 log-softmax autograd saves and their gradients: GiBs at V = 50k.
# `linear_cross_entropy_sum` computes in forward each chunk's logits, loss and at once the loss's
# gradients w.r.t. the chunk's hidden states and the head weight (softmax - one-hot, times the
# weight or the hidden states), and keeps only those for backward ([N, C] and [V, C]). Same FLOPs
# as the plain head, no recompute. A chunk's fp32 logits are 1024 x V x 4 bytes (197 MiB at
# V = 50304), and its matmuls are still large enough to run at full rate on a GPU.
CHUNK_TOKENS = 1024


def _chunk_loss_and_grads(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor):
    """h: [n, C], weight: [V, C] (both in the matmuls' dtype), t: [n] -> (the chunk's loss sum, its
    gradient w.r.t. h [n, C], and w.r.t. weight [V, C], in the matmuls' dtype). A function of its
    own so that the chunk's logits are freed on return, before the next chunk's are made."""
    logits = F.linear(h, weight)   # [n, V]
    log_probs = torch.log_softmax(logits.float(), dim=-1)   # F.cross_entropy's own kernel
    valid = (t != IGNORE_INDEX)[:, None]
    target = t.clamp(min=0)[:, None]   # any index for ignored rows: they are zeroed below
    loss = -(log_probs.gather(1, target) * valid).sum()
    # d loss / d logits = softmax - one-hot on valid rows, 0 on ignored ones: in place in fp32, the
    # last product stored into the logits' buffer (no longer needed), in their dtype: no cast kernel.
    ones = torch.ones_like(target, dtype=log_probs.dtype)
    grad = torch.mul(log_probs.exp_().scatter_add_(1, target, -ones), valid, out=logits)
    return loss, grad @ weight, grad.t() @ h


class _LinearCrossEntropySum(torch.autograd.Function):
    """hidden: [N, C], weight: [V, C], targets: [N] -> scalar fp32 sum of the token losses of
    hidden @ weight.T over valid targets. Under autocast the matmuls run in its dtype (as the plain
    head's would) and the softmax in fp32; the head's gradient is summed over chunks in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        # No in-place writes into what is saved for backward (torch 2.11's compiler saved such a buffer
        # as before the writes). Operands cast once here (autocast: twice in every chunk; none on meta).
        device = hidden.device.type
        on = device != "meta" and torch.is_autocast_enabled(device)   # autocast knows no meta
        dtype = torch.get_autocast_dtype(device) if on else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        losses, grad_hidden, grad_weight = [], [], None
        for start in range(0, h.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            chunk_loss, chunk_grad_hidden, chunk_grad_weight = _chunk_loss_and_grads(h[rows], w, targets[rows])
            losses.append(chunk_loss)
            grad_hidden.append(chunk_grad_hidden)
            grad_weight = chunk_grad_weight.float() if grad_weight is None else grad_weight + chunk_grad_weight
        loss = torch.stack(losses).sum()
        ctx.save_for_backward(torch.cat(grad_hidden), grad_weight)   # in the matmuls' dtype; fp32
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.reshape(1)   # [1], not 0-dim: an fp32 product, no cast kernel
        return grad_hidden.to(ctx.dtypes[0]), (grad_weight * grad_loss).to(ctx.dtypes[1]), None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """hidden: [B, T, C], weight: [V, C] (the head), targets: [B, T] -> scalar fp32 sum of the token
    losses over valid targets: `cross_entropy_sum(F.linear(hidden, weight), targets)` with at most
    `chunk_tokens` tokens' logits held at once (see above). For training: the gradients are
    computed in forward whether or not backward follows."""
    return _LinearCrossEntropySum.apply(hidden.flatten(0, 1), weight, targets.flatten(), chunk_tokens)


# RMSNorm computed in fp32 (bf16 mean-of-squares loses too much precision).
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] in any dtype -> same shape and dtype."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# Rotary position embedding (RoPE), half-split rotation as in Llama / GPT-NeoX. Positions are passed
# in explicitly, so a rank that holds only a chunk of the sequence (sequence parallelism) rotates its
# tokens by their global positions.
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


# RoPE and SwiGLU with hand-written backward passes, so that eager PyTorch runs them without cast or
# copy kernels (benchmarks/casts.py): each half of a result is one op computing in fp32, stored in x's
# dtype into its half of the output (`out=`). Compiled, the plain formulas (the compiler fuses them).
def _rotate(x: torch.Tensor, c1, c2, s1, s2) -> torch.Tensor:
    """x: [..., D] with halves x1, x2; fp32 table halves -> (x1 c1 - x2 s1, x2 c2 + x1 s2), x's dtype."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.sub(x1 * c1, x2 * s1, out=out[..., :h])
    torch.add(x2 * c2, x1 * s2, out=out[..., h:])
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        tables = (*cos.chunk(2, dim=-1), *sin.chunk(2, dim=-1))
        ctx.save_for_backward(*tables)
        return _rotate(x, *tables)

    @staticmethod
    def backward(ctx, grad):   # the transposed rotation: (g1 c1 + g2 s2, g2 c2 - g1 s1), same bits
        c1, c2, s1, s2 = ctx.saved_tensors
        return _rotate(grad, c1, c2, -s2, -s1), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B or 1, T, D] fp32 -> x rotated in fp32, x's shape and dtype."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if torch.compiler.is_compiling():
        x1, x2 = x.float().chunk(2, dim=-1)
        return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)
    return _Rope.apply(x, cos, sin)


class _SwiGLU(torch.autograd.Function):
    """gate_up: [..., 2I] (the fused gate and up projections' output) -> silu(gate) * up, [..., I]."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)   # what autograd of the plain formula keeps
        return act * up

    @staticmethod
    def backward(ctx, grad):   # autograd's kernels for the plain formula
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=out[..., :gate.shape[-1]])
        torch.mul(grad, act, out=out[..., gate.shape[-1]:])
        return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():   # torch 2.11's compiler cannot trace _SwiGLU
        return F.silu(gate_up.chunk(2, dim=-1)[0]) * gate_up.chunk(2, dim=-1)[1]
    return _SwiGLU.apply(gate_up)


# Attention on F.scaled_dot_product_attention. The core op (`CausalAttention`: q, k, v -> output, no
# parameters) is a submodule of its own so that parallelism can be applied around it without the
# model knowing: `tinytron.distributed.sequence_parallel.apply_sequence_parallel` wraps it in Ulysses
# all-to-alls, after which `Attention` receives a sequence chunk [B, T/sep, C] and still attends
# over the full sequence.
class CausalAttention(nn.Module):
    """q: [B, T, H, D]; k, v: [B, T, Hkv, D] with H % Hkv == 0 -> [B, T, H, D], with dropout on the
    attention weights in training mode.

    Query head h attends with kv head h // (H / Hkv). SDPA picks flash / memory-efficient kernels on
    CUDA and expands kv heads itself (enable_gqa), so kv is never materialised per query head.
    With a `DocumentMask` over the T tokens (document_mask.py), attention also stays inside each
    document.
    """

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_mask: DocumentMask | None = None) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        if document_mask is not None:
            return document_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      document_mask, dropout_p).transpose(1, 2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=dropout_p, is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_mask: DocumentMask | None = None) -> torch.Tensor:
        """x: [B, T, C] (T = local chunk under sequence parallelism); cos, sin: [B or 1, T, D] for
        the global positions of those tokens; document_mask over the full sequences -> [B, T, C]."""
        (B, T, _), H, Kv, D = x.shape, self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, Kv * D, Kv * D], dim=-1)
        q = apply_rope(q.view(B, T, H, D), cos, sin)
        k = apply_rope(k.view(B, T, Kv, D), cos, sin)
        v = v.view(B, T, Kv, D)
        y = self.core_attention(q, k, v, document_mask)
        return self.resid_dropout(self.o_proj(y.reshape(B, T, -1)))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x: [..., C] -> [..., C]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # gate and up fused into one matmul; split in forward.
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(swiglu(self.gate_up_proj(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.use_moe = config.use_moe
        self.mlp = MoE(config) if config.use_moe else MLP(config)
        self.recompute_mlp = False  # set by GPT.set_activation_checkpointing

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_mask: DocumentMask | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        """x: [B, T, C] -> ([B, T, C], the MoE layer's statistics or None for a dense MLP)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, document_mask)
        if self.recompute_mlp and self.training:
            y, stats = checkpoint(self._mlp, x, use_reentrant=False)
        else:
            y, stats = self._mlp(x)
        return x + y, stats

    def _mlp(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        y = self.mlp(self.mlp_norm(x))
        return y if self.use_moe else (y, None)


class LMHead(nn.Linear):
    """The output head (a bias-free nn.Linear, called as a module so that the hooks of parallel
    wrappers run): x: [B, T, C] -> logits [B, T, V]; with targets [B, T], the scalar fp32 sum of
    the token losses instead, computed by linear_cross_entropy_sum without [B, T, V] logits."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy_sum(x, self.weight, targets)


class GPTOutput(NamedTuple):
    """What `GPT.forward(..., return_aux=True)` returns."""
    logits: torch.Tensor | None        # [B, T, V]; None in training with targets (not materialised)
    aux_loss: torch.Tensor             # scalar fp32: sum over MoE layers of MoEStats.aux_loss (0 if dense)
    expert_load: torch.Tensor | None   # [num_layer, E] int64 (MoEStats.expert_load per layer), or None
    loss_sum: torch.Tensor | None      # scalar fp32: sum of the token losses over valid targets, or None


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
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
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
                position_ids: torch.Tensor | None = None, return_aux: bool = False,
                document_mask: DocumentMask | None = None):
        """idx: [B, T] token ids; targets: [B, T] (-100 = ignore); position_ids: [B or 1, T]
        (default 0..T-1; a sequence-parallel rank passes its global positions); document_mask:
        attention only inside documents (document_mask.py; None: plain causal), built over the
        FULL sequences, also when idx is a sequence-parallel chunk of them.

        Returns logits [B, T, V], or (logits, loss) with targets, loss being the mean token
        cross-entropy over valid targets plus the auxiliary (MoE) loss. In training mode with targets
        the loss is computed by chunks without full-vocabulary logits (linear_cross_entropy_sum) and
        logits is None. With `return_aux`, a `GPTOutput` instead, with the loss's sum over tokens
        (for a caller dividing by its own token count, e.g. over all sequence-parallel chunks)."""
        if position_ids is None:
            position_ids = torch.arange(idx.shape[1], device=idx.device)[None]
        cos, sin = self.rope(position_ids)
        x = self.dropout(self.embed(idx))
        # A tensor even for dense models (callers add it to their loss); zeros fills on the device,
        # no host-to-device copy to wait for.
        aux_loss, expert_load = torch.zeros((), dtype=torch.float32, device=idx.device), []
        for layer in self.layers:
            if self.activation_checkpointing == "full" and self.training:
                x, stats = checkpoint(layer, x, cos, sin, document_mask, use_reentrant=False)
            else:
                x, stats = layer(x, cos, sin, document_mask)
            if stats is not None:
                aux_loss = aux_loss + stats.aux_loss
                expert_load.append(stats.expert_load)
        x = self.norm(x)
        if targets is not None and self.training:   # no [B, T, V] logits in training
            logits, loss_sum = None, self.lm_head(x, targets)
        else:   # evaluation and generation: the full logits
            logits = self.lm_head(x)
            loss_sum = None if targets is None else cross_entropy_sum(logits, targets)
        if return_aux:
            return GPTOutput(logits, aux_loss, torch.stack(expert_load) if expert_load else None, loss_sum)
        if targets is None:
            return logits
        return logits, loss_sum / (targets != IGNORE_INDEX).sum().clamp(min=1) + aux_loss

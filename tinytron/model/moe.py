"""The dropless Mixture-of-Experts (MoE) layer: a fp32 top-k router, SwiGLU experts stacked in
two tensors, and the sequence-wise load-balancing loss.

The expert computation (`Experts`: rows sorted by expert -> expert outputs, and the routing counts
per sequence; no parameters) is a submodule of its own so that expert parallelism can be applied
around it without the model knowing: `tinytron.distributed.expert_parallel.apply_expert_parallel`
keeps this rank's slice of the expert weights and swaps `Experts` for a module that sends every row
to the rank holding its expert and back.
"""


import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tinytron.model.config import ModelConfig


def route(logits: torch.Tensor, k: int, softmax_before_topk: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits: [N, E] fp32 -> (weights [N, k], experts [N, k] int64, probs [N, E]).

    probs is the softmax over all experts (what the load-balancing loss averages). The weights are
    the softmax over the k selected logits, or with `softmax_before_topk` the top-k of probs
    renormalised to sum to 1 (Mixtral / Qwen3-MoE with norm_topk_prob). The two are the same
    numbers in exact arithmetic, exp(l_i) / sum_{j in top-k} exp(l_j), and pick the same experts
    (softmax is monotonic), so the flag changes only rounding (and tie-breaking between logits
    whose probabilities round equal); the aux loss uses the full softmax either way.
    """
    probs = logits.softmax(dim=-1)
    if softmax_before_topk:
        top_probs, experts = probs.topk(k, dim=-1)
        weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    else:
        top_logits, experts = logits.topk(k, dim=-1)
        weights = top_logits.softmax(dim=-1)
    return weights, experts, probs


def swiglu_experts_looped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                          counts: list[int]) -> torch.Tensor:
    """x: [M, C] rows sorted by expert, counts[e] rows for expert e; gate_up: [E, C, 2I];
    down: [E, I, C] -> [M, C]. One pair of matmuls per expert on its contiguous slice."""
    out = []
    for e, xe in enumerate(x.split(counts)):
        gate, up = (xe @ gate_up[e]).chunk(2, dim=-1)
        out.append((F.silu(gate) * up) @ down[e])
    return torch.cat(out)


def swiglu_experts_grouped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                           counts: torch.Tensor) -> torch.Tensor:
    """Same as `swiglu_experts_looped` with counts as an int64 tensor on x's device: two grouped
    matmuls for all experts, no host sync."""
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
    gate, up = F.grouped_mm(x, gate_up, offs=offs).chunk(2, dim=-1)
    return F.grouped_mm(F.silu(gate) * up, down, offs=offs)


def _grouped_mm_supported(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Grouped GEMM kernels: bf16 on CUDA sm90+, every row (C, 2I, I wide) a multiple of 16 bytes
    (F.grouped_mm, torch 2.9+). It also runs on CPU, but there the per-expert loop is the default."""
    return (hasattr(F, "grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and all(d * x.element_size() % 16 == 0 for d in (*gate_up.shape[1:], down.shape[1])))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in (the experts cast explicitly: grouped_mm is not
    covered by autocast everywhere, and both expert paths must see the same inputs)."""
    device = x.device.type
    on = device != "meta" and torch.is_autocast_enabled(device)   # autocast knows no meta
    return torch.get_autocast_dtype(device) if on else x.dtype


def swiglu_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor,
                   counts_host: list[int] | None = None) -> torch.Tensor:
    """x: [M, C] sorted by expert; gate_up: [E, C, 2I], down: [E, I, C]: the weights of the E
    experts the rows go to (cast to x's dtype here); counts: [E] int64 on x's device; counts_host:
    the same as a list when already on the host (else the per-expert loop reads it: a host sync)
    -> [M, C]. Grouped GEMMs where supported, else one pair of matmuls per expert."""
    gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
    if _grouped_mm_supported(x, gate_up, down):
        return swiglu_experts_grouped(x, gate_up, down, counts)
    return swiglu_experts_looped(x, gate_up, down, counts.tolist() if counts_host is None else counts_host)


class Experts(nn.Module):
    """The expert computation of an MoE layer with all experts in this process (no parameters: the
    layer owns the weights and passes them, so they keep their names in the state_dict).

    forward(x [M, C] this process's (token, slot) rows sorted by expert, seq_counts [B, E] int64
    its rows per (sequence, expert), gate_up [E, C, 2I], down [E, I, C])
    -> (y [M, C] the expert outputs in x's order, seq_counts [B, E] over all the tokens of the B
    sequences: here this process holds them all, so the input itself).
    """

    def forward(self, x: torch.Tensor, seq_counts: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return swiglu_experts(x, gate_up, down, seq_counts.sum(dim=0)), seq_counts


class MoEStats(NamedTuple):
    """What an MoE layer's forward returns next to its output."""
    aux_loss: torch.Tensor     # scalar fp32: this rank's share of the load-balancing (+ z-) loss
    expert_load: torch.Tensor  # [E] int64, no grad: assignments per expert over the EP group


class MoE(nn.Module):
    """Dropless top-k Mixture of SwiGLU experts. x: [B, T, C] -> (out [B, T, C], MoEStats).

    Router: fp32 linear C -> E (autocast off), top-k experts per token (`route`). Experts are
    stacked: gate_up_proj [E_local, C, 2I], down_proj [E_local, I, C], marked `is_expert` (their
    gradients are complete within the EP group: the optimizer reduces them over DP only). The layer
    is built with all E experts; `apply_expert_parallel` keeps this rank's slice and swaps the
    `experts` submodule, after which tokens travel to their experts' ranks (the EP = SEP group).

    MoEStats of each forward:
      aux_loss: scalar, this rank's share of the load-balancing (+ z-) loss of the micro-batch.
        The statistics of a sequence are taken over all its tokens, which the EP (= SEP) group
        holds in chunks, and every rank holds the part coming from its own tokens, so the SUM over
        the group is the loss of the layer run on the full sequences in one process, and so are
        the summed gradients (the trainer sums gradients over SEP). To log the full value,
        all-reduce (SUM) it over the SEP group.
      expert_load: [E] int64, detached, assignments per expert over the whole EP group.
    Sequence-wise balance loss (DeepSeek-V3) with the Switch / Mixtral normalisation, the mean over
    the B sequences of the micro-batch:
      aux = alpha * E / B * sum_b sum_i f_bi * P_bi,  f_bi = share of sequence b's T * k
      (token, slot) assignments sent to expert i,  P_bi = mean over b's T tokens of softmax prob i;
      z-loss = beta * mean over all tokens of logsumexp(logits)^2 (ST-MoE).
    Per sequence, not per micro-batch: the statistics then do not depend on how sequences are
    grouped into micro-batches or ranks (--batch_size, DP, SEP), and the trainer's mean over
    micro-batches and DP ranks is the mean over the global batch's sequences. The aux loss equals
    alpha under uniform routing. P uses the full softmax in both routing modes: with the top-k
    weights instead, P would equal f for top-1 (weights all 1) and the loss would have no gradient.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.softmax_before_topk = config.moe_router_softmax_before_topk
        self.aux_loss_coeff = config.moe_aux_loss_coeff
        self.z_loss_coeff = config.moe_z_loss_coeff
        C, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.router = nn.Linear(C, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(E, C, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, C))
        self.gate_up_proj.is_expert = self.down_proj.is_expert = True
        self.experts = Experts()
        self.dropout = nn.Dropout(config.dropout)
        # Same rule as GPT.reset_parameters (which redoes it by name inside a GPT): the down
        # projection writes into the residual stream.
        with torch.no_grad():
            nn.init.normal_(self.router.weight, 0.0, config.init_std)
            nn.init.normal_(self.gate_up_proj, 0.0, config.init_std)
            nn.init.normal_(self.down_proj, 0.0, config.init_std / math.sqrt(2 * config.num_layer))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, T, C = x.shape
        k, E = self.top_k, self.num_experts
        with torch.autocast(x.device.type, enabled=False):
            # Through the module (fp32 weights): a wrapper around the router (FSDP) sees it run.
            logits = self.router(x.reshape(-1, C).float())                             # [N, E]
        weights, experts, probs = route(logits, k, self.softmax_before_topk)

        # Sort the N * k (token, slot) assignments by expert; they are then also grouped by the
        # EP rank that owns the expert. scatter_add, not bincount: no host sync on CUDA.
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)
        # Assignments per (sequence, expert), [B, E]: the balance statistics are per sequence.
        seq_of = torch.arange(B, device=x.device).repeat_interleave(T * k)
        seq_counts = torch.zeros(B * E, dtype=torch.int64, device=x.device).scatter_add_(
            0, seq_of * E + flat_experts, torch.ones_like(flat_experts)).view(B, E)
        x_sorted = x.reshape(-1, C).to(_compute_dtype(x))[order // k]                   # [N*k, C]
        y_sorted, seq_counts = self.experts(x_sorted, seq_counts, self.gate_up_proj, self.down_proj)
        # Back to (token, slot) order, then the routing-weighted sum over the k slots, in fp32.
        y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted).view(-1, k, C)
        out = (y.float() * weights.unsqueeze(-1)).sum(dim=1).to(y.dtype)

        aux_loss = self._load_balancing(logits.view(B, T, E), probs.view(B, T, E), seq_counts)
        return self.dropout(out.view(B, T, C)), MoEStats(aux_loss, seq_counts.sum(dim=0))

    def _load_balancing(self, logits: torch.Tensor, probs: torch.Tensor, seq_counts: torch.Tensor
                        ) -> torch.Tensor:
        """logits, probs: [B, T, E] fp32 of this rank's tokens (its chunk of B sequences);
        seq_counts: [B, E] assignments per sequence over all the chunks (the EP group's ranks hold
        chunks of the same B sequences). Returns this rank's share of the aux loss."""
        B, E = seq_counts.shape
        seq_len = seq_counts.sum(dim=1, keepdim=True) / self.top_k   # [B, 1] full sequence length
        f = seq_counts / (seq_len * self.top_k)    # no gradient: counts are integers
        # P_bi over the group = (sum of every rank's prob sums) / seq_len: each rank contributes
        # its own sum, so the gradient reaches exactly the logits of its own tokens.
        p_sum = probs.sum(dim=1)                   # [B, E]
        aux = self.aux_loss_coeff * E * (f * p_sum / seq_len).sum() / B
        if self.z_loss_coeff:
            aux = aux + self.z_loss_coeff * (logits.logsumexp(dim=-1).square().sum(dim=1)
                                             / seq_len.squeeze(1)).sum() / B
        return aux

"""The analytic FLOPs per token (tinytron.utils.profile.flops_per_token) against torch's
FlopCounterMode on a real forward + backward of GPT.

The formula counts exactly the matmuls the model runs, so it must equal the counter up to float
rounding (asserted at rel 1e-9, far inside the 2% one would accept for an estimate). The counter
counts full (non-causal) attention, so it is compared with causal=False; the causal count is
checked separately against the pairs a causal mask keeps.
"""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tinytron.model import ModelConfig
from tinytron.model.moe import swiglu_experts_grouped, swiglu_experts_looped
from tinytron.utils.profile import counted_flops_per_token, flops_per_token, mfu, model_flop_counter

SEQ, BATCH = 32, 2
DENSE = ModelConfig(block_size=SEQ, vocab_size=256, num_layer=2, num_attention_heads=4,
                    num_key_value_heads=4, hidden_size=64, intermediate_size=96)
CONFIGS = {
    "dense_mha": DENSE,
    "gqa": dataclasses.replace(DENSE, num_key_value_heads=2),
    "moe_top2": dataclasses.replace(DENSE, num_key_value_heads=2, use_moe=True, num_experts=4,
                                    num_experts_per_tok=2, moe_intermediate_size=48, tied_lm_head=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_formula_equals_counter(name):
    """CPU run: matmuls counted by torch's formulas, the CPU flash-attention ops by ours. For MoE
    the per-expert loop runs exactly N * k routed rows through the experts."""
    config = CONFIGS[name]
    counted = counted_flops_per_token(config, SEQ, BATCH, model_flop_counter())
    assert counted == pytest.approx(flops_per_token(config, SEQ, causal=False), rel=1e-9)


@pytest.mark.parametrize("name", ["dense_mha", "gqa"])
def test_formula_equals_plain_counter_on_meta(name):
    """Meta device: SDPA runs as its math decomposition (bmm), which plain FlopCounterMode counts
    with torch's own formula: an independent check of the attention term (and of the CPU
    flash-attention counts above, which must agree with it)."""
    config = CONFIGS[name]
    plain = counted_flops_per_token(config, SEQ, BATCH, FlopCounterMode(display=False), "meta")
    assert plain == pytest.approx(flops_per_token(config, SEQ, causal=False), rel=1e-9)
    assert plain == pytest.approx(counted_flops_per_token(config, SEQ, BATCH, model_flop_counter()), rel=1e-9)


def test_causal_count_keeps_only_masked_in_pairs():
    """causal=True removes from the full count the (query, key) pairs a causal mask drops:
    4 * D FLOPs forward per pair and head (QK^T and AV), x 3 for training."""
    config = CONFIGS["gqa"]
    dropped_pairs_per_token = (1 - torch.ones(SEQ, SEQ).tril()).sum().item() / SEQ
    dropped = 3 * config.num_layer * config.num_attention_heads * 4 * config.head_dim * dropped_pairs_per_token
    assert flops_per_token(config, SEQ) == pytest.approx(
        flops_per_token(config, SEQ, causal=False) - dropped, rel=1e-12)


def test_grouped_mm_counted_like_the_loop():
    """The grouped-GEMM expert path (aten._grouped_mm, which torch does not count) counts the same
    FLOPs as the per-expert loop: 3 matmuls of 2 * M * C * I forward, x 3 with backward; an expert
    with no tokens counts nothing."""
    M, C, I, E = 10, 16, 8, 3
    x = torch.randn(M, C, requires_grad=True)
    gate_up, down = torch.randn(E, C, 2 * I, requires_grad=True), torch.randn(E, I, C, requires_grad=True)
    counts = torch.tensor([3, 0, 7])
    for experts, c in ((swiglu_experts_grouped, counts), (swiglu_experts_looped, counts.tolist())):
        with model_flop_counter() as counter:
            y = experts(x, gate_up, down, c)
            y.backward(torch.randn_like(y))  # a dense gradient: grouped_mm rejects expanded ones
        assert counter.get_total_flops() == 3 * 3 * 2 * M * C * I, experts.__name__


def test_mfu():
    assert mfu(1000.0, 6e9, None) is None
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)


def test_gqa_attention_kernels_counted_per_query_head():
    """The CUDA SDPA kernels receive GQA key/value heads unexpanded (enable_gqa); the counter must
    count them as torch's formula counts the same attention with the heads repeated."""
    from torch.utils.flop_counter import sdpa_flop_count
    q, kv = torch.empty(2, 8, 64, 16, device="meta"), torch.empty(2, 2, 64, 16, device="meta")
    expected = sdpa_flop_count(q.shape, q.shape, q.shape)  # the kv heads repeated to 8
    mapping = model_flop_counter().flop_registry
    aten = torch.ops.aten
    for op in (aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
               aten._scaled_dot_product_cudnn_attention):
        assert mapping[op](q, kv, kv, out_val=None) == expected

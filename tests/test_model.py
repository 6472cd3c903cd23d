"""Model-level tests: shapes, causality, GQA vs MHA, RoPE positions, config validation. No
process group anywhere: the model must work as a plain library."""

import dataclasses

import pytest
import torch

from tests.utils import TINY_MODEL as TINY
from tinytron.model import GPT
from tinytron.model.gpt import Attention, apply_rope, cross_entropy_sum, swiglu


def build(cfg=TINY, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def test_shapes_and_loss():
    model = build()
    idx = torch.randint(0, TINY.vocab_size, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, TINY.vocab_size)
    logits2, loss = model(idx, targets=idx)
    torch.testing.assert_close(logits, logits2)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    torch.testing.assert_close(loss, ref)
    # Ignored targets do not count.
    targets = idx.clone()
    targets[:, :8] = -100
    _, masked = model(idx, targets=targets)
    ref = torch.nn.functional.cross_entropy(logits[:, 8:].flatten(0, 1), idx[:, 8:].flatten())
    torch.testing.assert_close(masked, ref)


def test_causal_masking():
    """Changing token t never changes the logits before t."""
    model = build()
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_gqa_equals_mha_with_repeated_kv():
    gqa = build()
    mha_cfg = dataclasses.replace(TINY, num_key_value_heads=TINY.num_attention_heads)
    mha = build(mha_cfg, seed=1)
    hd, h, kv = TINY.head_dim, TINY.num_attention_heads, TINY.num_key_value_heads
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith("qkv_proj.weight"):
            q, k, v = w.split([h * hd, kv * hd, kv * hd])
            def rep(x):
                return x.view(kv, hd, -1).repeat_interleave(h // kv, dim=0).reshape(h * hd, -1)
            state[name] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    torch.testing.assert_close(mha(idx), gqa(idx), rtol=1e-5, atol=1e-6)


def test_position_ids_are_rope_positions():
    """What sequence parallelism relies on: a chunk's rotary tables from its global positions are
    that chunk of the full sequence's tables, so the gathered chunks are the full sequence's
    rotated q and k. Attention then depends on relative positions only: a uniform shift of all
    positions changes the output by rounding alone, a shift that changes relative positions (a gap
    before the second half) changes it for real. Default positions are 0..T-1."""
    model = build(dataclasses.replace(TINY, init_std=0.1))  # attention far from uniform
    cos, sin = model.rope(torch.arange(16)[None])
    cos_chunk, sin_chunk = model.rope(torch.arange(8, 16)[None])
    assert torch.equal(cos_chunk, cos[:, 8:]) and torch.equal(sin_chunk, sin[:, 8:])

    idx = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    base = model(idx)
    assert torch.equal(base, model(idx, position_ids=torch.arange(16)[None]))
    torch.testing.assert_close(model(idx, position_ids=torch.arange(5, 21)[None]), base,
                               rtol=1e-4, atol=1e-5)
    gap = torch.cat((torch.arange(8), torch.arange(8) + 12))[None]
    out = model(idx, position_ids=gap)
    torch.testing.assert_close(out[:, :8], base[:, :8], rtol=1e-4, atol=1e-5)  # sees no gap
    assert (out[:, 8:] - base[:, 8:]).abs().max() > 0.1  # measured 0.37; the shift: 1e-6


def test_fp32_parts_under_bf16_autocast():
    """--precision bf16 autocasts the matmuls, but RMSNorm, RoPE, the MoE router and the loss run
    in fp32: each equals its explicit fp32 computation bitwise (a bf16 computation would not), on
    the inputs it gets in the model; the matmuls themselves do run in bf16 (not vacuous)."""
    cfg = dataclasses.replace(TINY, use_moe=True, num_experts=4, moe_intermediate_size=32,
                              moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    model = build(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, cfg.hidden_size, generator=g)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    norm, xb = model.layers[0].attn_norm, x.bfloat16()  # a bf16 input, normalised in fp32
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    with autocast():
        out = norm(xb)
    xf = xb.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).bfloat16()
    assert out.dtype == torch.float32 and torch.equal(out, expected)

    positions = torch.arange(100, 116)[None]
    with autocast():
        cos, sin = model.rope(positions)
    angles = (positions[..., None].float() * model.rope.inv_freq).double()  # fp32 angles, exact cos
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos, torch.cat((angles, angles), -1).cos().float(), rtol=0, atol=1e-6)

    moe = model.layers[0].mlp  # routing statistics depend only on the router's logits
    _, (aux, load) = moe(x)
    with autocast():
        out, stats = moe(x)
    assert out.dtype == torch.bfloat16  # the experts ran in bf16
    assert torch.equal(stats.aux_loss, aux) and torch.equal(stats.expert_load, load)

    logits = torch.randn(2, 16, cfg.vocab_size, generator=g).bfloat16()
    targets = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    with autocast():
        loss = cross_entropy_sum(logits, targets)
        assert model.lm_head(x).dtype == torch.bfloat16
    expected = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)


def _value_and_grad(fn, x, grad, *args):
    x = x.detach().requires_grad_()
    y = fn(x, *args)
    return y.detach(), torch.autograd.grad(y, x, grad)[0]


def _plain_rope(x, cos, sin):   # the formula autograd differentiated before
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos[:, :, None] + torch.cat((-x2, x1), dim=-1) * sin[:, :, None]).to(x.dtype)


def _plain_swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def test_fused_rope_and_swiglu_equal_the_plain_formulas():
    """apply_rope and swiglu (model/gpt.py: hand-written backward passes, no cast or copy
    kernels) against autograd of the plain formulas, on a strided q view as the model passes and
    tables whose halves differ (a mixed-up half shows): fp32 values and gradients bitwise; bf16
    values bitwise, and RoPE's gradient is the fp32 gradient of the bf16 upstream gradient rounded
    once (the plain formula rounds its two terms apart and adds them in bf16: not bitwise);
    swiglu's bf16 gradient bitwise (the same kernels)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 8, 6, 16, generator=g)
    cos, sin = torch.randn(2, 1, 8, 16, generator=g).unbind(0)   # [1, T, D], not a rotation: any table
    rope_grad = torch.randn(2, 8, 4, 16, generator=g)
    gate_up, act_grad = torch.randn(3, 8, 40, generator=g), torch.randn(3, 8, 20, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        x = qkv.to(dtype)[:, :, :4]   # q of a fused projection: not contiguous
        y, dx = _value_and_grad(apply_rope, x, rope_grad.to(dtype), cos, sin)
        ref, ref_dx = _value_and_grad(_plain_rope, x, rope_grad.to(dtype), cos, sin)
        assert y.dtype == dx.dtype == dtype and torch.equal(y, ref), dtype
        if dtype == torch.bfloat16:
            ref_dx = _value_and_grad(_plain_rope, x.float(), rope_grad.to(dtype).float(), cos, sin)[1].to(dtype)
        assert torch.equal(dx, ref_dx), dtype
        assert torch.equal(_value_and_grad(swiglu, gate_up.to(dtype), act_grad.to(dtype))[1],
                           _value_and_grad(_plain_swiglu, gate_up.to(dtype), act_grad.to(dtype))[1])
        assert torch.equal(swiglu(gate_up.to(dtype)), _plain_swiglu(gate_up.to(dtype)))


def test_attention_module_standalone():
    torch.manual_seed(0)
    attn = Attention(TINY)
    x = torch.randn(2, 8, TINY.hidden_size)
    cos, sin = build().rope(torch.arange(8)[None])
    assert attn(x, cos, sin).shape == x.shape


@pytest.mark.parametrize("changes, flag", [
    ({"hidden_size": 30}, "--hidden_size 30 is not divisible by --num_attention_heads 4"),
    ({"num_key_value_heads": 3}, "--num_attention_heads 4 is not divisible by --num_key_value_heads 3"),
    ({"use_moe": True, "num_experts_per_tok": 9}, "--num_experts_per_tok 9"),
])
def test_bad_config(changes, flag):
    with pytest.raises(ValueError, match=flag):
        GPT(dataclasses.replace(TINY, **changes))


def test_init_is_seeded_and_residual_scaled():
    a, b = build(seed=3), build(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    std = a.layers[0].mlp.down_proj.weight.std().item()
    assert abs(std - TINY.init_std / (2 * TINY.num_layer) ** 0.5) < 0.003
    assert a.lm_head.weight is a.embed.weight

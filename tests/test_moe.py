"""Mixture of Experts: the layer against a naive per-token reference, the grouped-GEMM path against
the per-expert loop, expert parallelism over 2 and 4 gloo ranks against the single-process layer,
and the analytic parameter count against built models. All fp32 on CPU.

Tolerance: max|a - b| <= 1e-5 * max|b| per tensor (scalars: relative). Both sides do the same fp32
math on the same tokens with the same experts; only summation order differs (matmuls of other
shapes, the router gradient summed over ranks, the aux loss split into per-rank shares), i.e. a
few fp32 ulp (~1e-7). A token sent to the wrong expert or rank, a wrong weight, or a gradient
counted twice gives errors of order 1.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.dist_helper import run_distributed
from tests.utils import max_rel as _rel
from tinytron.distributed.expert_parallel import apply_expert_parallel
from tinytron.distributed.parallel_state import get_sep_group, get_sep_rank, initialize_parallel_state
from tinytron.distributed.sequence_parallel import apply_sequence_parallel, sequence_chunk
from tinytron.model import GPT, ModelConfig
from tinytron.model.gpt import cross_entropy_sum
from tinytron.model.moe import MoE, swiglu_experts_grouped, swiglu_experts_looped
from tinytron.utils import count_parameters

TOL = 1e-5
B, T_LOCAL, C, I = 2, 6, 16, 8  # C, 2I, I multiples of 4: fp32 grouped_mm needs 16-byte rows


def _config(num_experts: int = 4, top_k: int = 2, **kw) -> ModelConfig:
    kw = dict(dict(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01), **kw)
    return ModelConfig(block_size=64, vocab_size=64, num_layer=2, num_attention_heads=4,
                       num_key_value_heads=2, hidden_size=C, intermediate_size=32, use_moe=True,
                       num_experts=num_experts, num_experts_per_tok=top_k,
                       moe_intermediate_size=I, init_std=0.2, **kw)


def _layer(config: ModelConfig, starve: range = range(0)) -> MoE:
    """A seeded layer. The router gets std 0.5 so routing decisions have wide margins (no near-tie
    that an ulp could flip between layouts); experts in `starve` get logit -10 * x[..., 0] < -20,
    so no token picks them (inputs have x[..., 0] >= 2)."""
    torch.manual_seed(0)
    layer = MoE(config)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
        layer.router.weight[starve] = 0.0
        layer.router.weight[starve, 0] = -10.0
    return layer


def _inputs(num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and an upstream gradient, [B, T_LOCAL * num_chunks, C]; chunk r is EP rank r's tokens."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T_LOCAL * num_chunks, C, generator=g)
    x[..., 0] = 2.0 + torch.rand(B, T_LOCAL * num_chunks, generator=g)
    return x, torch.randn(x.shape, generator=g)


# ---------------------------------------------------------------- single process


def _naive_moe(layer: MoE, x: torch.Tensor, config: ModelConfig):
    """Token by token, from the definitions: returns (out [N, C], aux loss)."""
    E, k = config.num_experts, config.num_experts_per_tok
    xs = x.reshape(-1, C)
    logits = xs @ layer.router.weight.T
    probs = logits.softmax(-1)
    out, counts = [], torch.zeros(x.shape[0], E)  # per sequence
    for n in range(xs.shape[0]):
        chosen = sorted(range(E), key=lambda e: -logits[n, e].item())[:k]
        w = logits[n, chosen].exp() / logits[n, chosen].exp().sum()
        y = 0
        for j, e in enumerate(chosen):
            gate, up = (xs[n] @ layer.gate_up_proj[e]).chunk(2)
            y = y + w[j] * ((F.silu(gate) * up) @ layer.down_proj[e])
            counts[n // x.shape[1], e] += 1
        out.append(y)
    # Sequence-wise balance: f and P of each sequence, then the mean over sequences.
    f = counts / counts.sum(1, keepdim=True)
    P = probs.view(x.shape[0], x.shape[1], E).mean(1)
    aux = config.moe_aux_loss_coeff * E * (f * P).sum(1).mean()
    aux = aux + config.moe_z_loss_coeff * logits.logsumexp(-1).square().mean()
    return torch.stack(out), aux, counts.sum(0)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("softmax_before_topk", [False, True])
def test_moe_matches_naive_reference(top_k, softmax_before_topk):
    config = _config(top_k=top_k, moe_router_softmax_before_topk=softmax_before_topk)
    x, g = _inputs(2)
    layer, naive = _layer(config), _layer(config)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, stats = layer(xa)
    ref, ref_aux, ref_counts = _naive_moe(naive, xb, config)
    assert _rel(out.reshape(-1, C), ref) < TOL
    assert abs(stats.aux_loss.item() - ref_aux.item()) < TOL * abs(ref_aux.item())
    assert torch.equal(stats.expert_load, ref_counts.long())
    ((out * g).sum() + stats.aux_loss).backward()
    ((ref * g.reshape(-1, C)).sum() + ref_aux).backward()
    assert _rel(xa.grad, xb.grad) < TOL
    for name in ("router.weight", "gate_up_proj", "down_proj"):
        assert _rel(layer.get_parameter(name).grad, naive.get_parameter(name).grad) < TOL, name


def test_grouped_mm_matches_loop():
    """F.grouped_mm runs on CPU in fp32 (torch 2.13): check it against the per-expert loop that
    the CPU path uses, forward and backward, with empty experts (first, middle, last)."""
    if not hasattr(F, "grouped_mm"):
        pytest.fail("torch has no F.grouped_mm")
    g = torch.Generator().manual_seed(0)
    counts = [0, 5, 0, 7, 3, 0]
    x = torch.randn(sum(counts), C, generator=g)
    gate_up, down = torch.randn(6, C, 2 * I, generator=g), torch.randn(6, I, C, generator=g)
    grad = torch.randn(sum(counts), C, generator=g)
    results = []
    for grouped in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, gate_up, down)]
        y = (swiglu_experts_grouped(*leaves, torch.tensor(counts)) if grouped
             else swiglu_experts_looped(*leaves, counts))
        y.backward(grad)
        results.append([y] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert _rel(a, b) < TOL


def test_bad_config_errors():
    with pytest.raises(ValueError, match=r"--num_experts_per_tok 5 must be in \[1, --num_experts 4\]"):
        MoE(_config(num_experts=4, top_k=5))


def test_expert_init_follows_gpt_rule():
    """GPT.reset_parameters gives the expert down projection the residual std, like down_proj."""
    config = _config(num_experts=8)
    torch.manual_seed(0)
    model = GPT(config)
    mlp = model.layers[0].mlp
    residual = config.init_std / (2 * config.num_layer) ** 0.5
    assert abs(mlp.down_proj.std().item() / residual - 1) < 0.1
    assert abs(mlp.gate_up_proj.std().item() / config.init_std - 1) < 0.1


@pytest.mark.parametrize("use_moe", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_count_parameters(use_moe, tied):
    config = ModelConfig(block_size=32, vocab_size=96, num_layer=3, num_attention_heads=8,
                         num_key_value_heads=2, hidden_size=64, intermediate_size=96,
                         tied_lm_head=tied, use_moe=use_moe, num_experts=6, num_experts_per_tok=2,
                         moe_intermediate_size=40)
    model = GPT(config)
    counted = count_parameters(config)
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.parameters() if getattr(p, "is_expert", False))
    active = counted["total"] - expert + expert * config.num_experts_per_tok // config.num_experts
    assert counted["active"] == (active if use_moe else counted["total"])


# ---------------------------------------------------------------- expert parallel


def _ep_case(config: ModelConfig, starve: range) -> dict:
    """Run the layer on this rank's chunk with EP over the SEP group and the single-process layer
    on all chunks; return relative errors (and checks) of everything that must match."""
    group, rank, ep = get_sep_group(), get_sep_rank(), dist.get_world_size(get_sep_group())
    x, g = _inputs(ep)
    chunk = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)

    ref = _layer(config, starve)
    x_ref = x.clone().requires_grad_()
    out_ref, ref_stats = ref(x_ref)
    aux_grad_ref, = torch.autograd.grad(ref_stats.aux_loss, ref.router.weight, retain_graph=True)
    ((out_ref * g).sum() + ref_stats.aux_loss).backward()

    layer = _layer(config, starve)
    apply_expert_parallel(layer, group)
    x_ep = x[:, chunk].clone().requires_grad_()
    out, stats = layer(x_ep)
    aux = stats.aux_loss.detach().clone()
    dist.all_reduce(aux, group=group)  # each rank holds its share: the sum is the layer's loss
    aux_grad, = torch.autograd.grad(stats.aux_loss, layer.router.weight, retain_graph=True)
    dist.all_reduce(aux_grad, group=group)
    ((out * g[:, chunk]).sum() + stats.aux_loss).backward()
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad, group=group)  # replicated router: the trainer sums over SEP

    result = {"out": _rel(out, out_ref[:, chunk]), "x_grad": _rel(x_ep.grad, x_ref.grad[:, chunk]),
              "router_grad": _rel(router_grad, ref.router.weight.grad),
              "aux": abs(aux.item() - ref_stats.aux_loss.item()) / abs(ref_stats.aux_loss.item()),
              "aux_grad": _rel(aux_grad, aux_grad_ref),
              "expert_load_equal": torch.equal(stats.expert_load, ref_stats.expert_load),
              "starved_load": ref_stats.expert_load[starve].sum().item()}
    for name in ("gate_up_proj", "down_proj"):
        p = layer.get_parameter(name)
        assert p.shape[0] == config.num_experts // ep
        result[name] = _rel(_gather_experts(p.grad), ref.get_parameter(name).grad)
    return result


def _gather_experts(p: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(p) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, p.detach())
    return torch.cat(parts)


def _gpt_sep_case() -> dict:
    """A 2-layer MoE GPT under SEP (Ulysses attention + expert parallelism on the same group), with
    the trainer's convention: each rank's loss = its chunk's cross-entropy sum / all tokens + its
    aux-loss share, gradients summed over SEP (expert gradients already complete on their rank).
    Against the unsharded model on the full sequences: logits, loss and every gradient."""
    sep, rank = dist.get_world_size(), get_sep_rank()
    config = _config(num_experts=8)
    torch.manual_seed(0)
    ref = GPT(config)
    torch.manual_seed(0)
    model = GPT(config)
    apply_sequence_parallel(model, get_sep_group())
    apply_expert_parallel(model, get_sep_group())
    T = T_LOCAL * sep
    tokens = torch.randint(config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(2))
    idx, targets = tokens[:, :-1], tokens[:, 1:]

    ref_out = ref(idx, return_aux=True)
    ref_loss = cross_entropy_sum(ref_out.logits, targets) / (B * T) + ref_out.aux_loss
    ref_loss.backward()
    local_idx, local_targets, position_ids = sequence_chunk(idx, targets, rank, sep)
    out = model(local_idx, position_ids=position_ids, return_aux=True)
    loss = cross_entropy_sum(out.logits, local_targets) / (B * T) + out.aux_loss
    loss.backward()
    total_loss = loss.detach().clone()
    dist.all_reduce(total_loss)

    grad_err = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        if getattr(p, "is_expert", False):
            grad = _gather_experts(p.grad)
        else:
            grad = p.grad.clone()
            dist.all_reduce(grad)
        grad_err = max(grad_err, _rel(grad, q.grad))
    chunk = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
    # Parallelism wraps submodules without renaming a parameter: checkpoints and HF maps hold.
    assert list(model.state_dict()) == list(ref.state_dict())
    # Applied twice, a layout would split the experts' slice again and wrap the all-to-alls twice.
    for apply in (apply_sequence_parallel, apply_expert_parallel):
        with pytest.raises(ValueError, match="already applied"):
            apply(model, get_sep_group())
    return {"out": _rel(out.logits, ref_out.logits[:, chunk]), "grads": grad_err,
            "loss": abs(total_loss.item() - ref_loss.item()) / ref_loss.item()}


def _ep_worker(cases: list) -> dict:
    initialize_parallel_state(sep_size=dist.get_world_size())
    results = {name: _ep_case(_config(**kw), starve) for name, kw, starve in cases}

    # The experts of a GPT initialise independently of the layout: the EP slices, gathered, are
    # the tensors of the unsharded model built with the same seed.
    config = _config(num_experts=8)
    torch.manual_seed(0)
    full = GPT(config)
    torch.manual_seed(0)
    sharded = GPT(config)
    apply_expert_parallel(sharded, get_sep_group())
    results["init_layout_independent"] = all(
        torch.equal(_gather_experts(p) if getattr(p, "is_expert", False) else p, q)
        for p, q in zip(sharded.parameters(), full.parameters()))
    results["gpt_sep"] = _gpt_sep_case()

    try:  # ep + 1 experts never split over ep ranks
        apply_expert_parallel(MoE(_config(num_experts=dist.get_world_size() + 1, top_k=1)),
                              get_sep_group())
        results["bad_ep_error"] = None
    except ValueError as e:
        results["bad_ep_error"] = str(e)
    return results


# (name, config overrides, experts no token may pick: the last rank's experts)
EP_CASES = {
    2: [("top1", dict(top_k=1), range(0)),
        ("top2", dict(top_k=2), range(0)),
        ("top2_softmax_first_z_only", dict(moe_router_softmax_before_topk=True,
                                           moe_aux_loss_coeff=0.0), range(0)),
        ("top1_rank1_empty", dict(top_k=1), range(2, 4)),
        ("top2_rank1_empty", dict(top_k=2), range(2, 4))],
    4: [("top1", dict(num_experts=8, top_k=1), range(0)),
        ("top2", dict(num_experts=8, top_k=2), range(0)),
        ("top2_one_expert_per_rank", dict(num_experts=4, top_k=2), range(0)),
        ("top2_rank3_empty", dict(num_experts=8, top_k=2), range(6, 8)),
        ("top1_rank3_empty", dict(num_experts=4, top_k=1), range(3, 4))],
}


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_matches_single_process(ep):
    for rank, results in enumerate(run_distributed(_ep_worker, ep, EP_CASES[ep])):
        assert results.pop("init_layout_independent"), rank
        error = results.pop("bad_ep_error")
        assert error is not None and f"--num_experts {ep + 1}" in error and f"--sep_size {ep}" in error
        for case, r in results.items():
            where = f"rank {rank}, case {case}"
            if case != "gpt_sep":
                assert r.pop("expert_load_equal"), where
                # The case is real: no token went to the starved rank's experts.
                assert r.pop("starved_load") == 0 or not case.endswith("_empty"), where
            for quantity, err in r.items():
                assert err < TOL, f"{where}: {quantity} relative error {err:.2e}"

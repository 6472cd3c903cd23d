"""DistributedOptimizer (ZeRO-1 and its shard=False data-parallel path) against ONE process running
plain torch.optim.AdamW (torch.nn.utils.clip_grad_norm_) on the same global batch.

The toy model has dense params (a square weight shared by two modules, a bias, a gain, and `skip`
that only some ranks' tokens use in some micro-steps, so it has no grad on some ranks, in some
last micro-steps, or in whole steps: 38 elements, divisible by neither 2 nor 4) and stacked experts
marked `is_expert`. The world is
dp x sep (tinytron's parallel_state); SEP rank s holds experts [s*E/sep, (s+1)*E/sep). Rank
(d, s) takes, from each micro-batch, the tokens of DP part d routed to its experts, with loss
sum(token losses) * dp / (accum * tokens): the reduction (SUM over the world for dense params, over
the DP group for experts, times grad_scale = 1/dp) is then exactly the global-batch mean gradient.

Tolerance: 1e-6 relative (norm-wise) across layouts. The only differences from the reference are
fp32 summation orders (per-rank partial sums, the grad norm over shards instead of per tensor):
~1e-7 relative on grads, which Adam's normalised update carries through 10 steps at lr <= 1e-2
(observed: <= 4e-8 on params, <= 1e-7 on grad norms). Resumed runs at the same layout must be
bitwise equal, and so must runs with and without overlapped communication (the same collectives
on the same buffers, only launched earlier). Two spawned runs (world 2, world 4) serve all tests,
through module fixtures.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.dist_helper import run_distributed
from tests.utils import rel
from tinytron.distributed.parallel_state import initialize_parallel_state
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.distributed.zero1.optimizer_state import read_state_dict

D, NUM_EXPERTS, TOKENS, STEPS = 5, 4, 16, 10
LRS = (1e-2, 3e-3)                  # decay group, no-decay group
TINY_BUCKET_MB = 8 * 4 / 2**20      # 8 fp32 elements: several buckets, most params alone in one
CLIP = 0.05                         # below every step's grad norm: clipping is active
CONFIGS = [dict(accum=1, max_norm=0.0, bucket_size_mb=40.0),
           dict(accum=2, max_norm=CLIP, bucket_size_mb=TINY_BUCKET_MB)]


class Toy(nn.Module):
    def __init__(self, num_local_experts: int):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.out = nn.Linear(D, D, bias=False)
        self.out.weight = self.inp.weight           # tied: must appear once in the buffers
        self.gain = nn.Parameter(torch.ones(3))
        self.skip = nn.Parameter(torch.zeros(D))
        self.experts = nn.Parameter(torch.empty(num_local_experts, D, D))
        self.experts.is_expert = True

    def forward(self, x, y, expert, skip):
        """x, y: [M, D]; expert: [M] local expert index; skip: [M] bool, the tokens that add
        self.skip (unused, no grad, when none does) -> [M] squared errors."""
        z = torch.einsum("md,mde->me", torch.tanh(self.inp(x)), self.experts[expert])
        if skip.any():
            z = z + self.skip * skip[:, None]
        return (self.out(z) * self.gain.sum() - y).square().sum(-1)


def global_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"inp.weight": torch.randn(D, D, generator=g) * 0.5,
            "inp.bias": torch.randn(D, generator=g) * 0.5,
            "gain": 1 + 0.1 * torch.randn(3, generator=g),
            "experts": torch.randn(NUM_EXPERTS, D, D, generator=g) * 0.5,
            "skip": 0.1 * torch.randn(D, generator=g)}


def local_model(params: dict[str, torch.Tensor], sep_rank: int, sep: int) -> Toy:
    """The model of SEP rank sep_rank from global (all-experts) params."""
    model = Toy(NUM_EXPERTS // sep)
    local = dict(params, experts=params["experts"].chunk(sep)[sep_rank])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(local[name])
    return model


def global_of(model: Toy, sep_group) -> dict[str, torch.Tensor]:
    """The model's params with experts gathered over the SEP group (global index)."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    if sep_group is not None:
        parts = [torch.empty_like(out["experts"]) for _ in range(dist.get_world_size(sep_group))]
        dist.all_gather(parts, out["experts"], group=sep_group)
        out["experts"] = torch.cat(parts)
    return out


def make_optimizer(model: Toy, kind: str = "adamw") -> torch.optim.Optimizer:
    groups = [{"params": [model.inp.weight, model.experts], "weight_decay": 0.1, "lr": LRS[0]},
              {"params": [model.inp.bias, model.gain, model.skip], "weight_decay": 0.0,
               "lr": LRS[1]}]
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def set_lr(param_groups, step: int) -> None:
    """A scheduler: every group's lr changes every step."""
    for base, group in zip(LRS, param_groups):
        group["lr"] = base * (1 - step / (2 * STEPS))


def batch(step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return (torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g),
            torch.randint(NUM_EXPERTS, (TOKENS,), generator=g))


def micro_loss(model: Toy, step, micro, accum, dp_rank=0, dp=1, sep_rank=0, sep=1):
    """This rank's loss on micro-batch `micro`: its DP part, tokens of its local experts."""
    x, y, expert = batch(step, micro)
    per_rank = NUM_EXPERTS // sep
    part = torch.arange(TOKENS).chunk(dp)[dp_rank]
    idx = part[expert[part] // per_rank == sep_rank]
    # Expert 0's tokens (all on SEP rank 0) add `skip`, in the first micro-step of even steps.
    skip = (expert[idx] == 0) & (micro == 0 and step % 2 == 0)
    losses = model(x[idx], y[idx], expert[idx] - sep_rank * per_rank, skip)
    return losses.sum() * (dp / (accum * TOKENS))


def reference(steps: int, accum: int, max_norm: float, kind: str = "adamw",
              params: dict | None = None):
    """One process, all experts, plain torch optimizer.
    Returns (params, grad norms, optimizer, model)."""
    model = local_model(params or global_params(), 0, 1)
    opt = make_optimizer(model, kind)
    norms = []
    for step in range(steps):
        set_lr(opt.param_groups, step)
        opt.zero_grad(set_to_none=False)   # a missing grad is zero, as in the flat buffers
        for micro in range(accum):
            micro_loss(model, step, micro, accum).backward()
        if max_norm > 0:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, opt, model


def wrap(model, opt, state, shard=True, bucket_size_mb=40.0, overlap=True):
    """The trainer's wiring: the topology of parallel_state (`state`, the current one: dense over
    the world, experts over DP, grads averaged over DP); state None: no communication."""
    groups = {} if state else {"process_group": None}
    return DistributedOptimizer(opt, model, shard=shard, bucket_size_mb=bucket_size_mb,
                                overlap_grad_reduce=overlap, overlap_param_gather=overlap, **groups)


def train(model, zero, state, steps, accum, max_norm):
    """Run `steps` (a range) optimizer steps; returns the grad norms (if clipping)."""
    dp_rank, dp, sep_rank, sep = ((state.dp_rank, state.dp_size, state.sep_rank, state.sep_size)
                                  if state else (0, 1, 0, 1))
    norms = []
    for step in steps:
        set_lr(zero.param_groups, step)
        zero.zero_grad()
        for micro in range(accum):
            loss = micro_loss(model, step, micro, accum, dp_rank, dp, sep_rank, sep)
            with zero.micro_step(last=micro == accum - 1):
                loss.backward()
        zero.reduce_gradients()
        if max_norm > 0:
            norms.append(zero.clip_grad_norm(max_norm))
        zero.step()
    zero.finish_param_gather()
    return norms


def assert_params_close(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert rel(got[name], want[name]) <= tol, (name, rel(got[name], want[name]))


# ---- parity ------------------------------------------------------------------------------------

def parity_runs(with_sgd: bool) -> dict:
    """Every layout (sep 1 and 2) x shard x config x overlap on/off, 10 steps each: final global
    params, grad norms and optimizer state bytes of this rank."""
    results = {}
    for sep in (1, 2):
        state = initialize_parallel_state(sep)
        for shard in (True, False):
            for ci, cfg in enumerate(CONFIGS):
                for overlap in (True, False):
                    model = local_model(global_params(), state.sep_rank, sep)
                    zero = wrap(model, make_optimizer(model), state, shard, cfg["bucket_size_mb"],
                                overlap)
                    norms = train(model, zero, state, range(STEPS), cfg["accum"], cfg["max_norm"])
                    state_bytes = sum(v.nbytes for st in zero.optimizer.state.values()
                                      for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
                    results[sep, shard, ci, overlap] = (global_of(model, state.sep_group), norms,
                                                        state_bytes)
        if with_sgd:   # any element-wise torch optimizer, not only AdamW
            model = local_model(global_params(), state.sep_rank, sep)
            zero = wrap(model, make_optimizer(model, "sgd"), state)
            train(model, zero, state, range(STEPS), 1, 0.0)
            results[sep, "sgd"] = global_of(model, state.sep_group)
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_parity_with_single_process_adamw(world, request):
    per_rank = [out["parity"] for out in request.getfixturevalue(f"world{world}")]
    numel = sum(p.numel() for p in global_params().values())
    for ci, cfg in enumerate(CONFIGS):
        want, want_norms, _, _ = reference(STEPS, cfg["accum"], cfg["max_norm"])
        if cfg["max_norm"]:
            assert min(want_norms) > CLIP   # clipping really happened
        for sep in (1, 2):
            for shard in (True, False):
                for rank, res in enumerate(per_rank):
                    got, norms, state_bytes = res[sep, shard, ci, True]
                    # Overlap off: bitwise the same params and grad norms.
                    off, off_norms, _ = res[sep, shard, ci, False]
                    for name in want:
                        assert torch.equal(got[name], off[name]), (sep, shard, ci, name)
                    assert all(torch.equal(a, b) for a, b in zip(norms, off_norms))
                    assert_params_close(got, want)
                    assert len(norms) == len(want_norms)
                    for n, w in zip(norms, want_norms):
                        assert rel(n, w) <= 1e-6
                    # exp_avg + exp_avg_sq, fp32: dense params over the world, local experts
                    # over the DP group. Sharded: 1/N of each, plus padding, at most 1 element
                    # per bucket: < 8 elements here, the size of one tiny bucket.
                    dense, experts = numel - NUM_EXPERTS * D * D, NUM_EXPERTS // sep * D * D
                    if shard:
                        bound = 8 * (dense / world + experts / (world // sep)) + 8 * 8
                        assert state_bytes <= bound, (rank, state_bytes, bound)
                    else:
                        assert state_bytes == 8 * (dense + experts)
    if world == 2:
        want, _, _, _ = reference(STEPS, 1, 0.0, "sgd")
        for res in per_rank:
            for sep in (1, 2):
                assert_params_close(res[sep, "sgd"], want)


# ---- state save / load -------------------------------------------------------------------------

HALF = STEPS // 2
RESUME = dict(accum=2, max_norm=CLIP)


def fresh_optimizer(model: Toy) -> torch.optim.Optimizer:
    """A new optimizer whose hyper-parameters differ from the run's: loading must restore them."""
    opt = make_optimizer(model)
    opt.param_groups[0].update(weight_decay=0.5, betas=(0.8, 0.9))
    return opt


def resume(params: dict, ckpt_dir: str, state, shard: bool = True) -> dict:
    """Load the optimizer from ckpt_dir into a fresh wrapper around a model holding `params`,
    run steps HALF..STEPS; returns the global params."""
    model = local_model(params, state.sep_rank if state else 0, state.sep_size if state else 1)
    zero = wrap(model, fresh_optimizer(model), state, shard, TINY_BUCKET_MB)
    zero.load(ckpt_dir)
    train(model, zero, state, range(HALF, STEPS), **RESUME)
    return global_of(model, state.sep_group if state else None)


def resume_runs(ckpt_dir: str, other: tuple | None) -> dict:
    """At dp x sep 2, for shard True/False: run HALF steps, save, run on (uninterrupted), and
    resume from the save. `other`: (params at HALF, checkpoint dir) of a run at another world size
    to resume from too."""
    state = initialize_parallel_state(2)
    out = {}
    for shard in (True, False):
        model = local_model(global_params(), state.sep_rank, state.sep_size)
        zero = wrap(model, make_optimizer(model), state, shard, TINY_BUCKET_MB)
        train(model, zero, state, range(HALF), **RESUME)
        save_dir = os.path.join(ckpt_dir, f"shard{shard}")
        zero.save(save_dir)
        half = global_of(model, state.sep_group)
        train(model, zero, state, range(HALF, STEPS), **RESUME)
        out[shard] = dict(half=half, state_dict=zero.state_dict() if shard else None,
                          saved=read_state_dict(save_dir),
                          uninterrupted=global_of(model, state.sep_group),
                          resumed=resume(half, save_dir, state, shard))
    out["dir"] = os.path.join(ckpt_dir, "shardTrue")
    if other is not None:
        out["from_other"] = resume(*other, state)
    return out


def assert_state_matches_reference(saved: dict, ref_opt, ref_model) -> None:
    """The layout-independent state (names, full shapes, global expert index) equals plain
    AdamW's after the same steps."""
    names = {p: n for n, p in ref_model.named_parameters()}
    for group, ref_group in zip(saved["param_groups"], ref_opt.param_groups):
        assert group["params"] == [names[p] for p in ref_group["params"]]
        assert {k: v for k, v in group.items() if k != "params"} == \
            {k: v for k, v in ref_group.items() if k != "params"}
    assert saved["state"].keys() == set(names.values())
    for p, ref_state in ref_opt.state.items():
        got = saved["state"][names[p]]
        assert got.keys() == ref_state.keys()
        assert torch.equal(got["step"], ref_state["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert got[key].shape == p.shape
            assert rel(got[key], ref_state[key]) <= 1e-6, (names[p], key)


def test_state_save_load_across_world_sizes(world2, world4):
    want, _, ref_opt, ref_model = reference(STEPS, **RESUME)
    _, _, half_opt, half_model = reference(HALF, **RESUME)
    # World 1, no torch.distributed, all experts local: resume the world-2 checkpoint.
    w1 = resume(*world2_checkpoint(world2), None)
    w2 = [out["resume"] for out in world2]   # dp 1 x sep 2: experts unsharded (DP group of 1)
    w4 = [out["resume"] for out in world4]   # dp 2 x sep 2: experts sharded over DP too
    for rank_out in w2 + w4:
        for shard in (True, False):
            run = rank_out[shard]
            assert_params_close(run["uninterrupted"], want)
            for name in want:   # same layout: bitwise
                assert torch.equal(run["resumed"][name], run["uninterrupted"][name]), name
            assert_state_matches_reference(run["saved"], half_opt, half_model)
        # After the last step too (not only what save() wrote), from every rank.
        assert_state_matches_reference(rank_out[True]["state_dict"], ref_opt, ref_model)
    for rank_out in w4:   # resumed the world-2 checkpoint
        assert_params_close(rank_out["from_other"], want)
    assert_params_close(w1, want)


# ---- the spawned runs: one per world size, shared by the tests above ---------------------------

def _worker(ckpt_dir: str, other: tuple | None) -> dict:
    world2 = dist.get_world_size() == 2
    return dict(parity=parity_runs(with_sgd=world2), resume=resume_runs(ckpt_dir, other))


def world2_checkpoint(world2) -> tuple[dict, str]:
    """(global params at step HALF, checkpoint dir) of the world-2 sharded run."""
    return world2[0]["resume"][True]["half"], world2[0]["resume"]["dir"]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("world2")), None)


@pytest.fixture(scope="module")
def world4(world2, tmp_path_factory):
    return run_distributed(_worker, 4, str(tmp_path_factory.mktemp("world4")),
                           world2_checkpoint(world2))

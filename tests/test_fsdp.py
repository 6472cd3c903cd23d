"""--fsdp (ZeRO-3 through torch's FSDP2) against the single-process fp32 reference and against
ZeRO-1 on the same layout: losses, aux losses, grad norms of 10 steps, the weights and the AdamW
state after them (read from the checkpoints, which also proves the two engines write the same
DCP keys); checkpoints saved by one engine resumed by the other on another world size and
--sep_size, with experts; same-layout resumes bitwise (dense dp 2, MoE sep 2).

Layouts: dp 2 (dense, gradient accumulation 4, clipped on every step; also with --use_compile: the
whole model compiled), sep 2 with the experts split over it (MoE, with full activation checkpointing:
each block recomputed inside its FSDP unit's backward), dp 2 x sep 2 (MoE: dense params sharded over
all 4 ranks, experts over their DP pair; also under ZeRO-1, the same-layout comparison; also bf16,
whose units' mixed precision is observed directly; also resumed from world 1), dp 2 MoE (resumed
from world 4); --num_workers 2 (the default) in the dp 2 and dp 2 x sep 2 runs.

Tolerance 1e-5 relative (fp32), as in test_parallel_training: FSDP computes the same fp32 math as
ZeRO-1 and differs only in summation order (each unit's reduce-scatter, the grad norm over
dim-0 shards); measured <= 3e-7 on losses and grad norms over the 10 steps. bf16: 3 x the bf16
error of the reference itself (|bf16 - fp32| at world 1), the rule of test_parallel_training's
bf16_tolerance (it cannot see a bf16 gradient reduction: test_fsdp_bf16_precision_of_every_unit
does). Four world-1 references, then two spawned jobs (world 4, then world 2, which resume earlier
checkpoints) serve all tests, through one module fixture.
"""

import numpy as np
import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

from tests.dist_helper import run_distributed
from tests.test_parallel_training import BF16, DENSE, MOE, RecordingTrainer, assert_same
from tests.utils import rel, tiny_config
from tinytron.distributed.zero1.optimizer_state import read_state_dict
from tinytron.training.checkpoint import read_model_state, step_dir
from tinytron.training.config import ConfigError, validate_config

SAVING = ["--do_save", "--save_every_steps", "5"]   # checkpoints at steps 5 and 10
WORKERS = ["--num_workers", "2"]
FSDP = ["--fsdp", *WORKERS]


# vocab 97: the embedding/head rows split 49 + 48 over dp 2, so the uneven (padded) FSDP2 shards of
# params, grads and AdamW state are checked against the reference too. Clipped at 0.3, below every
# grad norm of these runs (0.66-0.90 measured), so the clipping of FSDP's sharded grads acts on
# every step (test_clipping_acts_on_every_step).
CLIP = 0.3
ODD_DENSE = [*DENSE, "--vocab_size", "97", "--grad_clip_value", str(CLIP)]


# Full recompute inside the FSDP units, 2 micro-batches (accumulation is the dense dp 2 run's to check).
MOE_SEP2 = ["--fsdp", "--activation_checkpointing", "full", "--batch_size", "8"]


def sep(n: int, *flags: str) -> list[str]:
    return ["--sep_size", str(n), *flags]


# name -> (model/run flags, layout flags); a "resume" entry names the run whose step-5 checkpoint
# it resumes (from an earlier job).
WORLD4 = {
    "moe dp2 sep2": (MOE, sep(2, *FSDP)),
    "moe dp2 sep2 zero1": (MOE, sep(2)),
    "bf16 moe dp2 sep2": (MOE + BF16, sep(2, *FSDP)),     # default precision and workers; PROBED
    "moe dp2 sep2 from ref": (MOE, sep(2, *FSDP), "ref moe"),   # ZeRO-1 world 1 -> FSDP dp2 x sep2
}
PROBED = "bf16 moe dp2 sep2"   # also reports its FSDP units' mixed precision (probe_precision)
WORLD2 = {
    "dense dp2": (ODD_DENSE, FSDP),
    "dense dp2 resumed": (ODD_DENSE, FSDP, "dense dp2"),                  # FSDP -> FSDP, same layout
    "moe sep2": (MOE, sep(2, *MOE_SEP2)),   # recompute inside FSDP units
    "moe sep2 resumed": (MOE, sep(2, *MOE_SEP2), "moe sep2"),   # experts
    "dense dp2 compiled": (ODD_DENSE, ["--fsdp", "--use_compile"]),
    "bf16 dense dp2": (ODD_DENSE + BF16, ["--fsdp"]),
    "moe dp2 from zero1 dp2 sep2": (MOE, ["--fsdp"], "moe dp2 sep2 zero1"),   # ZeRO-1 world 4 -> FSDP world 2
    "moe dp2 zero1 from dp2 sep2": (MOE, [], "moe dp2 sep2"),                 # FSDP world 4 -> ZeRO-1 world 2
}


class RecordingReduceScatter(DefaultReduceScatter):
    """FSDP2's reduce-scatter, recording the dtype of what it reduces into `dtypes`."""

    def __init__(self, dtypes: set):
        super().__init__()
        self.dtypes = dtypes

    def __call__(self, output_tensor, input_tensor, *args, **kwargs):
        self.dtypes.add(input_tensor.dtype)
        return super().__call__(output_tensor, input_tensor, *args, **kwargs)


def probe_precision(model) -> tuple[dict, dict]:
    """Install probes on an FSDP-wrapped model; -> (units, params), filled as it trains:
    units {FSDP unit name: {"policy": (param_dtype, reduce_dtype), "reduced": {dtypes reduce-scattered}}}
    (torch's FSDP2 internals: each unit's param group, its MixedPrecisionPolicy and reduce-scatter),
    params {module name: {dtypes its own params have inside its forward}}."""
    units, params = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            units[name] = {"policy": (group.mp_policy.param_dtype, group.mp_policy.reduce_dtype), "reduced": set()}
            group._reduce_scatter_comm = RecordingReduceScatter(units[name]["reduced"])
        if any(True for _ in module.parameters(recurse=False)):
            seen = params.setdefault(name, set())
            module.register_forward_pre_hook(
                lambda m, args, seen=seen: seen.update(p.dtype for p in m.parameters(recurse=False)))
    return units, params


def _run(log_dir, layouts, sources):
    """{name: (history [steps, 3], val_history, run folder, probe_precision's (units, params) for
    PROBED, else None)} of every layout, in this world."""
    out = {}
    for i, (name, (flags, layout, *source)) in enumerate(layouts.items()):
        run_dir = (out.get(source[0]) or sources[source[0]])[2] if source else ""
        resume = ["--resume_path", step_dir(run_dir + "/checkpoints", 5)] if source else []
        trainer = RecordingTrainer(tiny_config(f"{log_dir}/{i}", *flags, *SAVING, *layout, *resume))
        trainer.history, trainer.val_history = [], []
        probe = probe_precision(trainer.model) if name == PROBED else None
        trainer.train()
        out[name] = (np.array(trainer.history), np.array(trainer.val_history), trainer.run_dir, probe)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every parallel run, by name, and the world-1 references (first: a world-4 run resumes one)."""
    base = tmp_path_factory.mktemp("fsdp")
    out = {}
    for name, flags in REFERENCES.items():
        out[name] = _run(str(base / "w1"), {name: (flags, [])}, {})[name]
    world4 = run_distributed(_run, 4, str(base / "w4"), WORLD4, out)
    out.update(world4[0])
    out[PROBED] = (*out[PROBED][:3], [rank[PROBED][3] for rank in world4])   # every rank's probes
    out.update(run_distributed(_run, 2, str(base / "w2"), WORLD2, out)[0])
    return out


def weights(run, step=10) -> dict:
    return read_model_state(step_dir(run[2] + "/checkpoints", step))


def adam_state(run, step=10) -> dict:
    return read_state_dict(step_dir(run[2] + "/checkpoints", step) + "/optimizer")


def assert_close_tensors(got: dict, ref: dict, tol: float, what: str) -> None:
    assert got.keys() == ref.keys(), what
    for key in ref:
        if hasattr(ref[key], "shape"):
            assert got[key].shape == ref[key].shape, f"{what}: {key}"
            err = rel(got[key], ref[key])
            assert err <= tol, f"{what}: {key} differs by {err:.2e}"


REFERENCES = {"ref dense": ODD_DENSE, "ref moe": MOE, "ref bf16 dense": ODD_DENSE + BF16, "ref bf16 moe": MOE + BF16}


def reference_of(name: str) -> str:
    return ("ref bf16 " if "bf16" in name else "ref ") + ("moe" if "moe" in name else "dense")


@pytest.mark.parametrize("name", ["dense dp2", "moe sep2", "moe dp2 sep2"])
def test_fsdp_matches_single_process(runs, name):
    """Losses, aux losses, grad norms of 10 steps and the weights after them, within 1e-5."""
    ref = runs[reference_of(name)]
    assert_same(runs[name], ref, 1e-5, name)
    assert_close_tensors(weights(runs[name]), weights(ref), 1e-5, name)
    assert ref[0][-1, 0] < ref[0][0, 0]  # it trained


def test_fsdp_with_compiled_model_matches_single_process(runs):
    """--use_compile with --fsdp (the whole model compiled, graphs broken at FSDP's unit hooks):
    the eager reference's statistics and weights within 1e-5 (inductor fuses and reorders the fp32
    arithmetic; measured after 10 steps: 2.0e-7 on the losses and grad norms)."""
    ref = runs["ref dense"]
    assert_same(runs["dense dp2 compiled"], ref, 1e-5, "compiled")
    assert_close_tensors(weights(runs["dense dp2 compiled"]), weights(ref), 1e-5, "compiled")


@pytest.mark.parametrize("name", ["moe dp2 sep2"])
def test_fsdp_matches_zero1_same_layout(runs, name):
    """The same layout under ZeRO-1: statistics, weights and every AdamW state tensor (same keys,
    same global shapes: the checkpoints are one format) within 1e-5."""
    zero1 = runs[f"{name} zero1"]
    assert_same(runs[name], zero1, 1e-5, name)
    assert_close_tensors(weights(runs[name]), weights(zero1), 1e-5, name)
    got, ref = adam_state(runs[name]), adam_state(zero1)
    assert got["param_groups"] == ref["param_groups"]
    assert got["state"].keys() == ref["state"].keys()
    for param, state in ref["state"].items():
        assert_close_tensors(got["state"][param], state, 1e-5, f"{name} {param}")


@pytest.mark.parametrize("name", ["bf16 dense dp2", "bf16 moe dp2 sep2"])
def test_fsdp_bf16(runs, name):
    """bf16 (MixedPrecisionPolicy: bf16 compute, fp32 reduction and master weights) at dp 2, and
    MoE at dp 2 x sep 2 with the defaults (bf16, 2 workers), against bf16 at world 1: losses, aux
    losses and grad norms within 3 x the bf16 error of the reference itself (|bf16 - fp32| at
    world 1, per statistic over the steps)."""
    ref, fp32 = runs[reference_of(name)][0], runs[reference_of(name.replace("bf16 ", ""))][0]
    tol = 3 * np.abs(ref - fp32).max(axis=0)
    assert tol[0] < 1e-2 * ref[:, 0].min() and tol[2] < 0.3 * ref[:, 2].min(), tol
    assert "moe" not in name or tol[1] < 1e-2 * ref[:, 1].min(), tol   # the aux loss too (dense: 0)
    diff = np.abs(runs[name][0] - ref).max(axis=0)
    assert (diff <= tol).all(), f"max |diff| {diff} > tolerance {tol}"
    assert all(v.dtype == torch.float32 for v in weights(runs[name]).values())  # fp32 masters


# The intended precision under --fsdp --precision bf16 (all units: fp32 master shards, grads
# reduce-scattered in fp32): every module of the blocks but the routers is gathered and computed in
# bf16 (attention, MLP or experts, and the RMSNorm weights, which share the block's unit: RMSNorm
# normalises in fp32, then multiplies by the bf16 weight); the routers in fp32 (the expert choice is
# not left to bf16 rounding), and the root (embedding, final norm, head) in fp32.
def intended_dtype(module: str) -> torch.dtype:
    return torch.bfloat16 if module.startswith("layers.") and not module.endswith("router") else torch.float32


def test_fsdp_bf16_precision_of_every_unit(runs):
    """The bf16 MoE run at dp 2 x sep 2, observed while it trained: each FSDP unit's policy, the
    dtype of every reduce-scatter it issued (fp32 for all units, on every rank), and the dtype of
    each module's params inside its forward (`intended_dtype`)."""
    for units, params in runs[PROBED][3]:
        assert {"", "layers.0", "layers.0.mlp", "layers.0.mlp.router"} <= units.keys(), units.keys()
        for name, unit in units.items():
            compute = intended_dtype(name)
            assert unit["policy"] == (None if compute == torch.float32 else compute, torch.float32), name
            assert unit["reduced"] == {torch.float32}, (name, unit["reduced"])
        assert {"embed", "layers.0.attn.qkv_proj", "layers.0.mlp", "layers.0.mlp_norm"} <= params.keys()
        for name, dtypes in params.items():
            assert dtypes == {intended_dtype(name)}, (name, dtypes)


@pytest.mark.parametrize("name", ["moe dp2 from zero1 dp2 sep2", "moe dp2 zero1 from dp2 sep2",
                                  "moe dp2 sep2 from ref"])
def test_checkpoints_interchange_with_zero1(runs, name):
    """ZeRO-1 at world 4 (dp 2 x sep 2) resumed with --fsdp at world 2 (dp 2, sep 1), FSDP at
    world 4 resumed with ZeRO-1 at world 2, and ZeRO-1 at world 1 resumed with --fsdp at world 4
    (dp 2 x sep 2: each rank loads its experts' rows of its DP shard): steps 5-9 and the final
    weights of the uninterrupted world-1 run, within 1e-5."""
    ref = runs["ref moe"]
    got = runs[name]
    np.testing.assert_allclose(got[0], ref[0][5:], rtol=1e-5, atol=1e-7, err_msg=name)
    assert_close_tensors(weights(got), weights(ref), 1e-5, name)


@pytest.mark.parametrize("name", ["dense dp2", "moe sep2"])
def test_same_layout_resume_is_bitwise(runs, name):
    """--fsdp resumed at step 5 on the same layout (dense at dp 2; MoE at sep 2, experts split
    over the SEP ranks): steps 5-9, weights and AdamW state bitwise those of the uninterrupted run."""
    got, ref = runs[f"{name} resumed"], runs[name]
    assert np.array_equal(got[0], ref[0][5:])
    assert_close_tensors(weights(got), weights(ref), 0.0, "weights")
    for param, state in adam_state(ref)["state"].items():
        assert_close_tensors(adam_state(got)["state"][param], state, 0.0, param)


def test_clipping_acts_on_every_step(runs):
    """The dense runs clip at CLIP, below the grad norm (before clipping) of every step of the
    reference and of FSDP at dp 2, so the parity of test_fsdp_matches_single_process checks
    FSDP's clipping of its sharded grads on every step (a skipped or local-norm clip changes the
    AdamW moments, so the losses, at 1e-3)."""
    for name in ("ref dense", "dense dp2"):
        assert runs[name][0][:, 2].min() > CLIP, (name, runs[name][0][:, 2])
    assert_same(runs["dense dp2"], runs["ref dense"], 1e-5, "clipped")


@pytest.mark.parametrize("flags", [["--no-use_distributed_optimizer"]])   # --optimizer muon: tests/test_fsdp_muon.py
def test_unsupported_combinations_are_one_line_errors(tmp_path, flags):
    config = tiny_config(tmp_path, "--fsdp", *flags)
    with pytest.raises(ConfigError, match=f"--fsdp .*{flags[0]}") as error:
        validate_config(config, 2)
    assert "\n" not in str(error.value)

"""--fsdp (ZeRO-3 through torch's FSDP2) against the single-process fp32 reference and against
ZeRO-1 on the same layout: losses, aux losses, grad norms of 10 steps, the weights and the AdamW
state after them (read from the checkpoints, which also proves the two engines write the same
DCP keys); checkpoints saved by one engine resumed by the other on another world size and
--sep_size; a same-layout resume bitwise.

Layouts: dp 2 (dense, gradient accumulation 4; also with --use_compile: the whole model compiled),
sep 2 with the experts split over it (MoE, with full activation checkpointing: each block recomputed
inside its FSDP unit's backward), dp 2 x sep 2 (MoE: dense params sharded over all 4 ranks, experts
over their DP pair; also under ZeRO-1, the same-layout comparison), dp 2 MoE (resumed from world 4);
--num_workers 2 (the default) in the dp 2 and dp 2 x sep 2 runs.

Tolerance 1e-5 relative (fp32), as in test_parallel_training: FSDP computes the same fp32 math as
ZeRO-1 and differs only in summation order (each unit's reduce-scatter, the grad norm over
dim-0 shards); measured <= 3e-7 on losses and grad norms over the 10 steps. bf16: 3 x the bf16
error of the reference itself (|bf16 - fp32| at world 1), the rule of test_parallel_training's
bf16_tolerance. Two spawned jobs (world 4, then world 2, which resumes world 4's checkpoints) and
three world-1 references serve all tests, through one module fixture.
"""

import numpy as np
import pytest
import torch

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
# params, grads and AdamW state are checked against the reference too.
ODD_DENSE = [*DENSE, "--vocab_size", "97"]


def sep(n: int, *flags: str) -> list[str]:
    return ["--sep_size", str(n), *flags]


# name -> (model/run flags, layout flags); a "resume" entry names the run whose step-5 checkpoint
# it resumes (from an earlier job).
WORLD4 = {
    "moe dp2 sep2": (MOE, sep(2, *FSDP)),
    "moe dp2 sep2 zero1": (MOE, sep(2)),
}
WORLD2 = {
    "dense dp2": (ODD_DENSE, FSDP),
    "dense dp2 resumed": (ODD_DENSE, FSDP, "dense dp2"),                  # FSDP -> FSDP, same layout
    "moe sep2": (MOE, sep(2, "--fsdp", "--activation_checkpointing", "full")),   # recompute inside FSDP units
    "dense dp2 compiled": (ODD_DENSE, ["--fsdp", "--use_compile"]),
    "bf16 dense dp2": (ODD_DENSE + BF16, ["--fsdp"]),
    "moe dp2 from zero1 dp2 sep2": (MOE, ["--fsdp"], "moe dp2 sep2 zero1"),   # ZeRO-1 world 4 -> FSDP world 2
    "moe dp2 zero1 from dp2 sep2": (MOE, [], "moe dp2 sep2"),                 # FSDP world 4 -> ZeRO-1 world 2
}


def _run(log_dir, layouts, sources):
    """{name: (history [steps, 3], val_history, run folder)} of every layout, in this world."""
    out = {}
    for i, (name, (flags, layout, *source)) in enumerate(layouts.items()):
        run_dir = (out.get(source[0]) or sources[source[0]])[2] if source else ""
        resume = ["--resume_path", step_dir(run_dir + "/checkpoints", 5)] if source else []
        trainer = RecordingTrainer(tiny_config(f"{log_dir}/{i}", *flags, *SAVING, *layout, *resume))
        trainer.history, trainer.val_history = [], []
        trainer.train()
        out[name] = (np.array(trainer.history), np.array(trainer.val_history), trainer.run_dir)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every parallel run, by name, and the world-1 references (dense, MoE, dense bf16)."""
    base = tmp_path_factory.mktemp("fsdp")
    out = run_distributed(_run, 4, str(base / "w4"), WORLD4, {})[0]
    out.update(run_distributed(_run, 2, str(base / "w2"), WORLD2, out)[0])
    for name, flags in (("ref dense", ODD_DENSE), ("ref moe", MOE), ("ref bf16 dense", ODD_DENSE + BF16)):
        out[name] = _run(str(base / "w1"), {name: (flags, [])}, {})[name]
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


def reference_of(name: str) -> str:
    return "ref bf16 dense" if "bf16" in name else "ref moe" if "moe" in name else "ref dense"


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


def test_fsdp_bf16(runs):
    """bf16 (MixedPrecisionPolicy: bf16 compute, fp32 reduction and master weights) at dp 2
    against bf16 at world 1, within 3 x the bf16 error of the reference itself."""
    ref, fp32 = runs["ref bf16 dense"][0], runs["ref dense"][0]
    tol = 3 * np.abs(ref - fp32).max(axis=0)
    assert tol[0] < 1e-2 * ref[:, 0].min() and tol[2] < 0.3 * ref[:, 2].min(), tol
    diff = np.abs(runs["bf16 dense dp2"][0] - ref).max(axis=0)
    assert (diff <= tol).all(), f"max |diff| {diff} > tolerance {tol}"
    assert all(v.dtype == torch.float32 for v in weights(runs["bf16 dense dp2"]).values())  # fp32 masters


@pytest.mark.parametrize("name", ["moe dp2 from zero1 dp2 sep2", "moe dp2 zero1 from dp2 sep2"])
def test_checkpoints_interchange_with_zero1(runs, name):
    """ZeRO-1 at world 4 (dp 2 x sep 2) resumed with --fsdp at world 2 (dp 2, sep 1), and FSDP at
    world 4 resumed with ZeRO-1 at world 2: steps 5-9 and the final weights of the uninterrupted
    world-1 run, within 1e-5."""
    ref = runs["ref moe"]
    got = runs[name]
    np.testing.assert_allclose(got[0], ref[0][5:], rtol=1e-5, atol=1e-7, err_msg=name)
    assert_close_tensors(weights(got), weights(ref), 1e-5, name)


def test_same_layout_resume_is_bitwise(runs):
    """--fsdp at dp 2 resumed at step 5 on the same layout: steps 5-9, weights and AdamW state
    bitwise those of the uninterrupted run."""
    got, ref = runs["dense dp2 resumed"], runs["dense dp2"]
    assert np.array_equal(got[0], ref[0][5:])
    assert_close_tensors(weights(got), weights(ref), 0.0, "weights")
    for param, state in adam_state(ref)["state"].items():
        assert_close_tensors(adam_state(got)["state"][param], state, 0.0, param)


@pytest.mark.parametrize("flags", [["--no-use_distributed_optimizer"], ["--optimizer", "muon"]])
def test_unsupported_combinations_are_one_line_errors(tmp_path, flags):
    config = tiny_config(tmp_path, "--fsdp", *flags)
    with pytest.raises(ConfigError, match=f"--fsdp .*{flags[0]}") as error:
        validate_config(config, 2)
    assert "\n" not in str(error.value)

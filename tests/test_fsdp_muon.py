"""--fsdp --optimizer muon (distributed/fsdp/muon.py: each Muon matrix gathered whole on its owner,
stepped by torch.optim.Muon, returned to FSDP2's row shards) against the single-process
torch.optim.Muon + AdamW reference of tests/test_muon.py and against ZeRO-1's Muon on the same
layout; checkpoints interchanged with ZeRO-1 across world and SEP sizes; the plan's bytes exact,
its step transient against the measured peak of the step; owners balanced on skewed shapes.

Layouts (5 steps, gradient accumulation: 16 sequences of a step over dp 2 x micro-batch 2): world 2
dense dp 2 (--num_workers 2, the default; resumed at step 3 on the same layout) and MoE sep 2 (each
rank's experts over a DP group of one); world 4 dp 2 x sep 2 dense and MoE (experts split over
SEP, each rank's 2 sharded over its DP pair and owned by whichever rank the greedy rule picks), the
MoE also under ZeRO-1. Interchange: ZeRO-1 MoE at sep 2 (world 2) resumed with --fsdp at dp 2 x
sep 2 (world 4: each owner reads its experts' momenta), and --fsdp dense at dp 2 (world 2) resumed
with ZeRO-1 at dp 2 x sep 2 (world 4).

Newton-Schulz in fp32 on both sides (test_muon's `newton_schulz_fp32`, patched into torch.optim.Muon),
as test_muon's parity runs: torch's bf16 iteration turns a one-ulp difference in a gradient (another
summation order: FSDP's reduce-scatter, the micro-batch split) into 1e-3..1e-2 relative weight
differences, below which no layout can be compared. In fp32 the layouts differ from the reference
by summation order only: 1e-5 relative (measured here: weights <= 2.4e-6, the saved momenta and
AdamW moments <= 4e-7, on every run; a planted bug, one owner's rows in the wrong order, moves
them by far more and fails every parity test), the optimizer state's step counts exactly.
Two spawned jobs (world 2, then world 4, which resumes world-2 checkpoints) serve all tests; the
world-2 job also takes one --fsdp Muon step on each SKEWED model (fractions of a second).
"""

import gc

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from tests.dist_helper import run_distributed
from tests.test_muon import MOE, MUON, STEPS, _resume_at_step_3, _saved_state, _weights, newton_schulz_fp32, reference
from tests.test_parallel_training import RecordingTrainer, assert_same
from tests.test_plan import _local, measured_state
from tests.utils import PeakMemory, rel, tiny_config
from tinytron.distributed.fsdp import FSDPOptimizer
from tinytron.training.config import ConfigError, resume_changes, validate_config
from tinytron.training.memory import _breakdown, fsdp_muon_buffer_bytes, fsdp_state_bytes, muon_step_bytes

# --num_workers 2 (the default) in the first run only: the data order does not depend on them
# (tests/test_sampler.py).
FSDP = ["--fsdp"]
WORKERS = ["--num_workers", "2"]
SEP2 = ["--sep_size", "2"]
# name -> (flags, a run of an earlier job whose step-3 checkpoint it resumes, or None)
WORLD2 = {
    "dense dp2": (MUON + FSDP + WORKERS, None),
    "dense dp2 resumed": (MUON + FSDP, "dense dp2"),                  # same layout: bitwise
    "moe sep2": (MOE + FSDP + SEP2, None),     # experts over a DP group of 1: all owned locally
    "moe sep2 zero1": (MOE + SEP2, None),
}
WORLD4 = {
    "dense dp2 sep2": (MUON + FSDP + SEP2, None),
    "moe dp2 sep2": (MOE + FSDP + SEP2, None),
    "moe dp2 sep2 zero1": (MOE + SEP2, None),
    "moe dp2 sep2 from zero1 sep2": (MOE + FSDP + SEP2, "moe sep2 zero1"),   # ZeRO-1 w2 -> FSDP w4
    "dense dp2 sep2 zero1 from dp2": (MUON + SEP2, "dense dp2"),            # FSDP w2 -> ZeRO-1 w4
}


# Muon matrices of skewed shapes ([rows, columns], in the optimizer's order), each list one model
# sharded over the world: with equal elements per matrix but rows and columns far apart, owners
# balanced by any measure other than elements (columns, rows, matrices) pile most matrices on one rank.
SKEWED = {
    "a wide matrix beside tall ones": [(8, 1024)] + [(1024, 8)] * 5,
    "a tall matrix beside wide ones": [(1024, 8)] + [(8, 1024)] * 5,
    "large and small alternating": [(256, 256), (8, 8)] * 3,
}


def _skewed_momentum_bytes() -> dict:
    """{case: this rank's Muon momentum bytes} after one --fsdp Muon step (FSDPOptimizer over FSDP2
    dim-0 shards over the world, torch.optim.Muon) of a module holding the SKEWED matrices."""
    out = {}
    for name, shapes in SKEWED.items():
        model = nn.Module()
        model.weights = nn.ParameterList(nn.Parameter(torch.randn(shape)) for shape in shapes)
        fully_shard(model, mesh=DeviceMesh.from_group(dist.group.WORLD, "cpu"))
        muon = torch.optim.Muon([{"params": list(model.parameters()), "whole_matrices": True}], lr=1e-3)
        optimizer = FSDPOptimizer(muon, model, dist.group.WORLD)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        out[name] = sum(st["momentum_buffer"].nbytes for st in muon.state.values())
    return out


def _params_grads_and_state(trainer) -> list:
    params = list(trainer.model.parameters())
    state = [t for st in trainer.optimizer.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    return params + [p.grad for p in params if p.grad is not None] + state


def _run(log_dir: str, layouts: dict, sources: dict) -> dict:
    """{name: (history [steps, 3], run folder, this rank's measured state bytes, its last step's
    Muon buffer bytes under FSDP and its Muon momentum bytes, the peak of the tensors its last
    optimizer step allocated)} for every layout, in this world; in world 2 also "skewed":
    `_skewed_momentum_bytes`."""
    torch.optim._muon._zeropower_via_newtonschulz = newton_schulz_fp32
    out = {"skewed": _skewed_momentum_bytes()} if dist.get_world_size() == 2 else {}
    for i, (name, (flags, source)) in enumerate(layouts.items()):
        resume = ["--resume_path", _resume_at_step_3((out.get(source) or sources[source])[1])] if source else []
        trainer = RecordingTrainer(tiny_config(f"{log_dir}/{i}", *flags, *resume))
        trainer.history, trainer.val_history = [], []
        whole, step_peak = getattr(trainer.optimizer, "_whole", None), []
        if whole:   # the last two steps' optimizer steps, under PeakMemory (momentum exists by then)
            step, calls, last = trainer.optimizer.step, [], trainer.total_steps - trainer.step

            def measured_step(trainer=trainer, step=step, calls=calls, last=last, step_peak=step_peak):
                calls.append(None)
                if len(calls) < last - 1:
                    return step()
                gc.collect()
                peak = PeakMemory()   # what the step allocates beyond the tensors it finds
                peak.hold(_local(t) for t in _params_grads_and_state(trainer))
                before = peak.now
                with peak:
                    step()
                step_peak.append(peak.peak - before)
            trainer.optimizer.step = measured_step
        trainer.train()
        buffers = None
        if whole:
            momentum = sum(st["momentum_buffer"].nbytes for st in trainer.optimizer.optimizer.state.values()
                           if "momentum_buffer" in st)
            buffers = {**whole.transient, "momentum": momentum, "step_peak": min(step_peak)}
        out[name] = (np.array(trainer.history), trainer.run_dir, measured_state(trainer), buffers)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: per-rank results} of every layout of both worlds."""
    base = tmp_path_factory.mktemp("fsdp_muon")
    w2 = run_distributed(_run, 2, str(base / "w2"), WORLD2, {})
    w4 = run_distributed(_run, 4, str(base / "w4"), WORLD4, w2[0])
    return {name: [rank[name] for rank in world] for world in (w2, w4) for name in world[0]}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """{"dense"/"moe": (history, weights, state)}: the single-process reference, fp32 Newton-Schulz."""
    out, base = {}, tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", newton_schulz_fp32)
        for key, flags in (("dense", MUON), ("moe", MOE)):
            history = []
            weights, state = reference(flags, str(base / key), history)
            out[key] = (np.array(history), weights, state)
    return out


def _assert_weights(run_dir: str, want: dict, tol: float, what: str) -> None:
    got = _weights(run_dir)
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        err = rel(got[name], value)
        assert err <= tol, (what, name, err)


def _assert_state(got: dict, want: dict, tol: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for param, st in want.items():
        assert got[param].keys() == st.keys(), (what, param)
        for key, value in st.items():
            err = rel(got[param][key], value)
            assert err <= (0 if key == "step" else tol), (what, param, key, err)


@pytest.mark.parametrize("name", ["dense dp2", "moe sep2", "dense dp2 sep2", "moe dp2 sep2"])
def test_fsdp_muon_matches_single_process_torch_muon(runs, references, name):
    """Losses, aux losses and grad norms of every step, the weights and the saved optimizer state
    (Muon's momentum of every matrix, written by its owner; AdamW's moments and steps) equal the
    single-process torch.optim.Muon + AdamW reference's within 1e-5 (see the module docstring)."""
    history, run_dir = runs[name][0][:2]
    want_history, want, want_state = references["moe" if "moe" in name else "dense"]
    assert len(history) == STEPS
    assert_same((history, np.zeros(0)), (want_history, np.zeros(0)), 1e-5, name)
    _assert_weights(run_dir, want, 1e-5, name)
    _assert_state(_saved_state(run_dir), want_state, 1e-5, name)
    assert want_history[-1, 0] < want_history[0, 0]   # it trained


def test_fsdp_muon_matches_zero1_muon_same_layout(runs):
    """MoE at dp 2 x sep 2: FSDP's statistics, weights and every saved state tensor (same DCP keys
    and global shapes: one checkpoint format) equal ZeRO-1 Muon's within 1e-5 (summation order)."""
    fsdp, zero1 = runs["moe dp2 sep2"][0], runs["moe dp2 sep2 zero1"][0]
    assert_same((fsdp[0], np.zeros(0)), (zero1[0], np.zeros(0)), 1e-5)
    _assert_weights(fsdp[1], _weights(zero1[1]), 1e-5, "fsdp vs zero1")
    _assert_state(_saved_state(fsdp[1]), _saved_state(zero1[1]), 1e-5, "fsdp vs zero1")


def test_fsdp_muon_same_layout_resume_is_bitwise(runs):
    """Dense dp 2 resumed at step 3 under --fsdp: steps 3-4, the weights and the saved state
    (each owner's momentum read back into its whole matrix) bitwise the uninterrupted run's."""
    got, ref = runs["dense dp2 resumed"][0], runs["dense dp2"][0]
    assert np.array_equal(got[0], ref[0][3:])
    _assert_weights(got[1], _weights(ref[1]), 0.0, "resumed")
    _assert_state(_saved_state(got[1]), _saved_state(ref[1]), 0.0, "resumed")


@pytest.mark.parametrize("name", ["moe dp2 sep2 from zero1 sep2", "dense dp2 sep2 zero1 from dp2"])
def test_muon_checkpoints_interchange_with_zero1(runs, references, name):
    """ZeRO-1 Muon at world 2 (sep 2) resumed with --fsdp at world 4 (dp 2 x sep 2), and --fsdp at
    world 2 (dp 2) resumed with ZeRO-1 at world 4: steps 3-4 and the final weights equal the
    uninterrupted reference's within 1e-5."""
    history, run_dir = runs[name][0][:2]
    want_history, want, _ = references["moe" if "moe" in name else "dense"]
    assert_same((history, np.zeros(0)), (want_history[3:], np.zeros(0)), 1e-5, name)
    _assert_weights(run_dir, want, 1e-5, name)


@pytest.mark.parametrize("name", ["dense dp2", "moe sep2", "dense dp2 sep2", "moe dp2 sep2"])
def test_plan_counts_fsdp_muon_bytes_exactly(runs, name):
    """Every term of the plan under --fsdp Muon against what the run holds: every rank's params,
    grads and optimizer state (AdamW's shards + the momentum of the matrices it owns), its Muon
    momentum alone, and the buffers of its last Muon step (the gather's send / recv and whole
    matrices, the return's send / recv) equal the plan's, byte for byte; the step transient the
    plan adds to the peak is Muon's own update (`muon_step_bytes`) + the largest rank's gather
    buffers (send + recv + whole, all live at the gather's end) as measured, and covers the peak
    of the tensors the measured optimizer step allocates (the smaller peak of the last two steps:
    once in ~6 runs of the whole suite, never alone or under load, one rank's step saw ~60 KB
    more, a storage outliving its step, e.g. a finished all-to-all's buffers still held by
    gloo's worker thread; the plan is not a bound on such stragglers). Checked against a
    planted bug: the whole matrices left out of the plan's step transient."""
    world = len(runs[name])
    cfg = tiny_config("/unused", *(WORLD2 if world == 2 else WORLD4)[name][0])
    planned_state, planned_buffers = fsdp_state_bytes(cfg, world), fsdp_muon_buffer_bytes(cfg, world)
    for rank, (_, _, state, buffers) in enumerate(runs[name]):
        assert state == {k: v for k, v in planned_state[rank].items() if k != "in_flight"}, (name, rank)
        assert {k: v for k, v in buffers.items() if k != "step_peak"} == planned_buffers[rank], (name, rank)
    assert planned_buffers[0]["momentum"] > 0
    measured = [buffers for _, _, _, buffers in runs[name]]
    transient = _breakdown(cfg, world, device="cpu")["step_transient"]
    assert transient == muon_step_bytes(cfg) + max(b["send"] + b["recv"] + b["whole"] for b in measured)
    assert max(b["step_peak"] for b in measured) <= transient, (name, measured, transient)


def test_fsdp_muon_owners_within_the_zero1_bound_on_skewed_shapes(runs):
    """Each rank's Muon momentum after a real --fsdp Muon step (world 2) on skewed matrix shapes
    (SKEWED) is at most the ZeRO-1 owners' bound, 1/N of the Muon bytes plus one matrix, and the
    ranks together hold every matrix's momentum once. Checked against planted bugs: owners
    balanced by columns (the first case fails), by rows (the second) or by matrix count (the
    third), each putting 5 of 6 equal matrices, or all large ones, on one rank."""
    for name, shapes in SKEWED.items():
        owned = [rank[name] for rank in runs["skewed"]]
        sizes = [4 * rows * cols for rows, cols in shapes]   # fp32 momentum
        assert sum(owned) == sum(sizes), (name, owned)
        assert max(owned) <= sum(sizes) / len(owned) + max(sizes), (name, owned)


def test_fsdp_muon_is_accepted_and_the_optimizer_is_fixed_on_resume(tmp_path):
    """--fsdp --optimizer muon validates at any --sep_size; an AdamW checkpoint does not resume with
    --optimizer muon, nor the reverse, under either engine: one line naming both optimizers
    (resume.py checks the saved config on every rank before loading anything)."""
    for sep in ("1", "2"):
        validate_config(tiny_config(tmp_path, "--fsdp", "--optimizer", "muon", "--sep_size", sep), 4)
    adamw, muon = tiny_config(tmp_path), tiny_config(tmp_path, "--optimizer", "muon")
    for saved, run, want in ((adamw, muon, "--optimizer muon differs from adamw"),
                             (muon, adamw, "--optimizer adamw differs from muon")):
        with pytest.raises(ConfigError, match=want) as error:
            resume_changes(saved.to_dict(), run, "ckpt")
        assert "\n" not in str(error.value)

"""The `cuda` tier: what only a GPU can show, asserted. `python -m pytest -m cuda` on a machine with a
CUDA device runs exactly these; elsewhere they are reported as skipped ("needs a CUDA device").

One process on one GPU, each check against a reference that does not share the path under test:
- bf16 autocast on CUDA stays within the suite's bf16 bound of the fp32 CUDA run
  (tests/test_parallel_training.py's `bf16_tolerance`, measured on CPU for the same models);
- a checkpoint saved from CUDA tensors resumes bitwise on CUDA, and on CPU within 1e-5;
- flex_attention's document mask on CUDA (compiled Triton kernels) equals SDPA with the boolean
  mask: forward and gradients, fp32 within 1e-5, bf16 as close to the fp32 reference as SDPA's;
- --use_compile equals eager; the fused AdamW and Muon updates on CUDA equal the CPU ones;
- SIGTERM to the launcher of a CUDA job saves and exits 0 inside torchrun's 30 s grace period;
- tinytron-plan's peak covers torch.cuda.max_memory_allocated, by at most 5%.

fp32 on CUDA means IEEE fp32 matmuls: torch's default (no TF32) is kept by the Trainer.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.document_windows import EOS, T, build_model, window
from tests.test_muon import MUON, newton_schulz_fp32
from tests.test_parallel_training import DENSE, MOE, bf16_tolerance, run_layouts
from tests.test_preemption import FLAGS, LAUNCH, LONG, jobs
from tests.utils import max_rel, read_log, rel, tiny_config
from tinytron.model.document_mask import document_layout
from tinytron.model.gpt import cross_entropy_sum
from tinytron.training import Trainer
from tinytron.training.checkpoint import list_complete
from tinytron.training.memory import peak_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = ["--device", "cuda"]


def _history(log_dir, flags) -> np.ndarray:
    """[steps, (loss, aux loss, grad norm)] of one Trainer run in this process."""
    return run_layouts(log_dir, flags, [[]])[0][0]


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory):
    """tests/test_parallel_training.py's `reference` (world-1 runs on CPU, cached by flags), for
    `bf16_tolerance`."""
    cache, base = {}, tmp_path_factory.mktemp("cpu")

    def run(flags):
        key = tuple(flags)
        if key not in cache:
            cache[key] = run_layouts(f"{base}/{len(cache)}", flags, [[]])[0]
        return cache[key]
    return run


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_bf16_within_the_suites_bound_of_fp32(tmp_path, cpu_reference, model):
    """10 steps in bf16 and in fp32 on CUDA: every loss, aux loss and grad norm within the bound
    the CPU suite allows a bf16 layout (3 x the largest |bf16 - fp32| measured on CPU)."""
    flags = (DENSE if model == "dense" else MOE) + CUDA
    fp32 = _history(tmp_path / "fp32", flags)
    bf16 = _history(tmp_path / "bf16", flags + ["--precision", "bf16"])
    tol = bf16_tolerance(cpu_reference)
    diff = np.abs(bf16 - fp32).max(axis=0)
    assert (diff <= tol).all(), f"max |bf16 - fp32| {diff} > bound {tol}"


def _final_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}


def test_cuda_checkpoint_resumes_bitwise_and_on_cpu(tmp_path):
    """fp32, saving at steps 4 and 8. The step-4 checkpoint, resumed by the same command on CUDA,
    reproduces steps 4..7 and the final weights bitwise (the same kernels on the same inputs);
    resumed with --device cpu (the log folder copied first), steps 4..7 and the final weights
    equal the CUDA run's within 1e-5 (CPU and CUDA kernels sum in other orders)."""
    flags = CUDA + ["--no-do_val"]
    first = Trainer(tiny_config(tmp_path / "cuda", *flags))
    first.train()
    run_dir, losses, weights = first.run_dir, read_log(first.run_dir), _final_weights(first)
    del first
    ckpts = list_complete(os.path.join(run_dir, "checkpoints"))
    assert [os.path.basename(c) for c in ckpts] == ["step_00000004", "step_00000008"]
    shutil.rmtree(ckpts[1])
    cpu_dir = tmp_path / "cpu"
    shutil.copytree(tmp_path / "cuda", cpu_dir)

    resumed = Trainer(tiny_config(tmp_path / "cuda", *flags))
    assert resumed.step == 4
    resumed.train()
    assert read_log(resumed.run_dir) == losses   # bitwise
    for name, w in _final_weights(resumed).items():
        assert torch.equal(w, weights[name]), name

    on_cpu = Trainer(tiny_config(cpu_dir, "--no-do_val"))   # tiny_config's device: cpu
    assert on_cpu.step == 4 and on_cpu.device.type == "cpu"
    on_cpu.train()
    got = read_log(on_cpu.run_dir)
    np.testing.assert_allclose([got[s] for s in range(4, 8)], [losses[s] for s in range(4, 8)], rtol=1e-5)
    for name, w in _final_weights(on_cpu).items():
        assert rel(w, weights[name]) < 1e-5, name


def _masked_run(use_flex: bool, bf16: bool):
    """The document-mask window (tests/document_windows.py) on CUDA, GQA with head_dim 16 (flex's
    Triton kernels need at least 16): logits (fp32) and the gradients of its summed loss."""
    model = build_model(4, 2).cuda()
    idx, targets = (t.cuda() for t in window())
    mask, positions = document_layout(idx, EOS, torch.arange(T, device="cuda")[None], False, use_flex)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(idx, position_ids=positions, document_mask=mask)
    cross_entropy_sum(logits, targets).backward()
    return logits.detach().float(), {n: p.grad for n, p in model.named_parameters()}


def test_flex_document_mask_equals_sdpa_mask_on_cuda():
    """fp32: flex_attention's block mask (compiled Triton kernels, forward and backward) equals
    SDPA with the boolean mask within 1e-5 of the largest element (summation order only). bf16:
    flex's distance to the fp32 reference is at most twice SDPA-bf16's plus one bf16 rounding of
    the largest element (2^-8): both round the same matmuls to bf16, so each is one sample of the
    same error; a wrong mask moves the logits by O(1)."""
    ref_logits, ref_grads = _masked_run(False, False)
    logits, grads = _masked_run(True, False)
    assert max_rel(logits, ref_logits) < 1e-5
    for name, g in ref_grads.items():
        assert max_rel(grads[name], g) < 1e-5, name
    sdpa = _masked_run(False, True)
    flex = _masked_run(True, True)
    for what, f, s, r in [("logits", flex[0], sdpa[0], ref_logits)] + \
            [(n, flex[1][n], sdpa[1][n], g) for n, g in ref_grads.items()]:
        assert max_rel(f, r) <= 2 * max_rel(s, r) + 2**-8, what


def test_compile_equals_eager_on_cuda(tmp_path):
    """--use_compile (inductor's Triton kernels) against eager, fp32, dense and MoE, 5 steps:
    losses, aux losses and grad norms within 1e-5 (fused kernels round elementwise chains in
    another order; over 5 steps that stays far below 1e-5 on CPU)."""
    for name, flags in (("dense", DENSE), ("moe", MOE)):
        run = flags + CUDA + ["--max_steps", "5", "--no-do_val"]
        eager = _history(tmp_path / f"{name}-eager", run)
        compiled = _history(tmp_path / f"{name}-compiled", run + ["--use_compile"])
        np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fused_optimizers_on_cuda_equal_cpu(tmp_path, monkeypatch, optimizer):
    """5 fp32 steps on CUDA (fused AdamW; Muon's AdamW part fused too) and on CPU (foreach): every
    weight within 1e-5 relative. Muon's Newton-Schulz runs in fp32 on both sides, as in
    tests/test_muon.py (torch's bf16 iteration turns a one-ulp gradient difference into 1e-3)."""
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", newton_schulz_fp32)
    flags = (MUON if optimizer == "muon" else ["--max_steps", "5"]) + ["--no-do_save", "--no-do_val"]
    weights = {}
    for device in ("cpu", "cuda"):
        trainer = Trainer(tiny_config(tmp_path / device, *flags, "--device", device))
        trainer.train()
        weights[device] = _final_weights(trainer)
    for name, w in weights["cuda"].items():
        assert rel(w, weights["cpu"][name]) < 1e-5, name


def test_sigterm_to_the_launcher_saves_and_exits_zero(tmp_path):
    """scripts/launch.sh running pretrain_debug.py on one GPU (bf16, default workers): SIGTERM to
    the launcher alone after step 3 (a container's PID 1) saves the step reached and exits 0 within
    torchrun's 30 s grace period; the same command resumes from it."""
    cmd = LAUNCH + ["pretrain_debug.py", *FLAGS, *CUDA, "--precision", "bf16", "--log_dir", str(tmp_path / "run"),
                    *LONG]
    env = {"NPROC_PER_NODE": "1"}
    with jobs() as start:
        job = start(cmd, tmp_path / "first", env=env)
        job.wait_for(r"step +3 \|", timeout=120)
        sent = time.monotonic()
        os.kill(job.proc.pid, signal.SIGTERM)
        assert job.finish(timeout=30) == 0
        assert time.monotonic() - sent < 30
        out = job.output()
        assert "[tinytron] SIGTERM: saved step" in out, out[-2000:]
        step = int(out.split("[tinytron] SIGTERM: saved step ")[1].split(",")[0])
        (run_dir,) = [d for d in (tmp_path / "run").iterdir()]
        assert os.path.basename(list_complete(os.path.join(run_dir, "checkpoints"))[-1]) == f"step_{step:08d}"
        again = start(cmd, tmp_path / "again", env=env)
        again.wait_for(rf"step +{step} \|", timeout=120)
        assert f"at step {step}" in again.output()
        os.kill(again.proc.pid, signal.SIGTERM)
        assert again.finish(timeout=30) == 0


# The plan against the allocator: 4 layers of width 1024 (head_dim 128), vocab 32768, one micro-batch
# of 4 x 2048 tokens, bf16: 2.5 to 5 GiB at peak, so the plan's allowance for CUDA's own buffers
# (288 MiB) is at most 1/8 of it.
PLAN_SHAPE = ["--num_layer", "4", "--hidden_size", "1024", "--num_attention_heads", "8", "--num_key_value_heads", "4",
              "--intermediate_size", "4096", "--vocab_size", "32768", "--block_size", "2048", "--seq_len", "2048",
              "--batch_size", "4", "--total_batch_size", "8192", "--max_steps", "2", "--warmup_steps", "1",
              "--precision", "bf16", "--no-do_val", "--no-do_save"]
PLAN_MOE = ["--use_moe", "--num_experts", "8", "--num_experts_per_tok", "2", "--moe_intermediate_size", "1024"]


# One run in a process of its own (as users run it: cuBLAS's and cuDNN's buffers are made in it);
# prints torch.cuda.max_memory_allocated after the Trainer's setup and two steps.
_PEAK = ("import sys, torch; from tests.utils import tiny_config; from tinytron.training import Trainer; "
         "Trainer(tiny_config(*sys.argv[1:])).train(); print(torch.cuda.max_memory_allocated())")


def test_plan_covers_the_measured_peak(tmp_path):
    """Dense and MoE, no / selective / full recomputation: the peak allocated by a fresh process
    over the Trainer's setup and two steps (the second with AdamW state) is at most the plan's
    per-rank total, and the plan at most 5% above it."""
    rows = []
    for moe in (False, True):
        for mode in ("none", "selective", "full"):
            flags = [*PLAN_SHAPE, *(PLAN_MOE if moe else []), *CUDA, "--activation_checkpointing", mode]
            log_dir = tmp_path / f"{moe}-{mode}"
            r = subprocess.run([sys.executable, "-c", _PEAK, str(log_dir), *flags], cwd=REPO, capture_output=True,
                               text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
            assert r.returncode == 0, r.stderr[-3000:]
            rows.append((f"{'moe' if moe else 'dense'} {mode}", int(r.stdout.split()[-1]),
                         peak_bytes(tiny_config(log_dir, *flags), 1)))
    table = "\n".join(f"{name:<16} measured {m / 2**30:.3f} GiB plan {p / 2**30:.3f} GiB ({p / m - 1:+.2%})"
                      for name, m, p in rows)
    print(table)
    assert all(m <= p <= 1.05 * m for _, m, p in rows), table

"""--optimizer muon: distributed Muon (each matrix owned whole by one rank) equals plain
torch.optim.Muon + torch.optim.AdamW in one process, on every layout; resume is exact.

The reference is built here, not through the Trainer's optimizer path: GPT from the run's seed, the
global batches of the run's data order, one forward of the whole global batch, torch's own
clip_grad_norm_, and torch.optim.Muon over the blocks' matrices (a [E, m, n] expert weight as E
2-D views of it) + torch.optim.AdamW over the rest.

Why the parity runs patch torch's Newton-Schulz to fp32: torch.optim.Muon orthogonalises in bf16,
so two runs whose fp32 gradients differ by one ulp anywhere (another reduction order, or only
another micro-batch split in one process) round every element of the bf16 iterates differently:
measured 1e-3 (qkv) to 1e-2 (o_proj) relative weight difference after 6 steps at world 1, batch
16 x 1 vs 2 x 8 micro-steps. No layout can be compared with another below that. With the same
iteration in fp32 (`newton_schulz_fp32`, patched into torch.optim.Muon on both sides), layouts
differ from the reference only by fp32 summation order: measured at most 2.6e-6 (Frobenius
relative, per tensor; the square o_proj, whose small singular values Newton-Schulz amplifies most),
so 1e-5. Torch's bf16 Muon itself is checked bitwise where the gradients are bitwise the same
(one process, one micro-batch, no clipping: test_single_process_bitwise_with_torch_bf16_muon).
"""

import os

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.utils import rel, tiny_config
from tinytron.data.mock import MockDataset
from tinytron.data.sampler import GlobalBatchSampler
from tinytron.distributed.zero1.optimizer_state import read_state_dict
from tinytron.distributed.zero1.whole_matrices import owner_layout
from tinytron.model import GPT
from tinytron.training import Trainer
from tinytron.training import checkpoint as ckpt
from tinytron.training.config import ConfigError, validate_config
from tinytron.training.schedule import lr_at
from tinytron.training.weights import read_checkpoint

STEPS = 5
MUON = ["--optimizer", "muon", "--max_steps", str(STEPS), "--warmup_steps", "2", "--max_lr", "3e-3",
        "--min_lr", "3e-4", "--muon_lr", "6e-3", "--muon_weight_decay", "0.05", "--no-do_val",
        "--save_every_steps", "3", "--total_batch_size", "256", "--grad_clip_value", "0.5"]
MOE = MUON + ["--use_moe", "--num_experts", "4", "--num_experts_per_tok", "2", "--moe_intermediate_size", "32",
              "--moe_aux_loss_coeff", "0.05", "--moe_z_loss_coeff", "0.01"]
WORLD2 = {"dense dp2": MUON, "moe sep2": MOE + ["--sep_size", "2"]}
WORLD4 = {"moe dp2 sep2": MOE + ["--sep_size", "2"]}
RESUMED = "moe sep2"   # resumed from its step-3 checkpoint at world 2 (bitwise) and at world 4:
RESUMED_AT_4 = MOE + ["--sep_size", "2", "--no-use_distributed_optimizer"]   # dp2 x sep2, Muon unsharded


def test_owner_layout_puts_each_tensor_in_one_shard():
    numels = [96, 32, 7, 300, 96, 32, 5, 64, 64, 64, 1]
    for size in (1, 2, 3, 4):
        offsets, buckets, members, segments = owner_layout(numels, 200, size)
        owned = [0] * size
        assert buckets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(buckets, buckets[1:]))   # no padding
        for (start, end), idx, seg in zip(buckets, members, segments):
            assert seg[0][0] == start and seg[-1][1] == end and all(a[1] == b[0] for a, b in zip(seg, seg[1:]))
            assert sum(numels[i] for i in idx) == end - start and (end - start <= 200 or len(idx) == 1)
            for i in idx:
                r = next(r for r, (lo, hi) in enumerate(seg) if lo <= offsets[i] < hi)
                assert offsets[i] + numels[i] <= seg[r][1]
                owned[r] += numels[i]
        assert sorted(i for m in members for i in m) == list(range(len(numels)))
        assert max(owned) <= sum(numels) / size + max(numels)   # Graham's list-scheduling bound


def newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's orthogonalisation (the same quintic iteration and scaling) in fp32,
    patched in for the parity runs: torch's runs in bf16 (see the module docstring)."""
    a, b, c = ns_coefficients
    x = grad.T if grad.size(0) > grad.size(1) else grad
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


def reference(flags: list[str], log_dir: str, history: list | None = None) -> tuple[dict, dict]:
    """({name: weight}, {name: {state key: tensor}}) after STEPS steps of single-process
    torch.optim.Muon + torch.optim.AdamW: the optimizer state read from torch's optimizers (a
    stacked expert weight's Muon momentum: its experts' buffers stacked), not through any save.
    history: if given, each step's (loss, aux loss, grad norm before clipping) is appended."""
    cfg = tiny_config(log_dir, *flags)
    t, o = cfg.training, cfg.optim
    torch.manual_seed(t.seed)
    model = GPT(cfg.model)
    matrices, stacked, decay, no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if name.startswith("layers.") and p.dim() == 2 and "router" not in name:
            matrices.append(p)
        elif p.dim() == 3:   # [E, m, n] experts: one Muon matrix per expert
            stacked += [(p, e, torch.nn.Parameter(p.data[e])) for e in range(p.shape[0])]
        else:
            (decay if p.dim() == 2 and name != "embed.weight" else no_decay).append(p)
    views = [v for _, _, v in stacked]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=o.max_lr, betas=(o.beta1, o.beta2), eps=o.adam_eps)
    muon = torch.optim.Muon(matrices + views, lr=o.muon_lr, weight_decay=o.muon_weight_decay,
                            momentum=o.muon_momentum, adjust_lr_fn="match_rms_adamw")
    data = MockDataset(cfg.data.mock_data_num_samples, t.seq_len, cfg.model.vocab_size, t.seed, "train")
    seqs = t.total_batch_size // t.seq_len
    sampler = GlobalBatchSampler(len(data), seqs, seqs, 0, 1, t.seed)
    for step, indices in zip(range(STEPS), sampler):
        batch = torch.stack([data[i] for i in indices])
        # The model's training loss (the chunked head + cross-entropy, equal to F.cross_entropy within
        # 1e-6: tests/test_loss.py), as the Trainer computes it: the bitwise test needs its rounding.
        out = model(batch[:, :-1], targets=batch[:, 1:], return_aux=True)
        loss = out.loss_sum / batch[:, 1:].numel() + out.aux_loss
        model.zero_grad()
        loss.backward()
        if history is not None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            lm = out.loss_sum.detach() / batch[:, 1:].numel()
            history.append((lm.item(), out.aux_loss.detach().item(), norm.item()))
        if t.grad_clip_value:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_value)
        for p, e, view in stacked:
            view.grad = p.grad[e]
        lr = lr_at(step, o.max_lr, o.min_lr, o.warmup_steps, STEPS)
        for group in adamw.param_groups:
            group["lr"] = lr
        muon.param_groups[0]["lr"] = lr * (o.muon_lr / o.max_lr)
        adamw.step()
        muon.step()
    state = {name: dict(adamw.state[p]) if p in adamw.state else dict(muon.state[p])
             for name, p in model.named_parameters() if p in adamw.state or p in muon.state}
    for name, p in model.named_parameters():
        if p.dim() == 3:
            state[name] = {"momentum_buffer": torch.stack([muon.state[v]["momentum_buffer"]
                                                           for q, _, v in stacked if q is p])}
    return {name: t.detach() for name, t in model.state_dict().items()}, state


def _train(log_dir: str, flags: list[str], *more: str) -> str:
    """Train; -> the run folder."""
    trainer = Trainer(tiny_config(log_dir, *flags, *more))
    trainer.train()
    return trainer.run_dir


def _resume_at_step_3(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", sorted(os.listdir(os.path.join(run_dir, "checkpoints")))[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("muon")
    w2 = run_distributed(_world, 2, str(base / "w2"), WORLD2, None)[0]
    w4 = run_distributed(_world, 4, str(base / "w4"), WORLD4, w2[RESUMED])[0]
    return w2, w4


def _world(log_dir: str, layouts: dict, resume_from: str | None) -> dict:
    """Train every layout (fp32 Newton-Schulz); resume RESUMED (this world's own, or `resume_from`)
    from its step-3 checkpoint."""
    torch.optim._muon._zeropower_via_newtonschulz = newton_schulz_fp32
    runs = {name: _train(f"{log_dir}/{i}", flags) for i, (name, flags) in enumerate(layouts.items())}
    source = _resume_at_step_3(resume_from or runs[RESUMED])
    flags = WORLD2[RESUMED] if resume_from is None else RESUMED_AT_4
    runs["resumed"] = _train(f"{log_dir}/resumed", flags, "--resume_path", source)
    return runs


def _weights(run_dir: str) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir)[0]


def _saved_state(run_dir: str) -> dict:
    """{name: {state key: tensor}} of the run's last checkpoint."""
    return read_state_dict(os.path.join(ckpt.find_latest(run_dir), "optimizer"))["state"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """references(flags) -> `reference` with the fp32 Newton-Schulz, once per model (dense, MoE):
    the layout flags do not change it."""
    cache, base = {}, tmp_path_factory.mktemp("reference")

    def get(flags: list[str]) -> tuple[dict, dict]:
        key = "--use_moe" in flags
        if key not in cache:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", newton_schulz_fp32)
                cache[key] = reference(flags, str(base / str(key)))
        return cache[key]
    return get


def test_muon_parity_with_single_process_reference(runs, references):
    """The weights and the saved optimizer state (Muon's momentum, AdamW's moments and step) of
    every layout equal the reference's, read from torch's own optimizers: 1e-5 (fp32 summation
    order, see the module docstring; the state measured within 1e-6), the step counts exactly."""
    w2, w4 = runs
    for world, layouts, dirs in ((2, WORLD2, w2), (4, WORLD4, w4)):
        for name, flags in layouts.items():
            want, want_state = references(flags)
            got = _weights(dirs[name])
            assert got.keys() == want.keys()
            for param, value in want.items():
                assert rel(got[param], value) <= 1e-5, (world, name, param, rel(got[param], value))
            state = _saved_state(dirs[name])
            assert state.keys() == want_state.keys(), (world, name)
            for param, st in want_state.items():
                assert state[param].keys() == st.keys(), (world, name, param)
                for key, value in st.items():
                    err = rel(state[param][key], value)
                    assert err <= (0 if key == "step" else 1e-5), (world, name, param, key, err)


def test_muon_resume_exact_and_across_layouts(runs, references):
    w2, w4 = runs
    assert _resume_at_step_3(w2[RESUMED]).endswith("3")
    uninterrupted, resumed = _weights(w2[RESUMED]), _weights(w2["resumed"])
    for name, value in uninterrupted.items():   # same layout: bitwise
        assert torch.equal(resumed[name], value), name
    want = references(WORLD2[RESUMED])[0]
    for name, value in _weights(w4["resumed"]).items():   # saved at dp1 x sep2, resumed at dp2 x sep2
        assert rel(value, want[name]) <= 1e-5, name


def test_single_process_bitwise_with_torch_bf16_muon(tmp_path):
    """torch's own (bf16) Muon, one process, one micro-batch, no clipping: the Trainer's path
    (whole-matrix buffers, each expert's matrix a view handed to Muon, the lr scale) computes
    exactly the reference's operations, so the weights and the saved optimizer state are bitwise
    equal to the reference's (weights from the checkpoint, state from torch's optimizers)."""
    flags = MOE + ["--batch_size", "16", "--grad_clip_value", "0"]
    want, want_state = reference(flags, str(tmp_path / "ref"))
    run_dir = _train(str(tmp_path / "run"), flags)
    got = _weights(run_dir)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    state = _saved_state(run_dir)   # and the saved state is bitwise torch's optimizers' own
    assert state.keys() == want_state.keys()
    for name, st in want_state.items():
        assert state[name].keys() == st.keys() and all(torch.equal(state[name][k], v) for k, v in st.items()), name


def test_muon_ns_steps_below_torchs_limit(tmp_path):   # the other ranges: tests/test_flags.py
    with pytest.raises(ConfigError, match="^--muon_ns_steps 100 must be below 100"):
        validate_config(tiny_config(tmp_path, "--optimizer", "muon", "--muon_ns_steps", "100"), 1)


def test_muon_flags_enter_the_run_hash_only_when_set(tmp_path):
    base = tiny_config(tmp_path)
    assert tiny_config(tmp_path, "--optimizer", "adamw", "--muon_lr", "0").short_hash() == base.short_hash()
    assert tiny_config(tmp_path, "--optimizer", "muon").short_hash() != base.short_hash()

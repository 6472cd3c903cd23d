"""Hugging Face interop: logits parity with `transformers` after export, exact round trips,
init_from_hf, clear refusals, and the export / generate command lines. CPU, fp32, offline."""

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.dist_helper import run_script
from tests.utils import tiny_model_config
from tinytron.commands.export import main as export_main
from tinytron.commands.generate import generate_text, load_generator
from tinytron.commands.generate import main as generate_main
from tinytron.interop.hf import export_hf, load_hf
from tinytron.model import GPT, ModelConfig
from tinytron.training.weights import init_from_hf

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tinyshakespeare" / "tokenizer"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# init_std 0.1: logits of order 1, so a wrong mapping shows far above the tolerance. Both sides do
# the same fp32 math in another order: max |diff| measured <= 6e-7 for |logits| <= 4 (2-3 ulp);
# LOGITS_RTOL * max |logits| leaves a few ulp of room.
LOGITS_RTOL = 1e-6
BASE = dict(intermediate_size=48, init_std=0.1, rope_theta=500.0, norm_eps=1e-5)  # on top of TINY_MODEL
MOE = dict(use_moe=True, num_experts=4, moe_intermediate_size=24)
CASES = {
    "mha_untied": dict(num_key_value_heads=4, tied_lm_head=False),
    "gqa_tied": dict(num_key_value_heads=2, tied_lm_head=True),
    "mqa_untied": dict(num_key_value_heads=1, tied_lm_head=False),
    "moe_top1": dict(num_key_value_heads=2, num_experts_per_tok=1, **MOE),
    "moe_top2": dict(num_key_value_heads=2, num_experts_per_tok=2, tied_lm_head=False,
                     moe_router_softmax_before_topk=True, **MOE),
}
ARCH_FIELDS = ("block_size", "vocab_size", "num_layer", "num_attention_heads", "num_key_value_heads",
               "hidden_size", "tied_lm_head", "rope_theta", "norm_eps", "use_moe")


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A random GPT whose norm weights are random too (they start at 1), so swapped norms show."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", CASES)
def test_logits_parity_and_round_trip(case, tmp_path):
    cfg = tiny_model_config(**BASE, **CASES[case])
    model = build(cfg)
    export_hf(model, cfg, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == ("MixtralForCausalLM" if cfg.use_moe else "LlamaForCausalLM")
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, theirs = model(idx, return_aux=True), hf(idx).logits
    ours = out.logits
    assert ours.abs().max() > 1.0  # the tolerance below is meaningful
    assert (ours - theirs).abs().max() <= LOGITS_RTOL * ours.abs().max()
    if cfg.use_moe:  # routing really spread tokens over experts
        for layer_load in out.expert_load:
            assert (layer_load > 0).sum() > 1

    back, back_cfg = load_hf(str(tmp_path))
    assert_same_state(model.state_dict(), back.state_dict())
    assert (back.lm_head.weight is back.embed.weight) == cfg.tied_lm_head
    for name in ARCH_FIELDS + (("num_experts", "num_experts_per_tok", "moe_intermediate_size")
                               if cfg.use_moe else ("intermediate_size",)):
        assert getattr(back_cfg, name) == getattr(cfg, name), name


def test_bf16_sharded_moe_export(tmp_path):
    """bf16 export split into many shards (Mixtral's per-expert on-disk layout): transformers and
    load_hf both read back exactly the bf16-rounded weights."""
    cfg = tiny_model_config(**BASE, **CASES["moe_top2"])
    model = build(cfg)
    export_hf(model, cfg, str(tmp_path), dtype=torch.bfloat16, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"

    back, _ = load_hf(str(tmp_path))
    assert_same_state({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()},
                      back.state_dict())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ours = back(idx)
        assert (ours - hf(idx).logits).abs().max() <= LOGITS_RTOL * ours.abs().max()


def _aux_losses(cfg: ModelConfig, idx: torch.Tensor, tmp_path) -> tuple[float, float, float]:
    """(our aux loss, transformers' router_aux_loss_coef * aux_loss, the formula of docs/evaluation.md for the
    latter from our own routing) for the exported model on the same batch, z-loss off."""
    model = build(cfg)
    export_hf(model, cfg, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        _, ours, expert_load, _ = model(idx, return_aux=True)
        out = hf(idx, output_router_logits=True)
        # docs/evaluation.md: coef * k * E * sum_i fbar_i * Pbar_i, means over all layers and all tokens.
        E, k = cfg.num_experts, cfg.num_experts_per_tok
        load = expert_load.sum(0)
        probs = torch.cat([logits.softmax(-1) for logits in out.router_logits])
        fbar = load / load.sum()
        formula = hf.config.router_aux_loss_coef * k * E * (fbar * probs.mean(0)).sum()
    return ours.item(), (hf.config.router_aux_loss_coef * out.aux_loss).item(), formula.item()


@pytest.mark.parametrize("top_k", [1, 2])
def test_exported_load_balancing_strength(top_k, tmp_path):
    """transformers' Mixtral loss on the same routing: exactly ours for one layer and one
    sequence; for more layers and sequences it is docs/evaluation.md's formula (all-layer, whole-batch
    statistics), which differs from ours; under uniform routing (zero router) both are alpha * L."""
    cfg = tiny_model_config(**{**BASE, "num_layer": 1}, **CASES["moe_top2"], moe_aux_loss_coeff=0.05)
    cfg = dataclasses.replace(cfg, num_experts_per_tok=top_k)
    idx = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    ours, theirs, _ = _aux_losses(cfg, idx, tmp_path / "one")
    assert abs(ours - theirs) <= 1e-6 * ours and ours > 0.05  # exact mapping; routing unbalanced

    cfg = dataclasses.replace(cfg, num_layer=3)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ours, theirs, formula = _aux_losses(cfg, idx, tmp_path / "three")
    assert abs(theirs - formula) <= 1e-6 * theirs
    assert abs(ours - theirs) > 1e-3 * ours  # docs/evaluation.md: no exact mapping here

    model = build(cfg)
    for layer in model.layers:
        layer.mlp.router.weight.data.zero_()
    export_hf(model, cfg, str(tmp_path / "uniform"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "uniform")).eval()
    with torch.no_grad():
        ours = model(idx, return_aux=True).aux_loss
        theirs = hf.config.router_aux_loss_coef * hf(idx, output_router_logits=True).aux_loss
    assert abs(ours.item() - 0.05 * 3) <= 1e-6 and abs(theirs.item() - 0.05 * 3) <= 1e-6
    assert load_hf(str(tmp_path / "uniform"))[1].moe_aux_loss_coeff == pytest.approx(0.05, rel=1e-12)


@pytest.mark.parametrize("case", ["gqa_tied", "moe_top2"])
def test_init_from_hf(case, tmp_path):
    cfg = tiny_model_config(**BASE, **CASES[case])
    source = build(cfg, seed=0)
    export_hf(source, cfg, str(tmp_path))
    # block_size, dropout and init do not change the function: they may differ.
    target = build(dataclasses.replace(cfg, block_size=16, dropout=0.1, init_std=0.02), seed=1)
    pointers = {n: p.data_ptr() for n, p in target.named_parameters()}
    init_from_hf(target, str(tmp_path))
    assert_same_state(source.state_dict(), target.state_dict())
    assert pointers == {n: p.data_ptr() for n, p in target.named_parameters()}  # copied in place

    other = GPT(dataclasses.replace(cfg, rope_theta=10000.0))
    with pytest.raises(ValueError, match=r"--rope_theta 10000.0 differs from config.json \(500.0\)"):
        init_from_hf(other, str(tmp_path))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_weights(path: Path, fn) -> None:
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda p: _edit_config(p, num_key_value_heads=3),
     "num_key_value_heads 3 does not divide num_attention_heads 4"),
    (lambda p: _edit_config(p, attention_bias=True), "attention_bias=true is not supported"),
    (lambda p: _edit_config(p, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
     "rope scaling 'linear' is not supported"),
    (lambda p: _edit_config(p, hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (lambda p: _edit_config(p, model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (lambda p: _edit_weights(p, lambda s: s.pop("model.layers.0.self_attn.q_proj.weight")),
     "missing tensor model.layers.0.self_attn.q_proj.weight"),
    (lambda p: _edit_weights(p, lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(8, 32)})),
     r"tensor model.layers.1.mlp.up_proj.weight has shape \(8, 32\), the config implies \(48, 32\)"),
    (lambda p: _edit_weights(p, lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)})),
     "unexpected tensor model.layers.0.self_attn.q_norm.weight"),
])
def test_import_refusals(edit, message, tmp_path):
    cfg = tiny_model_config(**BASE, **CASES["gqa_tied"])
    export_hf(build(cfg), cfg, str(tmp_path))
    edit(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        load_hf(str(tmp_path))
    assert "\n" not in str(err.value)


def _greedy(model: GPT, ids: list[int], steps: int, eos: int) -> list[int]:
    """Reference greedy decoding with our model, no cache: the full sequence every step."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out]))[0, -1]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] > 1e-4  # no near-tie: fp differences cannot flip the argmax
            out.append(int(logits.argmax()))
            if out[-1] == eos:
                break
    return out


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return run_script("-m", module, *args, cwd=REPO, env=ENV)


def test_cli_export_and_generate(tmp_path, capsys):
    """A checkpoint in the Trainer's older format (model.pt; the sharded format is exported in
    test_sep2_checkpoint_exports_like_sep1) -> `python -m tinytron.commands.export` -> a folder that
    transformers loads (model and tokenizer) -> `python -m tinytron.commands.generate` prints the greedy
    continuation our own model computes, from the HF folder and from the checkpoint alike. (Two
    commands as processes of their own, forked with torch imported (run_script); the other command
    lines run in-process through the same `main`, since each process pays ~5 s of importing
    transformers.)"""
    cfg = tiny_model_config(**{**BASE, "vocab_size": 4096}, **CASES["gqa_tied"])
    model = build(cfg)
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    torch.save(model.state_dict(), step / "model.pt")
    torch.save({"step": 10, "config": {"model": dataclasses.asdict(cfg)}}, step / "meta.pt")
    (step / "COMPLETE").write_text("10\n")
    (run / "checkpoints" / "step_00000020").mkdir()  # newer but incomplete: must be ignored

    out = tmp_path / "hf"
    r = _cli("tinytron.commands.export", "--checkpoint", str(run), "--out", str(out), "--tokenizer", str(TOKENIZER))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[tinytron] exported step 10 ")
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.generation_config.eos_token_id == tokenizer.eos_token_id == 0
    assert_same_state(model.state_dict(), load_hf(str(out))[0].state_dict())

    prompt = "ROMEO:"
    expected = prompt + tokenizer.decode(_greedy(model, tokenizer(prompt).input_ids, 8, 0),
                                         skip_special_tokens=True)
    args = ["--prompt", prompt, "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu"]
    r = _cli("tinytron.commands.generate", "--checkpoint", str(out), *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected
    generate_main(["--checkpoint", str(step), "--tokenizer", str(TOKENIZER), *args])
    assert capsys.readouterr().out.rstrip("\n") == expected

    # Bad input: one line, exit 2, nothing written. An existing export is not overwritten unless asked.
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    for args, message in [
        (["--checkpoint", str(tmp_path / "nowhere")], f"--checkpoint {tmp_path / 'nowhere'}"),
        (["--checkpoint", str(run / "checkpoints" / "step_00000020")], "--checkpoint "),
        (["--checkpoint", str(run), "--tokenizer", str(tmp_path / "no_tokenizer")],
         f"--tokenizer {tmp_path / 'no_tokenizer'}: no such folder"),
        (["--checkpoint", str(run), "--out", str(out)],
         f"--out {out} is not empty: name a new folder, or add --overwrite to replace its files"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            export_main(["--out", str(tmp_path / "x"), *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"[tinytron] error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    export_main(["--checkpoint", str(step), "--out", str(out), "--dtype", "bf16", "--overwrite"])
    assert capsys.readouterr().out.startswith("[tinytron] exported step 10 ")
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16


def test_generate_text_sampling_is_seeded():
    cfg = tiny_model_config(**{**BASE, "vocab_size": 4096}, **CASES["moe_top2"])
    hf, tokenizer = load_generator(build(cfg), str(TOKENIZER), device="cpu")
    rng = torch.get_rng_state()
    a = generate_text(hf, tokenizer, "To be", max_new_tokens=12, seed=3)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert a == generate_text(hf, tokenizer, "To be", max_new_tokens=12, seed=3)
    assert len(a) > 0


def _train_moe_layouts(log_dir):
    """Train the same tiny MoE for 4 steps at sep 1 and at sep 2 (experts split over 2 ranks);
    return the two checkpoint folders."""
    from tests.utils import tiny_config
    from tinytron.training import Trainer
    out = []
    for sep in ("1", "2"):
        trainer = Trainer(tiny_config(f"{log_dir}/sep{sep}", "--sep_size", sep, "--use_moe", "--num_experts", "4",
                                      "--moe_intermediate_size", "32", "--max_steps", "4", "--no-do_val"))
        trainer.train()
        out.append(os.path.join(trainer.run_dir, "checkpoints", "step_00000004"))
    return out


def test_sep2_checkpoint_exports_like_sep1(tmp_path):
    """A checkpoint trained with experts sharded over 2 ranks holds all experts and exports to the
    same transformers weights as the sep-1 run. The layouts only sum in another order (gradients
    agree to ~1e-7), but AdamW normalises each element's update, so an element whose gradient is
    near zero moves by up to lr * (relative rounding) differently: after 4 steps at lr 1e-2 the
    weights agree to ~5e-6 absolute. Experts exported in a wrong order or from one rank only would
    differ by the weights' own size (~0.1)."""
    from tests.dist_helper import run_distributed
    ckpt_sep1, ckpt_sep2 = run_distributed(_train_moe_layouts, 2, str(tmp_path))[0]
    exported = []
    for i, ckpt in enumerate((ckpt_sep1, ckpt_sep2)):
        assert export_main(["--checkpoint", ckpt, "--out", str(tmp_path / f"hf{i}")]) in (None, 0)
        weights = {}
        for f in sorted((tmp_path / f"hf{i}").glob("*.safetensors")):
            weights.update(load_file(f))
        exported.append(weights)
    assert exported[0].keys() == exported[1].keys()
    assert any("experts" in k for k in exported[0])
    for name, w in exported[0].items():
        torch.testing.assert_close(exported[1][name], w, rtol=1e-5, atol=2e-5, msg=name)

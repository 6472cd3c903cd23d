"""Muon against AdamW on Tiny Shakespeare (real tokenizer, CPU): a small learning-rate sweep for each
optimizer, then validation loss at equal steps (and so equal tokens: both runs see the same global
batches) for each at its best learning rate.

    OMP_NUM_THREADS=1 python -m benchmarks.muon [--append docs/benchmarks.md]   (about 6 minutes)

Each run is one process of pretrain_example.py's Trainer, one after the other in this process, with
the same model, data order, schedule (warmup + cosine to lr/10) and weight decay 0.1. --optimizer
muon follows Moonlight: Muon's lr equals --max_lr (--muon_lr 0) with the match_rms_adamw
adjustment, so one --max_lr sweeps both its Muon and its AdamW parts.
"""

import argparse
import tempfile
import time

import torch

from benchmarks.common import markdown_table, report
from pretrain_example import ExampleTrainer
from tinytron.commands.plot import read_metrics
from tinytron.training.arguments import build_parser, config_from_args

DATA = "data/tinyshakespeare"
MODEL = ["--num_layer", "2", "--hidden_size", "128", "--num_attention_heads", "4", "--num_key_value_heads", "2",
         "--intermediate_size", "384", "--vocab_size", "4096", "--block_size", "128", "--seq_len", "128"]


def run(log_dir: str, optimizer: str, lr: float, args) -> dict[int, float]:
    """Train one configuration; -> {step: validation loss}."""
    flags = [*MODEL, "--dataset", f"{args.data}/input.txt", "--tokenizer", f"{args.data}/tokenizer",
             "--val_fraction", "0.1", "--data_cache_dir", args.cache, "--tokenize_num_proc", "1",
             "--device", "cpu", "--precision", "fp32", "--batch_size", "16", "--total_batch_size", "2048",
             "--max_steps", str(args.steps), "--warmup_steps", str(args.steps // 10), "--max_lr", str(lr),
             "--min_lr", str(lr / 10), "--weight_decay", "0.1", "--val_every_steps", str(args.steps // 3),
             "--val_max_tokens", str(args.val_tokens),
             "--no-do_save", "--num_workers", "1", "--optimizer", optimizer, "--log_dir", log_dir,
             "--exp_name", f"{optimizer}_{lr:g}"]
    trainer = ExampleTrainer(config_from_args(build_parser().parse_args(flags)))
    trainer.train()
    return {r["step"] + 1: r["val/loss"] for r in read_metrics(trainer.run_dir) if r.get("val/loss") is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--val_tokens", type=int, default=16384, help="validation tokens scored (a fixed subset)")
    p.add_argument("--adamw_lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--muon_lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    p.add_argument("--data", default=DATA)
    p.add_argument("--cache", default="data_cache")
    p.add_argument("--append", default=None)
    args = p.parse_args()
    curves, minutes = {}, {}
    with tempfile.TemporaryDirectory() as log_dir:
        for optimizer, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
            for lr in lrs:
                t0 = time.perf_counter()
                curves[optimizer, lr] = run(log_dir, optimizer, lr, args)
                minutes[optimizer, lr] = (time.perf_counter() - t0) / 60
    steps = sorted(next(iter(curves.values())))
    tokens = [f"step {s} ({s * 2048 / 1e3:.0f}k tok)" for s in steps]
    sweep = [[opt, f"{lr:g}", *(f"{curve[s]:.4f}" for s in steps), f"{minutes[opt, lr]:.1f}"]
             for (opt, lr), curve in curves.items()]
    best = {opt: min((lr for o, lr in curves if o == opt), key=lambda lr: curves[opt, lr][steps[-1]])
            for opt in ("adamw", "muon")}
    rows = [[opt, f"{best[opt]:g}", *(f"{curves[opt, best[opt]][s]:.4f}" for s in steps)] for opt in best]
    gain = curves["adamw", best["adamw"]][steps[-1]] - curves["muon", best["muon"]][steps[-1]]
    body = "\n\n".join([
        f"Model: 2 layers, hidden 128, 4 / 2 heads, SwiGLU 384, vocab 4096 (the Tiny Shakespeare BPE), "
        f"seq 128, 2048 tokens per step, {args.steps} steps, warmup "
        f"{args.steps // 10}, cosine to lr/10, weight decay 0.1, fp32, one process.",
        f"Validation loss ({args.val_tokens} held-out tokens, the same fixed windows for every run) during the "
        "sweep; minutes per run (wall, on a shared machine):",
        markdown_table(["optimizer", "--max_lr", *tokens, "minutes"], sweep),
        "Each at its best learning rate (lowest final validation loss), equal steps and tokens:",
        markdown_table(["optimizer", "best --max_lr", *tokens], rows),
        f"Final validation loss: Muon {'lower' if gain > 0 else 'higher'} by {abs(gain):.4f} nats/token."])
    report("Muon vs AdamW (Tiny Shakespeare, CPU)", torch.device("cpu"), "benchmarks.muon", body, args.append)


if __name__ == "__main__":
    main()

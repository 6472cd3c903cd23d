"""bf16 autocast vs fp32 at the trainer level: the same 100-step run (Tiny Shakespeare, same seed,
same batches) in both precisions; prints the max |loss difference| over the steps, the relative
grad-norm difference and the final validation losses.

    python -m benchmarks.bf16 [--moe] [--mock] [--device cuda] [--append docs/benchmarks.md] [-- TRAINER FLAGS]

--mock: mock tokens instead of Tiny Shakespeare (no `datasets` needed, nor data/: what a stock
CUDA image and benchmarks/gpu.sh have).

Parameters, gradients and AdamW state stay fp32 in both runs; bf16 changes the matmul inputs
and outputs only (RMSNorm, RoPE, the router, softmax statistics and the loss stay fp32). The figure
is the baseline the bf16 parity tests (tests/test_parallel_training.py) derive their tolerance from.
"""

import argparse
import tempfile

import numpy as np
import torch

from benchmarks.common import markdown_table, report
from pretrain_example import ExampleTrainer  # the repository root's entry script (run from there)
from tinytron.training import Trainer
from tinytron.training.arguments import build_parser, config_from_args

DATA = "data/tinyshakespeare"
DATA_FLAGS = ["--dataset", f"{DATA}/input.txt", "--tokenizer", f"{DATA}/tokenizer", "--val_fraction", "0.1"]
FLAGS = ["--num_layer", "2", "--hidden_size", "128", "--num_attention_heads", "4", "--num_key_value_heads", "2",
         "--intermediate_size", "384", "--vocab_size", "4096", "--block_size", "128",
         "--seq_len", "128", "--batch_size", "16", "--total_batch_size", "2048",
         "--max_steps", "100", "--warmup_steps", "10", "--max_lr", "2e-3", "--min_lr", "2e-4",
         "--val_every_steps", "100", "--no-do_save", "--num_workers", "1"]
MOE_FLAGS = ["--use_moe", "--num_experts", "4", "--num_experts_per_tok", "2", "--moe_intermediate_size", "192",
             "--moe_aux_loss_coeff", "0.01", "--moe_z_loss_coeff", "0.001"]


class RecordingTrainer(ExampleTrainer):
    def _init_dataset(self):
        return Trainer._init_dataset(self) if self.config.data.use_mock_data else super()._init_dataset()

    def train_step(self, batches):
        stats = super().train_step(batches)
        self.history.append((stats["loss"], stats["aux_loss"], stats["grad_norm"]))
        return stats

    def evaluate(self):
        self.val_loss = super().evaluate()
        return self.val_loss


def run(precision: str, device: str, flags: list[str], log_dir: str, mock: bool) -> tuple[np.ndarray, float]:
    data = ["--use_mock_data", "--mock_data_num_samples", "4000"] if mock else DATA_FLAGS
    args = data + FLAGS + ["--device", device, "--precision", precision, "--log_dir", log_dir, *flags]
    trainer = RecordingTrainer(config_from_args(build_parser().parse_args(args)))
    trainer.history = []
    trainer.train()
    return np.array(trainer.history), trainer.val_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moe", action="store_true", help="the same model with 4 experts, top-2")
    p.add_argument("--mock", action="store_true", help="mock tokens instead of Tiny Shakespeare (no datasets)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--append", default=None)
    p.add_argument("trainer_flags", nargs="*", help="after --: more Trainer flags (override ours)")
    args = p.parse_args()
    flags = (MOE_FLAGS if args.moe else []) + args.trainer_flags
    with tempfile.TemporaryDirectory() as tmp:
        (fp32, val32), (bf16, val16) = (run(prec, args.device, flags, f"{tmp}/{prec}", args.mock)
                                        for prec in ("fp32", "bf16"))
    dloss = np.abs(bf16[:, 0] - fp32[:, 0])
    rel_norm = np.abs(bf16[:, 2] - fp32[:, 2]) / fp32[:, 2]
    rows = [["max over steps", f"{dloss.max():.2e} (step {dloss.argmax()})", f"{rel_norm.max():.2%}"],
            ["mean over steps", f"{dloss.mean():.2e}", f"{rel_norm.mean():.2%}"],
            ["last 10 steps, max", f"{dloss[-10:].max():.2e}", f"{rel_norm[-10:].max():.2%}"]]
    if args.moe:
        daux = np.abs(bf16[:, 1] - fp32[:, 1])
        aux = (f"{daux.max():.2e}", f"{daux.mean():.2e}", f"{daux[-10:].max():.2e}")
        rows = [row + [f] for row, f in zip(rows, aux)]
    header = ["abs(bf16 - fp32)", "train loss", "grad norm (relative)"] + (["aux loss"] if args.moe else [])
    body = (f"{'MoE (4 experts, top-2)' if args.moe else 'Dense'} model, 2 layers, hidden 128, "
            f"{'mock tokens' if args.mock else 'Tiny Shakespeare'}, "
            f"{len(fp32)} steps of 16 x 128 tokens. Train loss fp32 {fp32[0, 0]:.4f} -> {fp32[-1, 0]:.4f}, "
            f"bf16 {bf16[0, 0]:.4f} -> {bf16[-1, 0]:.4f}; final val loss fp32 {val32:.4f}, bf16 {val16:.4f}.\n\n"
            + markdown_table(header, rows))
    report(f"bf16 vs fp32 at the trainer level ({'MoE' if args.moe else 'dense'}, {args.device})",
           torch.device(args.device), "benchmarks.bf16", body, args.append)


if __name__ == "__main__":
    main()

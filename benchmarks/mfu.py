"""FLOPs per token: the analytic formula checked against a FLOP counter; MFU of a training step.

    python -m benchmarks.mfu                                           (the check; CPU is enough)
    python -m benchmarks.mfu --device cuda --dtype bf16 --preset 0.25b [--compile]   (+ MFU)

1. `tinytron.utils.profile.flops_per_token` against `model_flop_counter()` (torch's
   FlopCounterMode) on a real forward + backward of GPT, for dense MHA, GQA and MoE top-2 configs
   (CPU, fp32), and for the 0.25B preset at seq 4096 on the meta device (shapes only, no compute:
   there SDPA runs as its math decomposition, two bmm per head, which torch counts itself).
   The counter counts attention as full (non-causal) T x T: torch ignores is_causal, and the meta
   path computes the full score matrix. So the comparison is with flops_per_token(causal=False);
   the causal count we use for MFU (query t sees t + 1 keys) differs from it by the attention
   term alone, 2 * H * D * (T - 1) forward FLOPs per token and layer, printed as "causal saving".
   MoE: dropless routing sends exactly N * k rows through the experts whatever the router picks,
   so the per-expert loop (CPU) counts the routed tokens' matmuls exactly; the grouped GEMM path
   (CUDA bf16) is counted through aten._grouped_mm (tests/test_profile.py checks both paths agree).
2. On a device with a known peak (a listed GPU, or --peak_tflops), the MFU of a timed training
   step of the preset: tokens/s x flops_per_token / peak, as the trainer reports it (per device).
"""

import argparse
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import AUTOCAST_DTYPES, PRESETS, TrainStep, markdown_table, preset_model, report
from tinytron.model import ModelConfig
from tinytron.utils.profile import counted_flops_per_token, flops_per_token, mfu, model_flop_counter, peak_flops

_SMALL = dict(vocab_size=2048, num_layer=2, hidden_size=256, num_attention_heads=8, intermediate_size=688)
CHECKS = [  # (name, config, seq_len, batch, device)
    ("dense MHA (8/8 heads)", ModelConfig(num_key_value_heads=8, **_SMALL), 256, 2, "cpu"),
    ("GQA (8/2 heads)", ModelConfig(num_key_value_heads=2, **_SMALL), 256, 2, "cpu"),
    ("GQA (8/2 heads), seq 1024", ModelConfig(num_key_value_heads=2, **_SMALL), 1024, 1, "cpu"),
    ("MoE top-2 of 8, GQA, untied head",
     ModelConfig(num_key_value_heads=2, use_moe=True, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=256, tied_lm_head=False, **_SMALL), 256, 2, "cpu"),
    ("0.25b preset (meta device)", PRESETS["0.25b"].config, 4096, 1, "meta"),
]


def check_table() -> str:
    rows = []
    for name, config, seq_len, batch, device in CHECKS:
        causal, full = flops_per_token(config, seq_len), flops_per_token(config, seq_len, causal=False)
        counted = counted_flops_per_token(config, seq_len, batch, model_flop_counter(), device)
        plain = counted_flops_per_token(config, seq_len, batch, FlopCounterMode(display=False), device)
        rows.append([name, seq_len, f"{causal / 1e6:,.2f}", f"{full / 1e6:,.2f}", f"{counted / 1e6:,.2f}",
                     f"{counted / full - 1:+.2e}", f"{plain / 1e6:,.2f}", f"{1 - causal / full:.1%}"])
    return markdown_table(
        ["config", "seq", "formula, causal (MFLOP/token)", "formula, causal=False",
         "counter (model_flop_counter)", "counter / formula(causal=False) - 1",
         "plain FlopCounterMode", "causal saving"], rows)


def mfu_table(args, device: torch.device, peak: float) -> str:
    model, config, batch, seq_len = preset_model(args, device)  # the presets are dense: fullgraph
    data = torch.randint(config.vocab_size, (batch, seq_len + 1), device=device)
    step = TrainStep(model, lambda: model(data[:, :-1], data[:, 1:])[1], device, AUTOCAST_DTYPES[args.dtype])
    times = [step()[0] for _ in range(args.warmup + args.steps)][args.warmup:]
    tok_s = batch * seq_len / statistics.median(times)
    rows = []
    for label, causal in (("causal (ours, the trainer's)", True), ("full attention (PaLM / nanoGPT)", False)):
        f = flops_per_token(config, seq_len, causal)
        rows.append([label, f"{f / 1e9:.3f}", f"{tok_s:,.0f}", f"{tok_s * f / 1e12:.3g}", f"{mfu(tok_s, f, peak):.1%}"])
    return (f"Timed training step (forward, backward, AdamW, zero_grad) of the {args.preset} preset, "
            f"{batch} x {seq_len} tokens, {args.dtype}{', compiled whole' if args.compile else ''}; "
            f"median of {args.steps} steps after {args.warmup} warm-up; peak {peak / 1e12:g} TFLOP/s.\n\n"
            + markdown_table(["FLOPs convention", "GFLOP/token", "tokens/s", "achieved TFLOP/s", "MFU"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model of the timed step")
    p.add_argument("--device", default="cpu", help="device of the timed step: cpu or cuda (or cuda:N)")
    p.add_argument("--dtype", choices=sorted(AUTOCAST_DTYPES), default="fp32")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq_len", type=int)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile the whole model, head and loss included")
    p.add_argument("--peak_tflops", type=float,
                   help="peak of the device in TFLOP/s (default: the listed bf16 peak of the GPU; none on CPU)")
    p.add_argument("--append", metavar="PATH", help="append the result section to this markdown file")
    args = p.parse_args()

    device = torch.device(args.device)
    body = ("Forward + backward FLOPs per token: the formula against torch's FlopCounterMode "
            "(model_flop_counter: attention backward counted as 2 x forward, without the flash "
            "kernels' recomputation, and the CPU flash-attention ops, which plain FlopCounterMode "
            "leaves out: its column has no attention on CPU). The counter counts full attention, so "
            "it is compared with causal=False; \"causal saving\" is 1 - causal / full.\n\n"
            + check_table() + "\n")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    if peak is None:
        body += f"\nMFU: n/a on {device.type} (no known peak; pass --peak_tflops).\n"
    else:
        body += "\n" + mfu_table(args, device, peak) + "\n"
    report("FLOPs per token and MFU", device, "benchmarks.mfu", body, args.append)


if __name__ == "__main__":
    main()

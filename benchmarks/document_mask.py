"""Training step time with and without --document_mask, same model, same batch.

    python -m benchmarks.document_mask                                  (CPU, fp32, 11M params)
    python -m benchmarks.document_mask --device cuda --dtype bf16 --preset 0.25b [--compile]

The batch is random tokens with an EOS (id 0) after each token with probability 1 / --doc_len, so
documents are geometric with mean --doc_len tokens. Steps (forward + loss, backward, AdamW,
zero_grad) alternate between: the plain causal model (the mask off, today's path), the document
mask, and the document mask with --reset_position_ids. The masked steps build the mask from the
tokens inside the step, once per step, as the Trainer does per micro-batch. The mask is SDPA's
boolean [B, 1, T, T] mask on CPU and flex_attention's block mask on CUDA, as the Trainer picks
(flex_attention has no backward on CPU). Median of the timed steps after warm-up; on CPU also the
process CPU time per step, which other processes' load inflates far less.
"""

import argparse
import statistics
import time

import torch

from benchmarks.common import AUTOCAST_DTYPES, TrainStep, markdown_table, preset_model, report, step_parser
from benchmarks.throughput import measure
from tinytron.model.document_mask import document_layout
from tinytron.model.gpt import cross_entropy_loss

EOS = 0
OFF, MASK, RESET = "mask off (causal)", "--document_mask", "--document_mask --reset_position_ids"


def parse_args() -> argparse.Namespace:
    p = step_parser(__doc__.splitlines()[0])
    p.add_argument("--doc_len", type=float, default=64.0, help="mean document length in tokens")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, config, batch, seq_len = preset_model(args, device)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(1, config.vocab_size, (batch, seq_len + 1), generator=g)
    data[torch.rand(batch, seq_len + 1, generator=g) < 1 / args.doc_len] = EOS
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)
    positions = torch.arange(seq_len, device=device)[None]
    use_flex = device.type == "cuda"

    def masked_loss(reset: bool) -> torch.Tensor:
        mask, pos = document_layout(x, EOS, positions, reset, use_flex)
        return cross_entropy_loss(model(x, position_ids=pos, document_mask=mask), y)

    dtype = AUTOCAST_DTYPES[args.dtype]
    steps = {OFF: TrainStep(model, lambda: model(x, y)[1], device, dtype),
             MASK: TrainStep(model, lambda: masked_loss(False), device, dtype),
             RESET: TrainStep(model, lambda: masked_loss(True), device, dtype)}
    results = measure(steps, device, args.warmup, args.steps)

    builds = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        document_layout(x, EOS, positions, False, use_flex)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        builds.append(time.perf_counter() - t0)

    on_cpu = device.type == "cpu"
    # The ratio: of process CPU time on CPU (robust to other load), of wall time on CUDA.
    basis = "cpu" if on_cpu else "wall"
    off = statistics.median(results[OFF][basis])
    rows = []
    for name, r in results.items():
        ms = 1e3 * statistics.median(r["wall"])
        extra = f"{1e3 * statistics.median(r['cpu']):.1f}" if on_cpu else f"{r['memory'] / 2**30:.2f}"
        rows.append([name, f"{ms:.1f}", f"{1e3 * min(r['wall']):.1f}", f"{1e3 * max(r['wall']):.1f}", extra,
                     f"{statistics.median(r[basis]) / off:.3f}"])
    docs = (data[:, :-1] == EOS).sum().item() + batch
    c = config
    body = (f"Model: preset {args.preset}, {c.num_layer} layers, hidden {c.hidden_size}, "
            f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, vocab {c.vocab_size}; "
            f"{batch} x {seq_len} tokens per step holding {docs} documents (mean length {args.doc_len:g}); "
            f"{args.dtype}{', compiled whole' if args.compile else ''}; mask engine "
            f"{'flex_attention block mask' if use_flex else 'SDPA boolean mask'}. Median of {args.steps} "
            f"timed steps per variant after {args.warmup} warm-up, the variants alternating. Building "
            f"the mask alone (document ids and mask, once per micro-batch): "
            f"{1e3 * statistics.median(builds):.2f} ms (median).\n\n"
            + markdown_table(["variant", "step ms (median)", "min", "max",
                              "process CPU ms (median)" if on_cpu else "step memory GiB",
                              f"{'CPU' if on_cpu else 'step'} time vs mask off"], rows) + "\n")
    report(f"Document mask: step time with and without (preset {args.preset}, {args.dtype}, {device.type}"
           f"{', compiled' if args.compile else ''})", device, "benchmarks.document_mask", body, args.append)


if __name__ == "__main__":
    main()

"""Training throughput of Tinytron's GPT against transformers' LlamaForCausalLM, same network.

    python -m benchmarks.throughput                                   (CPU, fp32, 11M params)
    python -m benchmarks.throughput --device cuda --dtype bf16 --preset 0.25b [--compile]

Both models are built in one process from one ModelConfig with the same weights (HF's is
`tinytron.interop.hf.to_hf_model` of ours, attn_implementation "sdpa"), train on the same batch
with the same optimizer (torch.optim.AdamW, default implementation, same hyper-parameters) and
the same precision (fp32, or bf16 autocast over fp32 parameters). One step = forward + loss,
backward, AdamW step, zero_grad. The loss is the same function for both: our
`cross_entropy_loss` (mean token cross-entropy in fp32) of the logits against the next tokens,
so both models see B x T inputs and B x T targets (HF's own `labels=` path would shift inside and
score T - 1 tokens per row). HF runs with use_cache=False, as in training (otherwise it builds a
KV cache every forward). Steps alternate between the models (A B B A ...), so a drift in machine
load hits both alike; warm-up steps are dropped and the median is reported. On CPU the table also
gives the process CPU time per step, which other processes' load inflates far less than wall time
(with --threads 1 it is the step's compute alone); on CUDA, the step's peak memory. The
first-step losses of the two models are printed as a check that they compute the same thing.
"""

import argparse
import dataclasses
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import AUTOCAST_DTYPES, PRESETS, TrainStep, markdown_table, report, step_parser
from tinytron.interop.hf import to_hf_model
from tinytron.model import GPT
from tinytron.model.gpt import cross_entropy_loss

OURS, HF = "Tinytron GPT", "HF LlamaForCausalLM"


def parse_args() -> argparse.Namespace:
    p = step_parser(__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true",
                   help="also print the top ops by self time of 3 profiled steps per model")
    return p.parse_args()


def build(args, device: torch.device) -> tuple[dict[str, TrainStep], dict[str, int], int]:
    """Returns ({name: its TrainStep}, {name: parameter count}, tokens per step)."""
    preset = PRESETS[args.preset]
    batch, seq_len = args.batch or preset.batch, args.seq_len or preset.seq_len
    config = dataclasses.replace(preset.config, block_size=seq_len)
    torch.manual_seed(0)
    ours = GPT(config)
    hf = to_hf_model(ours, config)  # a copy of our fp32 weights
    hf.set_attn_implementation("sdpa")  # transformers' default where available; made explicit
    ours.to(device).train()
    hf.to(device).train()
    if args.compile:
        for layer in ours.layers:
            layer.compile(fullgraph=True)
        for layer in hf.model.layers:
            layer.compile()
    data = torch.randint(config.vocab_size, (batch, seq_len + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)
    x, y = data[:, :-1], data[:, 1:]
    dtype = AUTOCAST_DTYPES[args.dtype]
    steps = {OURS: TrainStep(ours, lambda: ours(x, y)[1], device, dtype),
             HF: TrainStep(hf, lambda: cross_entropy_loss(hf(input_ids=x, use_cache=False).logits, y),
                           device, dtype)}
    params = {OURS: sum(p.numel() for p in ours.parameters()), HF: sum(p.numel() for p in hf.parameters())}
    return steps, params, batch * seq_len


def top_ops(step: TrainStep, device: torch.device) -> str:
    """The 15 ops with the most self time over 3 steps (CUDA time on a GPU, else CPU time)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)


def measure(steps: dict[str, TrainStep], device: torch.device, warmup: int, n: int) -> dict[str, dict]:
    """Alternates the models' steps (A B, B A, ...) for warmup + n rounds. Per model: "wall" and
    "cpu" (process CPU time, which time lost to other processes does not inflate) seconds of the
    n timed steps, "memory" (CUDA: the largest peak allocated during a step above the memory held
    between steps: activations, gradients, optimizer temporaries) and every step's "loss"."""
    names = list(steps)
    out = {name: {"wall": [], "cpu": [], "memory": 0, "loss": []} for name in names}
    for i in range(warmup + n):
        for name in (names if i % 2 == 0 else names[::-1]):
            r = out[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resting = torch.cuda.memory_allocated(device)
            cpu0 = time.process_time()
            seconds, loss = steps[name]()
            r["loss"].append(loss)
            if i >= warmup:
                r["wall"].append(seconds)
                r["cpu"].append(time.process_time() - cpu0)
            if device.type == "cuda":
                r["memory"] = max(r["memory"], torch.cuda.max_memory_allocated(device) - resting)
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps, params, tokens = build(args, device)
    results = measure(steps, device, args.warmup, args.steps)

    on_cpu = device.type == "cpu"
    hf_ms = 1e3 * statistics.median(results[HF]["wall"])
    rows = []
    for name, r in results.items():
        ms = 1e3 * statistics.median(r["wall"])
        extra = f"{1e3 * statistics.median(r['cpu']):.1f}" if on_cpu else f"{r['memory'] / 2**30:.2f}"
        rows.append([name, f"{params[name] / 1e6:.2f}M", f"{ms:.1f}", f"{1e3 * min(r['wall']):.1f}",
                     f"{1e3 * max(r['wall']):.1f}", f"{tokens / ms * 1e3:,.0f}", f"{hf_ms / ms:.3f}", extra])
    ours, hf = results[OURS], results[HF]
    drift = max(abs(a.item() - b.item()) for a, b in zip(ours["loss"], hf["loss"]))
    c = PRESETS[args.preset].config
    body = (f"Model: preset {args.preset}, {c.num_layer} layers, hidden {c.hidden_size}, "
            f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, intermediate "
            f"{c.intermediate_size}, vocab {c.vocab_size}, tied head; {tokens} tokens per step; "
            f"{args.dtype}{' autocast, fp32 parameters' if args.dtype != 'fp32' else ''}"
            f"{', blocks compiled' if args.compile else ''}. One step = forward + loss, backward, "
            f"AdamW, zero_grad; median of {args.steps} timed steps per model after {args.warmup} "
            f"warm-up, the models alternating. "
            + ("Process CPU time: all threads of this process; time lost to other load does not count."
               if on_cpu else "Step memory: peak allocated during a step above the memory held "
               "between steps (activations, gradients, optimizer temporaries).")
            + "\n\n"
            + markdown_table(["model", "params", "step ms (median)", "min", "max", "tokens/s", "throughput vs HF",
                              "process CPU ms (median)" if on_cpu else "step memory GiB"], rows)
            + f"\n\nFirst-step loss: Tinytron {ours['loss'][0].item():.6f}, HF {hf['loss'][0].item():.6f}; "
              f"largest loss difference over all {args.warmup + args.steps} steps {drift:.2e}.\n")
    if args.profile:
        for name, step in steps.items():
            body += f"\nTop ops, {name}:\n\n```\n{top_ops(step, device)}\n```\n"
    report(f"Training throughput: Tinytron GPT vs transformers Llama (preset {args.preset}, {args.dtype}, "
           f"{device.type}{', compiled' if args.compile else ''})", device, "benchmarks.throughput", body,
           args.append)


if __name__ == "__main__":
    main()

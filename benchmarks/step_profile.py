"""Where a training step's time goes: device time by kernel family, and the achieved TFLOP/s of
attention and of the GEMMs.

    python -m benchmarks.step_profile                                        (CPU, tiny, fp32)
    python -m benchmarks.step_profile --device cuda --dtype bf16 --preset 0.25b --compile

One step = forward + loss (our GPT's training path: the chunked head + cross-entropy), backward,
AdamW (fused on CUDA, as the Trainer), zero_grad. After --warmup steps (compilation included),
torch.profiler records --steps steps; each kernel's time (CUDA: the GPU kernels and memcpy/memset;
CPU: the self time of each op) is put in one family by its name (`FAMILIES`, the first that
matches): communication, attention, GEMM, loss, optimizer, copies and casts, else elementwise
(norms, RoPE, activations, and what inductor fused them into). Per step: each family's time and
share of the summed kernel time, next to the step's wall time (the difference is the device idle:
launch gaps, host syncs). Achieved TFLOP/s = model FLOPs / family time, in the Trainer's causal
convention (`flops_per_token`: attention counts the keys a causal query sees; backward = 2 x
forward, the flash kernels' recomputation not counted): attention's QK^T and AV, and every other
matmul for GEMM. Under inductor the loss and elementwise families share fused kernels: a
kernel that computes the log-softmax is "loss", so the shares are approximate. The attention
kernels' names are listed, to show which SDPA backend ran (flash, cuDNN, efficient, flex, math).
On CPU, a compiled graph's fused C++ kernels are recorded as one "Call CompiledFxGraph" op
(elementwise); on CUDA every triton kernel is recorded under a name made of the ops it fuses.
"""

import statistics
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import AUTOCAST_DTYPES, TrainStep, markdown_table, preset_model, report, step_parser
from tinytron.utils.profile import flops_per_token

# family -> substrings of lower-cased kernel / op names; the first family that matches wins.
FAMILIES = {
    "communication": ("nccl", "c10d", "gloo", "all_reduce", "allreduce", "all_gather", "reduce_scatter",
                      "all_to_all"),
    "attention": ("flash", "fmha", "attention", "sdpa", "attn"),
    "GEMM": ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
             "aten::_grouped_mm", "matmul", "mkldnn", "onednn", "triton_tem"),
    "loss": ("softmax", "logsumexp", "nll_loss", "cross_entropy", "scatter", "gather"),
    "optimizer": ("adam", "multi_tensor", "foreach", "lerp", "sgd"),
    "copies and casts": ("memcpy", "memset", "copy", "_to_copy", "aten::to", "aten::cat", "clone",
                         "contiguous", "convert", "cast", "fill"),
}
ORDER = [*FAMILIES, "elementwise"]


def family(name: str) -> str:
    lowered = name.lower()
    return next((f for f, keys in FAMILIES.items() if any(k in lowered for k in keys)), "elementwise")


def _in_optimizer(e) -> bool:
    while e is not None:
        if e.name.startswith("Optimizer.step"):
            return True
        e = e.cpu_parent
    return False


def kernel_times(prof, on_cuda: bool) -> dict[str, float]:
    """{kernel or op name: total microseconds} of the profiled steps: the GPU kernels (and
    memcpy/memset) on CUDA; on CPU the self time of every op (self, so nested ops count once),
    the ops under the optimizer's step named "adam step: <op>"."""
    times = defaultdict(float)
    events = prof.events()
    for e in events:
        if on_cuda and e.device_type == DeviceType.CUDA:
            times[e.name] += e.time_range.elapsed_us()
        elif not on_cuda and e.device_type == DeviceType.CPU and not e.name.startswith("ProfilerStep"):
            times[f"adam step: {e.name}" if _in_optimizer(e) else e.name] += e.self_cpu_time_total
    if on_cuda and not times:   # no kernel records: the device time each op launched
        for e in events:
            times[e.name] += e.self_device_time_total
    return times


def attention_flops_per_token(config, seq_len: int) -> float:
    """flops_per_token's attention term (QK^T and AV, causal, forward + backward) per token."""
    return 3.0 * config.num_layer * 4 * config.num_attention_heads * config.head_dim * (seq_len + 1) / 2


def main() -> None:
    p = step_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    model, config, batch, seq_len = preset_model(args, device)
    data = torch.randint(config.vocab_size, (batch, seq_len + 1), device=device)
    step = TrainStep(model, lambda: model(data[:, :-1], data[:, 1:])[1], device, AUTOCAST_DTYPES[args.dtype],
                     fused=on_cuda)   # the Trainer's AdamW on CUDA
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        walls = [step()[0] for _ in range(args.steps)]
    times = kernel_times(prof, on_cuda)

    per_family, names = defaultdict(float), defaultdict(set)
    for name, us in times.items():
        per_family[family(name)] += us / args.steps / 1e3   # ms per step
        names[family(name)].add(name)
    busy = sum(per_family.values())
    tokens = batch * seq_len
    attention = attention_flops_per_token(config, seq_len) * tokens
    flops = {"attention": attention, "GEMM": flops_per_token(config, seq_len) * tokens - attention}
    rows = []
    for f in ORDER:
        ms = per_family.get(f, 0.0)
        tflops = f"{flops[f] / (ms * 1e-3) / 1e12:.3g}" if f in flops and ms > 0 else ""
        rows.append([f, f"{ms:.2f}", f"{ms / busy:.1%}" if busy else "", tflops])
    rows.append(["all kernels", f"{busy:.2f}", "100%", ""])
    wall = 1e3 * statistics.median(walls)
    top_attention = sorted(names["attention"], key=lambda n: -times[n])[:3]
    c = config
    body = (f"Model: preset {args.preset}, {c.num_layer} layers, hidden {c.hidden_size}, {c.num_attention_heads} "
            f"heads / {c.num_key_value_heads} kv heads (head_dim {c.head_dim}), intermediate "
            f"{c.intermediate_size}, vocab {c.vocab_size}; {batch} x {seq_len} tokens per step; {args.dtype}"
            f"{', compiled whole' if args.compile else ', eager'}; {args.steps} profiled steps after "
            f"{args.warmup} warm-up ({warmup_s:.1f} s). Step wall time (median, profiler on): {wall:.2f} ms; "
            f"{'GPU kernel time' if on_cuda else 'CPU op self time'} per step by family:\n\n"
            + markdown_table(["family", "ms per step", "share", "achieved TFLOP/s (model FLOPs)"], rows)
            + "\n\nAttention kernels: " + (", ".join(f"`{n}`" for n in top_attention) or "none recorded") + "\n")
    report(f"Step profile by kernel family (preset {args.preset}, {args.dtype}, {device.type}"
           f"{', compiled' if args.compile else ''})", device, "benchmarks.step_profile", body, args.append)


if __name__ == "__main__":
    main()

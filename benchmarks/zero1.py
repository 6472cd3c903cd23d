"""ZeRO-1 vs plain data parallelism (shard=False, same flat buffers) vs torch DDP + AdamW.

World 2 on gloo/CPU, a GPT of a few M params. For each variant: median time of a full training
step (forward, backward, grad sync, clip, AdamW) and of its optimizer part alone, the optimizer
state per rank, and the bytes each rank hands to collectives per step, counted by construction:
every collective call of the DistributedOptimizer is recorded with its buffer size; for DDP the
buffer is every gradient, all-reduced once. "Wire" = bytes each rank sends with ring algorithms:
all-reduce 2(N-1)/N x buffer, reduce-scatter and all-gather (N-1)/N x the full buffer.

    python -m benchmarks.zero1        (from the repository root)
"""

import collections
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.common import cpu_name
from tests.dist_helper import run_distributed
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.model.config import ModelConfig
from tinytron.model.gpt import GPT

WORLD, BATCH, SEQ, WARMUP, STEPS = 2, 4, 128, 3, 20
CONFIG = ModelConfig(vocab_size=8192, num_layer=4, num_attention_heads=4, num_key_value_heads=2,
                     hidden_size=256, intermediate_size=688, block_size=SEQ)
RING = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
        "all_gather": lambda n: (n - 1) / n}


def _count_collectives(log: collections.Counter):
    """Wrap the collectives the DistributedOptimizer uses so each call adds its buffer bytes (the
    full, N-shard tensor for reduce-scatter and all-gather) to log[op]."""
    def counted(fn, op, full_arg):
        def wrapper(*args, **kwargs):
            log[op] += args[full_arg].nbytes
            return fn(*args, **kwargs)
        return wrapper
    for name, op, full_arg in (("all_reduce", "all_reduce", 0),
                               ("all_to_all_single", "reduce_scatter", 1),   # gloo's reduce-scatter
                               ("reduce_scatter_single", "reduce_scatter", 1),
                               ("reduce_scatter_tensor", "reduce_scatter", 1),
                               ("all_gather_single", "all_gather", 0),
                               ("all_gather_into_tensor", "all_gather", 0)):
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name), op, full_arg))


def _bench(variant: str):
    rank = dist.get_rank()
    log = collections.Counter()
    _count_collectives(log)
    torch.manual_seed(0)
    model = GPT(CONFIG)
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g)
    make_opt = lambda params: torch.optim.AdamW(   # noqa: E731
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-4)

    if variant == "ddp":   # grads are all-reduced during backward, overlapped with it
        ddp = DistributedDataParallel(model, bucket_cap_mb=40)
        opt = make_opt(list(model.parameters()))
        phases = {"clip": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
                  "step": opt.step}
        forward, zero_grad, state = ddp, lambda: opt.zero_grad(set_to_none=False), opt.state
    else:
        zero = DistributedOptimizer(make_opt(list(model.parameters())), dist.group.WORLD,
                                    shard=(variant == "zero1"), bucket_size_mb=40,
                                    param_names=model.named_parameters())
        phases = {"sync": zero.reduce_gradients, "clip": lambda: zero.clip_grad_norm(1.0),
                  "step": zero.step}
        forward, zero_grad, state = model, zero.zero_grad, zero.optimizer.state

    times = collections.defaultdict(list)
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            log.clear()
            times.clear()
        t0 = time.perf_counter()
        zero_grad()
        _, loss = forward(data[:, :-1], data[:, 1:])
        loss.backward()
        for name, phase in phases.items():
            t = time.perf_counter()
            phase()
            times[name].append(time.perf_counter() - t)
        times["total"].append(time.perf_counter() - t0)
    numel = sum(p.numel() for p in model.parameters())
    state_bytes = sum(v.nbytes for st in state.values() for v in st.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    per_step = {op: b / STEPS for op, b in log.items()}
    if variant == "ddp":   # the C++ reducer all-reduces every gradient once per step
        per_step = {"all_reduce": 4 * numel}
    return dict(ms={k: 1e3 * statistics.median(v) for k, v in times.items()},
                state_bytes=state_bytes, per_step=per_step, numel=numel)


def main() -> None:
    rows = []
    for variant, label in (("zero1", "ZeRO-1 (reduce-scatter + all-gather)"),
                           ("allreduce", "shard=False (all-reduce)"),
                           ("ddp", "torch DDP + AdamW")):
        r = run_distributed(_bench, WORLD, variant)[0]
        buffer = sum(r["per_step"].values())
        wire = sum(RING[op](WORLD) * b for op, b in r["per_step"].items())
        ops = ", ".join(f"{op} {b / 2**20:.2f}" for op, b in sorted(r["per_step"].items()))
        ms = [f"{r['ms'][k]:.1f}" if k in r["ms"] else "in backward"
              for k in ("total", "sync", "clip", "step")]
        rows.append(f"| {label} | {' | '.join(ms)} | {ops} | {buffer / 2**20:.2f} | "
                    f"{wire / 2**20:.2f} | {r['state_bytes'] / 2**20:.2f} |")
    print(f"GPT {r['numel'] / 1e6:.2f}M params, world {WORLD} (gloo, CPU, 1 thread per rank), "
          f"batch {BATCH} x {SEQ} tokens per rank, median of {STEPS} steps after {WARMUP} warm-up")
    print(f"machine: {cpu_name()}, {platform.system()}; torch {torch.__version__}; "
          "command: python -m benchmarks.zero1\n")
    print("| variant | step ms | grad sync ms | clip ms | AdamW (+ all-gather) ms "
          "| collective buffers per step (MiB) | total buffer MiB | ring wire MiB per rank "
          "| AdamW state MiB per rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

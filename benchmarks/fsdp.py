"""--fsdp (ZeRO-3 through FSDP2) vs ZeRO-1 (the default), on gloo/CPU at world 2 and 4.

Both engines live in the same processes, each with its own copy of the same GPT, and take turns
step by step (interleaved: load changes hit both alike). Per engine:
  state MiB       this rank's parameters + gradients + AdamW state, counted from the real tensors
                  (by storage; FSDP: the local shards): exact
  peak MiB        the resident set's high-water mark of a separate pair of processes that trains
                  only that engine, above the process before the model was built (VmHWM - VmRSS,
                  Linux; tensors over 128 KiB are mmapped, so the mark follows the live tensors:
                  activations, gathered units and collective buffers included)
  step ms         forward + backward + grad reduction + clip + AdamW step, median of STEPS after
                  WARMUP, slowest rank
  buffers MiB     bytes handed to collectives per step, counted by wrapping them (the full, N-shard
                  tensor for reduce-scatter and all-gather): FSDP all-gathers each unit's params in
                  forward and again in backward and reduce-scatters its grads; ZeRO-1 reduce-scatters
                  the grads and all-gathers the updated params. "Wire" = what each rank sends with
                  ring algorithms, (N-1)/N x the buffer, plus the grad norm's scalar all-reduce.

    python -m benchmarks.fsdp            (from the repository root)
"""

import collections
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.common import cpu_name
from tests.dist_helper import run_distributed
from tinytron.distributed import parallel_state as ps
from tinytron.distributed.fsdp import FSDPOptimizer, apply_fsdp
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.model.config import ModelConfig
from tinytron.model.gpt import GPT, cross_entropy_loss

BATCH, SEQ, WARMUP, STEPS = 2, 128, 2, 8
CONFIG = ModelConfig(vocab_size=8192, num_layer=4, num_attention_heads=4, num_key_value_heads=2,
                     hidden_size=512, intermediate_size=1408, block_size=SEQ)
ENGINES = {"zero1": "ZeRO-1 (default)", "fsdp": "--fsdp (FSDP2)"}
COLLECTIVES = (("all_reduce", 0), ("all_to_all_single", 1),   # gloo's reduce-scatter in ZeRO-1
               ("reduce_scatter_single", 1), ("reduce_scatter_tensor", 1),
               ("all_gather_single", 0), ("all_gather_into_tensor", 0))
KIND = {"all_to_all_single": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
        "reduce_scatter_tensor": "reduce_scatter", "all_gather_single": "all_gather",
        "all_gather_into_tensor": "all_gather", "all_reduce": "all_reduce"}


def _count_collectives(counts: collections.Counter) -> None:
    def counted(fn, name, full_arg):
        def wrapper(*args, **kwargs):   # the full tensor, passed by position or (FSDP2) by name
            full = args[full_arg] if len(args) > full_arg else next(
                kwargs[k] for k in (("output_tensor", "output") if full_arg == 0 else ("input_tensor", "input"))
                if k in kwargs)
            counts[KIND[name]] += full.nbytes
            return fn(*args, **kwargs)
        return wrapper
    for name, full_arg in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name), name, full_arg))


def _build(engine: str):
    """(model, optimizer) of one engine: the same weights on every rank and engine."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    if engine == "fsdp":
        apply_fsdp(model, dist.group.WORLD, ps.get_dp_group(), ps.get_dp_size(), bf16=False)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    if engine == "fsdp":
        return model, FSDPOptimizer(adamw, model, dist.group.WORLD)
    return model, DistributedOptimizer(adamw, model)


def _step(model, opt, data: torch.Tensor) -> float:
    t0 = time.perf_counter()
    opt.zero_grad()
    with opt.micro_step(last=True):
        cross_entropy_loss(model(data[:, :-1]), data[:, 1:]).backward()
    opt.reduce_gradients()
    opt.clip_grad_norm(1.0)
    opt.step()
    opt.finish_param_gather()
    return time.perf_counter() - t0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _state_bytes(model, opt) -> int:
    tensors = [_local(p) for p in model.parameters()] + [_local(p.grad) for p in model.parameters()]
    tensors += [_local(v) for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _data(rank: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(rank))


def _interleaved():
    """Both engines, taking turns: step times, bytes per step, resident state."""
    ps.initialize_parallel_state(1)
    counts = collections.Counter()
    _count_collectives(counts)
    engines = {name: _build(name) for name in ENGINES}
    data = _data(dist.get_rank())
    seconds, per_step, state = collections.defaultdict(list), {}, {}
    for i in range(WARMUP + STEPS):
        for name, (model, opt) in engines.items():
            counts.clear()
            dist.barrier()
            t = _step(model, opt, data)
            if i >= WARMUP:
                seconds[name].append(t)
            per_step[name] = dict(counts)
    for name, (model, opt) in engines.items():
        state[name] = _state_bytes(model, opt)
        t = torch.tensor(seconds[name], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds[name] = 1e3 * statistics.median(t.tolist())
    numel = sum(p.numel() for p in GPT(CONFIG).parameters())
    return {"ms": dict(seconds), "bytes": per_step, "state": state, "numel": numel}


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _peak(engine: str) -> float:
    """MiB the resident set grew to, above what it was before the model was built."""
    ps.initialize_parallel_state(1)
    before = _kib("VmRSS:")
    model, opt = _build(engine)
    data = _data(dist.get_rank())
    for _ in range(3):
        _step(model, opt, data)
    return (_kib("VmHWM:") - before) / 1024


def main() -> None:
    # A fixed mmap threshold (glibc): every tensor over 128 KiB is mmapped and returned to the OS
    # when freed, so the resident set follows the live tensors (set before the ranks start).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    rows = []
    for world in (2, 4):
        r = run_distributed(_interleaved, world)[0]
        peaks = {name: max(run_distributed(_peak, world, name)) for name in ENGINES}
        for name, label in ENGINES.items():
            b = r["bytes"][name]
            wire = sum((world - 1) / world * v * (2 if op == "all_reduce" else 1) for op, v in b.items())
            ops = ", ".join(f"{op} {v / 2**20:.2f}" for op, v in sorted(b.items()))
            rows.append(f"| {world} | {label} | {r['state'][name] / 2**20:.2f} | {peaks[name]:.0f} "
                        f"| {r['ms'][name]:.0f} | {ops} | {wire / 2**20:.2f} |")
    print(f"GPT {r['numel'] / 1e6:.2f}M params (fp32), gloo, CPU, 1 thread per rank, batch {BATCH} x {SEQ} "
          f"tokens per rank; medians of {STEPS} interleaved steps after {WARMUP} warm-up")
    print(f"machine: {cpu_name()}, {platform.system()}; torch {torch.__version__}; "
          "command: python -m benchmarks.fsdp\n")
    print("| world | engine | params + grads + AdamW MiB per rank | peak RSS MiB per rank | step ms "
          "| collective buffers per step (MiB) | ring wire MiB per rank |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""--fsdp (ZeRO-3 through FSDP2) vs ZeRO-1 (the default), on gloo/CPU at world 2 and 4; and
--fsdp with --optimizer muon (each Muon matrix gathered whole on its owner: distributed/fsdp/muon.py).

The engines live in the same processes, each with its own copy of the same GPT, and take turns
step by step (interleaved: load changes hit all alike). Per engine:
  state MiB       this rank's parameters + gradients + optimizer state (AdamW; Muon's momentum of
                  the matrices it owns), counted from the real tensors (by storage; FSDP: the
                  local shards): exact
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
                  Muon under FSDP: its two all-to-alls per process group ("all_to_all", uneven
                  splits), whose wire bytes are counted exactly (all but the rank's own split).

    python -m benchmarks.fsdp [--engines zero1 fsdp fsdp_muon]     (from the repository root)
"""

import argparse
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
from tinytron.training.config import OptimConfig
from tinytron.training.muon import muon_optimizer

BATCH, SEQ, WARMUP, STEPS = 2, 128, 2, 8
CONFIG = ModelConfig(vocab_size=8192, num_layer=4, num_attention_heads=4, num_key_value_heads=2,
                     hidden_size=512, intermediate_size=1408, block_size=SEQ)
ENGINES = {"zero1": "ZeRO-1 (default)", "fsdp": "--fsdp (FSDP2)", "fsdp_muon": "--fsdp --optimizer muon"}
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
            if KIND[name] == "all_to_all":   # Muon's uneven splits: all but this rank's own, exactly
                splits = args[3] if len(args) > 3 else kwargs["input_split_sizes"]
                own = splits[dist.get_rank(kwargs.get("group"))] * full.element_size()
                counts["all_to_all wire"] += full.nbytes - own
            return fn(*args, **kwargs)
        return wrapper
    for name, full_arg in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name), name, full_arg))


def _build(engine: str):
    """(model, optimizer) of one engine: the same weights on every rank and engine."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    if engine.startswith("fsdp"):
        apply_fsdp(model, dist.group.WORLD, ps.get_dp_group(), ps.get_dp_size(), bf16=False)
    if engine == "fsdp_muon":   # the Trainer's split: Muon on the blocks' matrices, AdamW on the rest
        optimizer = muon_optimizer(model, OptimConfig(optimizer="muon", max_lr=1e-4), fused=False)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    if engine.startswith("fsdp"):
        return model, FSDPOptimizer(optimizer, model, dist.group.WORLD)
    return model, DistributedOptimizer(optimizer, model)


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


def _interleaved(names: list[str]):
    """The engines `names`, taking turns: step times, bytes per step, resident state."""
    ps.initialize_parallel_state(1)
    counts = collections.Counter()
    _count_collectives(counts)
    engines = {name: _build(name) for name in names}
    data = _data(dist.get_rank())
    seconds, per_step, state = collections.defaultdict(list), {}, {}
    for i in range(WARMUP + STEPS):
        for name, (model, opt) in engines.items():
            # ZeRO-1's gloo reduce-scatter is an all-to-all (grad_buffer.reduce_scatter); FSDP2
            # calls none, so under FSDP every all-to-all is Muon's.
            KIND["all_to_all_single"] = "all_to_all" if name.startswith("fsdp") else "reduce_scatter"
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    names = parser.parse_args().engines
    # A fixed mmap threshold (glibc): every tensor over 128 KiB is mmapped and returned to the OS
    # when freed, so the resident set follows the live tensors (set before the ranks start).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    rows = []
    for world in (2, 4):
        r = run_distributed(_interleaved, world, names)[0]
        peaks = {name: max(run_distributed(_peak, world, name)) for name in names}
        for name in names:
            b, label = dict(r["bytes"][name]), ENGINES[name]
            wire = b.pop("all_to_all wire", 0) + sum((world - 1) / world * v * (2 if op == "all_reduce" else 1)
                                                     for op, v in b.items() if op != "all_to_all")
            ops = ", ".join(f"{op} {v / 2**20:.2f}" for op, v in sorted(b.items()))
            rows.append(f"| {world} | {label} | {r['state'][name] / 2**20:.2f} | {peaks[name]:.0f} "
                        f"| {r['ms'][name]:.0f} | {ops} | {wire / 2**20:.2f} |")
    print(f"GPT {r['numel'] / 1e6:.2f}M params (fp32), gloo, CPU, 1 thread per rank, batch {BATCH} x {SEQ} "
          f"tokens per rank; medians of {STEPS} interleaved steps after {WARMUP} warm-up")
    print(f"machine: {cpu_name()}, {platform.system()}; torch {torch.__version__}; "
          f"command: python -m benchmarks.fsdp --engines {' '.join(names)}\n")
    print("| world | engine | params + grads + optimizer state MiB per rank | peak RSS MiB per rank | step ms "
          "| collective buffers per step (MiB) | ring wire MiB per rank |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

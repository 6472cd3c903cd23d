"""ZeRO-1 vs plain data parallelism (shard=False, same flat buffers) vs torch DDP + AdamW, with the
DistributedOptimizer's communication overlapped with compute (the default) and not.

World 2 on gloo/CPU, a GPT of a few M params. Every variant lives in the same two processes and
they take turns (interleaved: load changes hit all alike), two consecutive steps each, the second
timed, so that its forward waits for the all-gathers the first one launched. Per variant, medians
of STEPS timed steps after WARMUP:
  step ms         forward + backward + grad sync + clip + optimizer step (+ all-gather), on the
                  slower rank
  exposed grad    from the return of the last backward to the start of the optimizer step: the
                  wait for the grad reductions, the norm (one scalar all-reduce) and the clip
  gather wait     time the next forward waits for the param all-gathers (overlap_param_gather)
  last bucket     a blocking reduction of the last-launched bucket alone: the least exposed time
                  overlap can reach (that bucket holds the embedding, whose grad is final last)
The waits are taken on the rank that needed them least, step by step: a rank that finishes its
backward first also waits for its peer to catch up (load imbalance, not communication); the last
rank to arrive waits only for the communication still in flight.
Bytes each rank hands to collectives per step are counted by construction (every collective call
with its buffer size; DDP: every gradient, all-reduced once). "Wire" = bytes each rank sends with
ring algorithms: all-reduce 2(N-1)/N x buffer, reduce-scatter and all-gather (N-1)/N x buffer.

    python -m benchmarks.zero1 [--bucket_size_mb 4]        (from the repository root)
"""

import argparse
import collections
import contextlib
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.common import cpu_name
from tests.dist_helper import run_distributed
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.distributed.zero1.grad_buffer import reduce_scatter
from tinytron.model.config import ModelConfig
from tinytron.model.gpt import GPT

WORLD, BATCH, SEQ, WARMUP, STEPS = 2, 4, 128, 3, 20
CONFIG = ModelConfig(vocab_size=8192, num_layer=4, num_attention_heads=4, num_key_value_heads=2,
                     hidden_size=256, intermediate_size=688, block_size=SEQ)
RING = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
        "all_gather": lambda n: (n - 1) / n}
VARIANTS = {"zero1": "ZeRO-1, overlapped", "zero1_off": "ZeRO-1, not overlapped",
            "allreduce": "shard=False (all-reduce), overlapped",
            "allreduce_off": "shard=False (all-reduce), not overlapped", "ddp": "torch DDP + AdamW"}


class _Log:
    """What the wrapped collectives record: per variant, buffer bytes per op, and the seconds
    spent waiting for all-gathers while `in_forward`."""

    def __init__(self):
        self.variant, self.in_forward = None, False
        self.bytes = collections.defaultdict(collections.Counter)
        self.gather_wait = 0.0


class _TimedWork:
    def __init__(self, work, log: _Log):
        self.work, self.log = work, log

    def wait(self):
        t = time.perf_counter()
        self.work.wait()
        if self.log.in_forward:
            self.log.gather_wait += time.perf_counter() - t


def _count_collectives(log: _Log) -> None:
    """Wrap the collectives the DistributedOptimizer uses so each call adds its buffer bytes (the
    full, N-shard tensor for reduce-scatter and all-gather) to log.bytes[variant][op]."""
    def counted(fn, op, full_arg):
        def wrapper(*args, **kwargs):
            log.bytes[log.variant][op] += args[full_arg].nbytes
            work = fn(*args, **kwargs)
            return _TimedWork(work, log) if op == "all_gather" and work is not None else work
        return wrapper
    for name, op, full_arg in (("all_reduce", "all_reduce", 0),
                               ("all_to_all_single", "reduce_scatter", 1),   # gloo's reduce-scatter
                               ("reduce_scatter_single", "reduce_scatter", 1),
                               ("reduce_scatter_tensor", "reduce_scatter", 1),
                               ("all_gather_single", "all_gather", 0),
                               ("all_gather_into_tensor", "all_gather", 0)):
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name), op, full_arg))


def _make_opt(params):
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-4)


class _Variant:
    """One variant's model, optimizer and timed training step."""

    def __init__(self, name: str, bucket_size_mb: float):
        torch.manual_seed(0)
        self.model = GPT(CONFIG)
        if name == "ddp":   # grads are all-reduced during backward, overlapped with it
            self.forward = DistributedDataParallel(self.model, bucket_cap_mb=bucket_size_mb)
            opt = _make_opt(list(self.model.parameters()))
            self.zero_grad = lambda: opt.zero_grad(set_to_none=False)
            self.micro_step = lambda last: contextlib.nullcontext()
            self.reduce = lambda: None
            self.clip = lambda: torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.step, self.state, self.zero = opt.step, opt.state, None
            return
        overlap = not name.endswith("_off")
        zero = DistributedOptimizer(
            _make_opt(list(self.model.parameters())), self.model, shard=name.startswith("zero1"),
            bucket_size_mb=bucket_size_mb, overlap_grad_reduce=overlap, overlap_param_gather=overlap)
        self.forward, self.zero_grad, self.micro_step = self.model, zero.zero_grad, zero.micro_step
        self.reduce, self.clip = zero.reduce_gradients, lambda: zero.clip_grad_norm(1.0)
        self.step, self.state, self.zero = zero.step, zero.optimizer.state, zero

    def run(self, data: torch.Tensor, log: _Log) -> dict[str, float]:
        """One training step; its phase times in seconds."""
        t0 = time.perf_counter()
        self.zero_grad()
        log.in_forward, log.gather_wait = True, 0.0
        _, loss = self.forward(data[:, :-1], data[:, 1:])
        log.in_forward = False
        with self.micro_step(True):
            loss.backward()
        t1 = time.perf_counter()
        self.reduce()
        t2 = time.perf_counter()
        self.clip()
        t3 = time.perf_counter()
        self.step()
        t4 = time.perf_counter()
        return {"step": t4 - t0, "exposed": t3 - t1, "reduce": t2 - t1,
                "gather_wait": log.gather_wait}


def _bench(bucket_size_mb: float):
    log = _Log()
    _count_collectives(log)
    variants = {name: _Variant(name, bucket_size_mb) for name in VARIANTS}
    g = torch.Generator().manual_seed(dist.get_rank())
    data = torch.randint(CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g)
    # The last-launched bucket of the overlapped ZeRO-1 variant, reduced alone and blocking.
    buf, b = variants["zero1"].zero._slots[-1]
    last = torch.zeros(buf.buckets[b][1] - buf.buckets[b][0])
    times = collections.defaultdict(lambda: collections.defaultdict(list))
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            log.bytes.clear()
            times.clear()
        for name, variant in variants.items():
            log.variant = name
            variant.run(data, log)
            for phase, seconds in variant.run(data, log).items():
                times[name][phase].append(seconds)
            if variant.zero is not None:   # not in the next variant's time
                variant.zero.finish_param_gather()
        log.variant = "last bucket"
        t = time.perf_counter()
        reduce_scatter(last[:last.numel() // WORLD], last, dist.group.WORLD).wait()
        times["last bucket"]["reduce"].append(time.perf_counter() - t)
    out = {}
    for name, variant in variants.items():
        per_step = {op: n / (2 * STEPS) for op, n in log.bytes[name].items()}
        if name == "ddp":   # the C++ reducer all-reduces every gradient once per step
            per_step = {"all_reduce": sum(p.nbytes for p in variant.model.parameters())}
        state_bytes = sum(v.nbytes for st in variant.state.values() for v in st.values()
                          if torch.is_tensor(v) and v.dim() > 0)
        out[name] = dict(ms={k: _median_over_steps(v, k == "step")
                             for k, v in times[name].items()},
                         per_step=per_step, state_bytes=state_bytes)
    out["last_bucket"] = dict(ms=_median_over_steps(times["last bucket"]["reduce"], False),
                              mib=last.nbytes / 2**20)
    out["numel"] = sum(p.numel() for p in variants["ddp"].model.parameters())
    return out


def _median_over_steps(seconds: list[float], slowest: bool) -> float:
    """Median over steps, in ms, of the slowest rank's time (slowest) or of the least one."""
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if slowest else dist.ReduceOp.MIN)
    return 1e3 * statistics.median(t.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket_size_mb", type=float, default=4.0,
                        help="DistributedOptimizer bucket size and DDP bucket_cap_mb")
    args = parser.parse_args()
    r = run_distributed(_bench, WORLD, args.bucket_size_mb)[0]
    rows = []
    for name, label in VARIANTS.items():
        v = r[name]
        ms = v["ms"]
        wire = sum(RING[op](WORLD) * b for op, b in v["per_step"].items())
        ops = ", ".join(f"{op} {b / 2**20:.2f}" for op, b in sorted(v["per_step"].items()))
        exposed = (f"{ms['exposed']:.1f} (clip only; DDP waits inside backward)" if name == "ddp"
                   else f"{ms['exposed']:.1f} ({ms['reduce']:.1f} reduce wait)")
        rows.append(f"| {label} | {ms['step']:.1f} | {exposed} | {ms['gather_wait']:.1f} | {ops} "
                    f"| {wire / 2**20:.2f} | {v['state_bytes'] / 2**20:.2f} |")
    print(f"GPT {r['numel'] / 1e6:.2f}M params, world {WORLD} (gloo, CPU, 1 thread per rank), "
          f"batch {BATCH} x {SEQ} tokens per rank, buckets of {args.bucket_size_mb:g} MB, "
          f"medians of {STEPS} interleaved steps after {WARMUP} warm-up")
    print(f"machine: {cpu_name()}, {platform.system()}; torch {torch.__version__}; "
          f"command: python -m benchmarks.zero1 --bucket_size_mb {args.bucket_size_mb:g}")
    print(f"last-launched bucket ({r['last_bucket']['mib']:.2f} MiB) reduced alone, blocking: "
          f"{r['last_bucket']['ms']:.1f} ms\n")
    print("| variant | step ms | exposed grad comm ms (backward end -> optimizer step) "
          "| all-gather wait in next forward ms | collective buffers per step (MiB) "
          "| ring wire MiB per rank | AdamW state MiB per rank |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Shared by the benchmark scripts: model presets, a timed training step, the machine description
and the markdown output (printed, and appended to a doc with --append)."""

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinytron.distributed.runtime import init_runtime
from tinytron.model import GPT, ModelConfig


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    seq_len: int
    batch: int


PRESETS = {
    # 11.0M parameters: a step takes a fraction of a second on a few CPU cores.
    "cpu": Preset(ModelConfig(vocab_size=4096, num_layer=6, num_attention_heads=6, num_key_value_heads=2,
                              hidden_size=384, intermediate_size=1024, block_size=256), 256, 4),
    # The default ModelConfig at its training length: 0.23B parameters (51M of them the tied
    # embedding), the "0.25B" model.
    "0.25b": Preset(ModelConfig(vocab_size=50304, num_layer=12, num_attention_heads=32, num_key_value_heads=4,
                                hidden_size=1024, intermediate_size=4096, block_size=4096), 4096, 4),
}

# --dtype: the autocast dtype; parameters, gradients and AdamW state stay fp32 either way.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def step_parser(description: str) -> argparse.ArgumentParser:
    """The flags of the one-process step benchmarks (throughput, document_mask): the model
    --preset, --device, --dtype, --batch, --seq_len, --warmup and timed --steps, --threads,
    --compile and --append."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--dtype", choices=sorted(AUTOCAST_DTYPES), default="fp32")
    p.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    p.add_argument("--seq_len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--warmup", type=int, default=3, help="steps per variant not timed")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the whole model, head and loss included (as --use_compile)")
    p.add_argument("--append", metavar="PATH", help="append the result section to this markdown file")
    return p


def preset_model(args: argparse.Namespace, device: torch.device) -> tuple[GPT, ModelConfig, int, int]:
    """The `step_parser` flags' GPT (seed 0, block_size = the sequence length) in training mode on
    `device`, compiled whole with --compile (fullgraph, static shapes: the presets are dense) ->
    (model, its config, batch, seq_len)."""
    preset = PRESETS[args.preset]
    batch, seq_len = args.batch or preset.batch, args.seq_len or preset.seq_len
    config = dataclasses.replace(preset.config, block_size=seq_len)
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    if args.compile:
        model.compile(fullgraph=True, dynamic=False)
    return model, config, batch, seq_len


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One training step of `model`: loss = loss_fn() under autocast, backward, AdamW step,
    zero_grad (set_to_none). AdamW runs with torch's default implementation choice (foreach on
    CUDA, the per-parameter loop on CPU), or fused (`fused`, CUDA: the Trainer's), the same for
    every model a benchmark compares."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
                 autocast_dtype: torch.dtype | None, fused: bool = False):
        self.loss_fn, self.device, self.autocast_dtype = loss_fn, device, autocast_dtype
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=fused or None)

    def __call__(self) -> tuple[float, torch.Tensor]:
        """Runs one step; returns (seconds, the detached loss). The device is synchronised before
        and after, so the time is the step's alone."""
        synchronize(self.device)
        t0 = time.perf_counter()
        with (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
              else contextlib.nullcontext()):
            loss = self.loss_fn()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - t0, loss.detach()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """One line: the GPU (for a CUDA run), the CPU model, its cores and torch's thread count."""
    threads = torch.get_num_threads()
    cpu = f"{cpu_name()} ({os.cpu_count()} cores, {threads} torch thread{'s' if threads > 1 else ''})"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}; host {cpu}"
    return cpu


def command_line(module: str) -> str:
    """The command that reproduces this run, as typed from the repository root."""
    return " ".join(["python -m", module] + [shlex.quote(a) for a in sys.argv[1:]])


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, device: torch.device, module: str, body: str, append: str | None) -> None:
    """Print a section (title, date, machine, torch version, command, then `body`: notes and
    tables in markdown) and, when `append` is a path, append it to that file."""
    section = (f"## {title}\n\n"
               f"- date: {datetime.date.today().isoformat()}\n"
               f"- machine: {machine(device)}\n"
               f"- torch {torch.__version__}\n"
               f"- command: `{command_line(module)}`\n\n"
               f"{body.strip()}\n")
    print(section)
    if append:
        os.makedirs(os.path.dirname(append) or ".", exist_ok=True)
        with open(append, "a") as f:
            f.write("\n" + section)


def init_distributed(device: str) -> torch.device:
    """Start a torchrun benchmark's process group (distributed/runtime.py: NCCL with one GPU per
    process for "cuda", or "auto" when CUDA is available, else gloo on CPU). Returns this rank's
    device."""
    runtime = init_runtime(device)
    if not dist.is_initialized():
        raise SystemExit("launch this benchmark with torchrun --nproc_per_node 2 or more")
    return runtime.device


def count_a2a_bytes() -> list[int]:
    """Wrap dist.all_to_all_single so that every call adds the bytes it sends to other ranks to the
    returned one-element counter (exact for variable splits: the self chunk is not counted)."""
    counter = [0]
    real = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                 **kwargs):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
        rows = input_split_sizes or [input.shape[0] // world] * world
        counter[0] += (sum(rows) - rows[rank]) * row_bytes
        return real(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)

    dist.all_to_all_single = counting
    return counter


def slowest_rank_seconds(fn, device: torch.device) -> float:
    """Run fn() on every rank after a barrier; return the slowest rank's wall time (a
    distributed step is as slow as its slowest rank)."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - t0], device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def alternate_steps(layouts: list, warmup: int, steps: int) -> tuple[dict, dict]:
    """Run `warmup + steps` rounds of one `layout.step()` (seconds) per layout, the layouts in turn,
    so that a drift in machine load hits them alike. Returns ({name: [seconds]}, {name: [bytes this
    rank's all-to-alls sent to other ranks]}) of the steps after the warm-up. Call it once."""
    a2a_sent = count_a2a_bytes()
    times = {layout.name: [] for layout in layouts}
    sent = {layout.name: [] for layout in layouts}
    for step in range(warmup + steps):
        for layout in layouts:
            a2a_sent[0] = 0
            elapsed = layout.step()
            if step >= warmup:
                times[layout.name].append(elapsed)
                sent[layout.name].append(a2a_sent[0])
    return times, sent


def layout_report(device: torch.device, module: str, model: str, header: list[str], rows: list[list]) -> str:
    """A torchrun layout benchmark's output: the machine and world, the command, the `model`
    line, then the markdown table of `header` and `rows`."""
    world = dist.get_world_size()
    return (f"machine: {machine(device)}; torch {torch.__version__}; world {world} ({dist.get_backend()}), fp32\n"
            f"command: torchrun --nproc_per_node {world} -m {module} {' '.join(sys.argv[1:])}\n"
            f"model: {model}\n\n" + markdown_table(header, rows))


def layout_parser(description: str, seq_len: int) -> argparse.ArgumentParser:
    """The flags the torchrun layout benchmarks (sep, moe) share: the model's depth, width, heads and
    vocabulary, --seq_len, the --steps timed after --warmup, and --device."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--num_layer", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_attention_heads", type=int, default=8)
    p.add_argument("--num_key_value_heads", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=seq_len)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda (NCCL, one GPU per process) if available, else cpu (gloo)")
    return p

"""The Trainer's own cost per step: the same model, batches and optimizer settings through
`Trainer.train()` (default flags: bf16 autocast, ZeRO-1 wrapper, --num_workers 2, logging, metrics)
and through a plain PyTorch loop (forward, loss, backward, clip, AdamW step, zero_grad), alternated
step by step in one process, so that a drift in machine load hits both alike.

    python -m benchmarks.trainer_overhead [--steps 300] [--threads 1] [--append docs/benchmarks.md] [-- TRAINER FLAGS]

A Trainer step is the time from one `train_step` call to the next (everything the loop does per
step: data, logging, metrics, its checks), less the plain step run in between; a plain step is the
time of its forward, backward, clip and optimizer step on the batches the Trainer just consumed.
Both clocks are reported: wall time, and this thread's CPU time (the model runs on this thread
with --threads 1), which other processes on a busy machine disturb much less. A second table says
where the Trainer's own work goes (thread CPU time per step, over all steps).
"""

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, report
from tinytron.model import GPT
from tinytron.training import trainer as trainer_module
from tinytron.training.arguments import build_parser, config_from_args
from tinytron.training.trainer import Trainer

# The tiny model: 4 layers, hidden 128, 64-token windows, batch 12.
FLAGS = ["--use_mock_data", "--device", "cpu", "--num_layer", "4", "--hidden_size", "128",
         "--num_attention_heads", "4", "--num_key_value_heads", "2", "--intermediate_size", "512",
         "--vocab_size", "4096", "--seq_len", "64", "--batch_size", "12", "--total_batch_size", "768",
         "--warmup_steps", "10", "--max_lr", "1e-3", "--min_lr", "1e-4", "--mock_data_num_samples", "20000",
         "--no-do_save", "--no-do_val"]


def _metered(fn, parts: dict, name: str):
    """fn, adding the thread CPU time of each call to parts[name]."""
    def call(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0.0) + time.thread_time() - t0
    return call


class _Recorded:
    """An iterator that keeps what it hands out (the Trainer's micro-batches of one step)."""

    def __init__(self, it, parts: dict):
        self.it, self.seen = it, []
        self.next = _metered(lambda: next(self.it), parts, "next batch (DataLoader, this process)")

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.next()
        self.seen.append(batch)
        return batch


class PlainLoop:
    """The same model (same init) and AdamW settings as the Trainer's, stepped by hand."""

    def __init__(self, trainer: Trainer):
        cfg = trainer.config
        torch.manual_seed(cfg.training.seed)
        self.model = GPT(cfg.model)
        o = cfg.optim
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=o.max_lr, betas=(o.beta1, o.beta2), eps=o.adam_eps)
        self.clip = cfg.training.grad_clip_value
        self.bf16 = cfg.training.precision == "bf16"

    def step(self, batches: list[torch.Tensor]) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        for batch in batches:
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext():
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.thread_time() - c0


class TimedTrainer(Trainer):
    """Runs one plain-loop step after each of its own steps and times both."""

    def train_step(self, batches) -> dict:
        now = time.perf_counter(), time.thread_time()
        if self.last_entry is not None:
            self.trainer_times.append(tuple(t - t_last - t_plain for t, t_last, t_plain
                                            in zip(now, self.last_entry, self.plain_times[-1])))
        self.last_entry = now
        recorded = _Recorded(batches, self.parts)
        stats = super().train_step(recorded)
        self.plain_times.append(self.plain.step(recorded.seen))
        return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the figures")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--append", default=None)
    p.add_argument("trainer_flags", nargs="*", help="after --: more Trainer flags (override ours)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        flags = FLAGS + ["--max_steps", str(args.steps), "--log_dir", tmp, *args.trainer_flags]
        trainer = TimedTrainer(config_from_args(build_parser().parse_args(flags)))
        trainer.plain, trainer.trainer_times, trainer.plain_times, trainer.last_entry = PlainLoop(trainer), [], [], None
        trainer.parts = parts = {}
        for obj, methods, name in ((trainer.log, ("train_step", "metrics_record"),
                                    "logging (log.txt, console, metrics)"),
                                   (trainer.optimizer, ("zero_grad", "reduce_gradients", "clip_grad_norm", "step"),
                                    "optimizer wrapper (zero, reduce, clip, step)"),
                                   (trainer_module, ("reduce_step_stats",), "step statistics (the host sync)")):
            for method in methods:
                setattr(obj, method, _metered(getattr(obj, method), parts, name))
        trainer.train()
    ours, plain = trainer.trainer_times[args.warmup:], trainer.plain_times[args.warmup:-1]
    rows, ratios = [], []
    for clock, i in (("wall", 0), ("CPU (this thread)", 1)):
        t_ours, t_plain = [t[i] for t in ours], [t[i] for t in plain]
        ratios.append(f"{clock} {statistics.median(t_ours) / statistics.median(t_plain):.3f}")
        rows += [[f"{name}, {clock}", f"{1000 * statistics.median(t):.2f}", f"{1000 * statistics.mean(t):.2f}",
                  f"{1000 * min(t):.2f}"] for name, t in (("Trainer", t_ours), ("plain loop", t_plain))]
    body = (f"4 layers, hidden 128, vocab 4096, 64-token windows, batch 12 (one micro-step), "
            f"{trainer.config.training.precision}, {len(ours)} steps each after {args.warmup} left out; "
            f"Trainer / plain (medians): **{', '.join(ratios)}**.\n\n"
            + markdown_table(["loop, clock", "median ms", "mean ms", "min ms"], rows)
            + "\n\nWhere the Trainer's own work goes (thread CPU time, mean per step):\n\n"
            + markdown_table(["part", "ms per step"], [[name, f"{1000 * t / args.steps:.3f}"]
                                                       for name, t in parts.items()]))
    report("Trainer overhead vs a plain loop", torch.device("cpu"), "benchmarks.trainer_overhead", body,
           args.append)


if __name__ == "__main__":
    main()

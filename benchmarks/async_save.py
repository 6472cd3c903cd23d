"""Training time a checkpoint save costs: synchronous saves against --async_save, at world 2.

    torchrun --nproc_per_node 2 -m benchmarks.async_save [--reps 2] [--append docs/benchmarks.md]

The same run (GPT-2-small shape: 12 layers, hidden 768, vocab 32768, 0.12B parameters; AdamW with
ZeRO-1; fp32 on CPU; 12 steps of one 64-token sequence per rank) three ways: without saves, saving
at steps 3, 6 and 9 synchronously, and the same with --async_save; the variants alternate, `--reps`
times each, so that a drift in machine load hits all alike. The time measured is the training
loop's from the start of step 0 to the end of step 11 (the end-of-run save of step 12 comes after
it); the time lost per save is (that time - the run's without saves) / 3, median over the reps.
Async loses the staging (a host copy of each rank's parameters and optimizer state) and whatever
the background write takes from the steps it overlaps, plus the wait when a save is still in
flight at the next one. Each run's CPU time over the same window (process CPU, mean over the
ranks) says what a save costs in CPU: where the training keeps every core busy (CPU training), the
background write's CPU comes out of the steps it overlaps, so async cannot lose less than that.
"""

import argparse
import gc
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from benchmarks.common import init_distributed, markdown_table, report
from tinytron.distributed.runtime import close_runtime
from tinytron.training.arguments import build_parser, config_from_args
from tinytron.training.trainer import Trainer
from tinytron.utils.params import count_parameters

FLAGS = ["--use_mock_data", "--device", "cpu", "--precision", "fp32", "--num_layer", "12", "--hidden_size", "768",
         "--num_attention_heads", "12", "--num_key_value_heads", "12", "--intermediate_size", "2048",
         "--vocab_size", "32768", "--block_size", "64", "--seq_len", "64", "--batch_size", "1",
         "--total_batch_size", "128", "--max_steps", "12", "--warmup_steps", "1", "--mock_data_num_samples", "64",
         "--no-do_val", "--num_workers", "0", "--save_every_steps", "3"]
VARIANTS = {"no saves": ["--no-do_save"], "synchronous": [], "--async_save": ["--async_save"]}
SAVES = 3   # at steps 3, 6 and 9, inside the timed window


class TimedTrainer(Trainer):
    """Records when step 0 starts and when the last step ends (before the end-of-run save): wall
    time and this process's CPU time (all its threads: the background writer's too)."""

    def train_step(self, batches) -> dict:
        if self.step == 0:
            self.started, self.cpu_started = time.perf_counter(), time.process_time()
        stats = super().train_step(batches)
        self.ended, self.cpu_ended = time.perf_counter(), time.process_time()
        return stats


def one_run(flags: list[str], log_dir: str) -> tuple[float, float]:
    """-> (wall seconds of the slowest rank, CPU seconds per rank: the mean over ranks)."""
    config = config_from_args(build_parser().parse_args([*FLAGS, *flags, "--log_dir", log_dir]))
    trainer = TimedTrainer(config)
    trainer.train()
    seconds = torch.tensor([trainer.ended - trainer.started])
    cpu = torch.tensor([trainer.cpu_ended - trainer.cpu_started])
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpu)
    del trainer
    gc.collect()   # the model, optimizer and staging buffers: one run's at a time in memory
    return seconds.item(), cpu.item() / dist.get_world_size()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--append", metavar="PATH", help="append the result section to this markdown file")
    args = p.parse_args()
    init_distributed("cpu")
    times, cpus = {name: [] for name in VARIANTS}, {name: [] for name in VARIANTS}
    for _ in range(args.reps):
        for name, flags in VARIANTS.items():
            folder = tempfile.mkdtemp(prefix="async-save-") if dist.get_rank() == 0 else None
            box = [folder]
            dist.broadcast_object_list(box)
            seconds, cpu = one_run(flags, box[0])
            times[name].append(seconds)
            cpus[name].append(cpu)
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(box[0])
    if dist.get_rank() != 0:
        close_runtime()
        return
    base = statistics.median(times["no saves"])
    lost = {name: (statistics.median(t) - base) / SAVES for name, t in times.items() if name != "no saves"}
    cpu_base = statistics.median(cpus["no saves"])
    cpu_cost = {name: (statistics.median(c) - cpu_base) / SAVES for name, c in cpus.items() if name != "no saves"}
    config = config_from_args(build_parser().parse_args(FLAGS))
    rows = [[name, " / ".join(f"{t:.1f}" for t in times[name]), f"{statistics.median(times[name]):.1f}",
             "" if name == "no saves" else f"{lost[name]:.2f}", " / ".join(f"{c:.1f}" for c in cpus[name]),
             "" if name == "no saves" else f"{cpu_cost[name]:.2f}"] for name in VARIANTS]
    body = (f"Model: {count_parameters(config.model)['total'] / 1e6:.0f}M parameters, world 2 (gloo), ZeRO-1, fp32; "
            f"12 steps, saves at 3, 6 and 9 (timed), {args.reps} reps per variant, alternating.\n\n"
            + markdown_table(["variant", "steps 0-11, each rep (s)", "median (s)", "lost per save (s)",
                              "CPU per rank, each rep (s)", "CPU per save per rank (s)"], rows)
            + f"\n\n--async_save loses {lost['--async_save'] / lost['synchronous']:.0%} of what a synchronous save "
            f"loses; its CPU per save is {cpu_cost['--async_save'] / lost['synchronous']:.0%} of the synchronous "
            "save's loss.\n")
    report("Checkpoint saves: synchronous vs --async_save (world 2, CPU)", torch.device("cpu"),
           "torch.distributed.run --nproc_per_node 2 -m benchmarks.async_save", body, args.append)
    close_runtime()   # the threads the runs started (failure watcher, ...) joined before the interpreter exits


if __name__ == "__main__":
    main()

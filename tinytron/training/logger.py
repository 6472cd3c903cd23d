"""Everything a run writes about itself, behind one object (rank 0 writes; a no-op elsewhere):

    <run_dir>/config.json     the run's Config
    <run_dir>/log.txt         one line per step: "<step> train <loss>", "<step> val <loss>",
                              "<step> skipped non-finite loss <loss> grad_norm <norm>",
                              "<step> eval <task> acc <acc> acc_norm <acc_norm> items <n>"
    console                   one line per step and a tqdm progress bar
    metrics.jsonl, TensorBoard, W&B   through MetricsLogger (metrics.py)

Steps count from 0. On resume, log.txt and the metrics sinks drop what was logged for steps at or
after the resumed one (`resume_step`), so each step appears once.
"""

import json
import os
import shutil
from contextlib import contextmanager

import torch
from tqdm import tqdm

from tinytron.distributed import abort
from tinytron.training.config import Config, ConfigError
from tinytron.training.metrics import MetricsLogger

LOG_FILE = "log.txt"


def check_writable(run_dir: str, log_dir: str) -> None:
    """ConfigError unless the run folder, or the nearest folder above it that exists, is a folder
    this process may write in: the folder itself is created only once the run starts (RunLogger)."""
    path = os.path.abspath(run_dir)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"--log_dir {log_dir} is not writable ({path} is a file)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--log_dir {log_dir} is not writable (no write permission on {path})")


class RunLogger:
    """Creates the run folder (rank 0) when it does not exist yet; if the run then fails before its
    first step is logged, the folder is removed again as the process exits (abort.before_exit):
    a run that never started leaves no folder behind."""

    def __init__(self, run_dir: str, config: Config, *, is_main: bool, resume_step: int, wandb_id: str | None):
        self.run_dir, self.config, self.is_main = run_dir, config, is_main
        self.bar = None
        if is_main:
            if not os.path.isdir(run_dir):
                os.makedirs(run_dir)
                abort.before_exit(self._remove_unstarted)
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(config.to_dict(), f, indent=2)
            self._rewind_log(resume_step)
        lg = config.logging
        self.metrics = MetricsLogger(run_dir, config.to_dict(), is_main=is_main, resume_step=resume_step,
                                     tensorboard=lg.tensorboard, wandb_project=lg.wandb_project,
                                     wandb_run_name=lg.wandb_run_name, wandb_entity=lg.wandb_entity,
                                     wandb_id=wandb_id)

    def _remove_unstarted(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _rewind_log(self, resume_step: int) -> None:
        """log.txt keeps the lines of steps < resume_step, so resumed steps are not logged twice."""
        log = os.path.join(self.run_dir, LOG_FILE)
        if os.path.exists(log):
            with open(log) as f:
                kept = [line for line in f if int(line.split()[0]) < resume_step]
            with open(log + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(log + ".tmp", log)

    @property
    def wandb_id(self) -> str | None:
        return self.metrics.wandb_id

    @contextmanager
    def progress(self, total: int, initial: int):
        """The console's progress bar for the loop. `with`: the bar's line is ended even on an
        error, so the error prints on its own line."""
        with tqdm(total=total, initial=initial, disable=not self.is_main, dynamic_ncols=True) as self.bar:
            yield self.bar

    def line(self, text: str) -> None:
        """Append one line to log.txt."""
        if self.is_main:
            with open(os.path.join(self.run_dir, LOG_FILE), "a") as f:
                f.write(text + "\n")

    def train_step(self, step: int, stats: dict) -> None:
        """log.txt and the console for optimizer step `step` (stats: Trainer.train_step's, timed)."""
        if not stats["finite"]:
            self.line(f"{step} skipped non-finite loss {stats['loss']} grad_norm {stats['grad_norm']}")
        else:
            self.line(f"{step} train {stats['loss']:.6f}")
        if not self.is_main:
            return
        abort.cancel_before_exit(self._remove_unstarted)   # the run has started: its folder stays
        aux = f" | aux {stats['aux_loss']:.4f}" if self.config.model.use_moe else ""
        util, tok_s = stats["mfu"], stats["tokens_per_s"]
        mfu_s = "n/a" if util is None else f"{100 * util:.1f}%"
        self.bar.write(f"[tinytron] step {step:6d} | loss {stats['loss']:.6f}{aux} | lr {stats['lr']:.3e} | grad norm "
                       f"{stats['grad_norm']:.4f} | {1000 * stats['step_time']:.0f} ms | {tok_s:,.0f} tok/s | "
                       f"MFU {mfu_s}")
        # No redraw of its own: update() redraws the bar at most every `mininterval` (0.1 s).
        self.bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{tok_s:,.0f}", mfu=mfu_s, refresh=False)
        self.bar.update(1)

    def console(self, text: str) -> None:
        """One line on the console (global rank 0), above the progress bar when there is one."""
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(text)

    def val(self, step: int, loss: float) -> None:
        self.line(f"{step} val {loss:.6f}")
        self.console(f"[tinytron] step {step:6d} | val loss {loss:.6f}")

    def downstream(self, step: int, scores: dict) -> None:
        """log.txt and the console: one line per task of --eval_tasks (scores: DownstreamEval's)."""
        for name, s in scores.items():
            line = f"{step} eval {name} acc {s.acc:.6f} acc_norm {s.acc_norm:.6f} items {s.items}"
            self.line(line)
            self.console(f"[tinytron] {line}")

    def metrics_record(self, step: int, stats: dict, tokens: int, skipped_steps: int, device: torch.device) -> None:
        """One record per step to metrics.jsonl / TensorBoard / W&B."""
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        record = {"tokens": tokens, "train/loss": stats["loss"],
                  "val/loss": stats.get("val_loss"), "train/lr": stats["lr"], "train/grad_norm": stats["grad_norm"],
                  "perf/step_time_s": stats["step_time"], "perf/tokens_per_s": stats["tokens_per_s"],
                  "perf/mfu": stats["mfu"], "perf/peak_memory_gib": mem, "train/skipped_steps": skipped_steps,
                  # stragglers: each rank's own part of the step (sync.reduce_step_stats)
                  "perf/slowest_rank": stats["slowest_rank"], "perf/slowest_rank_time_s": stats["slowest_s"],
                  "perf/fastest_rank_time_s": stats["fastest_s"]}
        for name, s in stats.get("eval", {}).items():  # --eval_tasks, when scored at this step
            record.update({f"eval/{name}/acc": s.acc, f"eval/{name}/acc_norm": s.acc_norm})
        if self.config.model.use_moe:
            record["moe/aux_loss"] = stats["aux_loss"]
        if stats["expert_load"] is not None:
            record["moe/expert_load"] = stats["expert_load"]
        self.metrics.log(step, record)

    def close(self) -> None:
        self.metrics.close()

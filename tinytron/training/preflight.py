"""Checks made once the Trainer knows its data and length, before any step: what would otherwise
train silently on the wrong thing."""

import hashlib

import torch

from tinytron.training.checkpoint import find_latest, step_of
from tinytron.training.config import Config, ConfigError, validate_config


def complete_run_error(run_dir: str, step: int, total_steps: int) -> ConfigError:
    """What auto-resume of a finished run says (--max_steps is part of the run's identity, so a
    longer run is another folder that starts from this one's checkpoint)."""
    return ConfigError(f"{run_dir} is complete at step {step} of {total_steps}: to train it further, add "
                       f"--resume_path {run_dir} and a larger --max_steps; for a new run, another --exp_name "
                       "or --log_dir")


def check_flags(cfg: Config, world_size: int) -> None:
    """What can be checked from the flags alone, in one process, before a job starts (the
    launcher's preflight): every flag's constraint, and a run folder already complete at
    --max_steps (it would resume, train nothing and exit). ConfigError."""
    validate_config(cfg, world_size)
    latest = None if cfg.checkpoint.resume_path else find_latest(cfg.run_dir)
    if latest and cfg.training.max_steps and step_of(latest) >= cfg.training.max_steps:
        raise complete_run_error(cfg.run_dir, step_of(latest), cfg.training.max_steps)


def check_items(train_dataset, val_dataset, seq_len: int) -> None:
    """Each item must hold seq_len + 1 tokens (the inputs and their next-token targets): else a
    one-line ConfigError naming the set and the class `_init_dataset` returned."""
    for name, data in (("training", train_dataset), ("validation", val_dataset)):
        if len(data) and len(data[0]) != seq_len + 1:
            raise ConfigError(f"item 0 of the {name} set ({type(data).__name__}) has {len(data[0])} tokens; "
                              f"each item must hold --seq_len + 1 = {seq_len + 1} (inputs and next-token targets)")


def data_identity(train_dataset, val_dataset) -> str:
    """What a Trainer subclass's own data adds to the run's identity (its folder's hash): each
    set's class, length and three items (first, middle, last) as int64 tokens, hashed. Cheap (three
    reads per set), and it tells apart corpora, splits, tokenizers and window lengths, so a run on
    other data never auto-resumes this one's folder."""
    h = hashlib.sha256()
    for data in (train_dataset, val_dataset):
        n = len(data)
        h.update(f"{type(data).__module__}.{type(data).__qualname__} {n}".encode())
        for i in sorted({0, n // 2, n - 1}) if n else ():
            h.update(torch.as_tensor(data[i], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def short_run_warnings(cfg: Config, total_steps: int) -> list[str]:
    """A line for each schedule or cadence the run is too short for (e.g. a run of max_epochs
    whose steps all fall inside the warmup)."""
    t, o, out = cfg.training, cfg.optim, []
    if o.warmup_steps >= total_steps:
        out.append(f"--warmup_steps {o.warmup_steps} >= the run's {total_steps} steps: the learning rate "
                   "never leaves warmup")
    if t.do_val and t.val_every_steps > total_steps:
        out.append(f"--val_every_steps {t.val_every_steps} > the run's {total_steps} steps: validation runs "
                   "once, at the end")
    if t.eval_tasks and t.eval_every_steps > total_steps:
        out.append(f"--eval_every_steps {t.eval_every_steps} > the run's {total_steps} steps: --eval_tasks are "
                   "scored once, at the end")
    return out


def run_summary(trainer) -> list[str]:
    """The console's start block (global rank 0): where the run writes, its layout, model, step and
    data, so nothing needs finding with `ls`. `trainer`: a Trainer after setup."""
    cfg, t = trainer.config, trainer.config.training
    sep = cfg.parallel.sep_size
    engine = "FSDP2" if trainer.fsdp else "ZeRO-1" if cfg.optim.use_distributed_optimizer else "all-reduce, no ZeRO"
    params = sum(p.numel() for p in trainer.model.parameters())   # this rank's, before any sharding of FSDP
    lg = cfg.logging
    lines = [f"run folder: {trainer.run_dir} ({f'resumed at step {trainer.step}' if trainer.step else 'new'})",
             f"layout: world {trainer.world_size} = dp {trainer.world_size // sep} x sep {sep}, {engine}, "
             f"{trainer.device.type}, {t.precision}{', compiled' if t.use_compile else ''}",
             f"model: {cfg.model.num_layer} layers x {cfg.model.hidden_size}, {params / 1e6:.2f}M parameters on "
             "this rank",
             f"steps: {trainer.total_steps} of {t.total_batch_size:,} tokens ({trainer.global_batch_seqs} x "
             f"{t.seq_len}; micro-batch {t.batch_size}, grad accumulation {trainer.grad_accum_steps})",
             f"data: {type(trainer.train_dataset).__name__}, {len(trainer.train_dataset):,} training / "
             f"{len(trainer.val_dataset):,} validation sequences"
             + (f" (identity {trainer.data_identity}, in the run folder's hash)" if trainer.data_identity else "")]
    if lg.tensorboard:
        lines.append(f"TensorBoard: tensorboard --logdir {trainer.run_dir}/tb")
    if t.use_profiler:
        lines.append(f"profiler: steps {t.steps_to_profile[0]}-{t.steps_to_profile[1]} to "
                     f"{trainer.run_dir}/rank0_trace.json")
    return lines

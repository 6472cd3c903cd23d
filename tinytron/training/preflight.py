"""Checks made once the Trainer knows its data and length, before any step: what would otherwise
train silently on the wrong thing."""

import hashlib

import torch
from torch.utils.data import ConcatDataset

from tinytron.training.checkpoint import CheckpointError, is_inside, plan_resume, step_of
from tinytron.training.config import Config, ConfigError, validate_config
from tinytron.training.logger import check_writable


def finished_error(run_dir: str, checkpoint: str, step: int, total_steps: int, skip_data_steps: int) -> ConfigError:
    """What resuming a checkpoint at or past the run's last step says: the run folder is complete
    (auto-resume, or its own --resume_path again), or --resume_path is another run's checkpoint
    already that far. --max_steps is part of the run's identity, so training a finished run
    further is a new run folder that starts from its last checkpoint; the data order goes on
    where it stopped, so a --skip_data_steps of the command would skip again."""
    if not is_inside(checkpoint, run_dir):
        return ConfigError(f"--resume_path {checkpoint} is at step {step}, not below --max_steps {total_steps}: "
                           "nothing to train (raise --max_steps)")
    again = ", without --skip_data_steps (its data offset carries over)" if skip_data_steps else ""
    return ConfigError(f"{run_dir} is complete at step {step} of {total_steps}: to train it further, run with "
                       f"--resume_path {run_dir} and a --max_steps above {step}{again}, which starts a new run "
                       "folder from its last checkpoint; for a new run, another --exp_name or --log_dir")


def check_flags(cfg: Config, world_size: int) -> None:
    """What can be checked from the flags alone, in one process, before a job starts (the
    launcher's preflight): every flag's constraint, a --log_dir that can be written, a
    --resume_path that exists and holds a checkpoint, and a run folder that resuming would find
    finished at --max_steps (the run's own newest checkpoint: auto-resume, or its --resume_path
    run again). Data a Trainer subclass brings is in its run folder's name, unknown here: that
    folder is checked by the workers. ConfigError."""
    validate_config(cfg, world_size)
    check_writable(cfg.run_dir, cfg.logging.log_dir)
    c, max_steps = cfg.checkpoint, cfg.training.max_steps
    try:
        plan = plan_resume(cfg.run_dir, c.resume_path, c.skip_data_steps)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if plan and max_steps and step_of(plan[0][0]) >= max_steps:
        raise finished_error(cfg.run_dir, plan[0][0], step_of(plan[0][0]), max_steps, c.skip_data_steps)


def _recorded_max(data) -> int | None:
    """The largest token id a dataset records about all of its items (TokenWindowDataset's
    token cache), over the parts of a ConcatDataset (BlendedDataset); None when unknown."""
    if isinstance(data, ConcatDataset):
        known = [m for m in map(_recorded_max, data.datasets) if m is not None]
        return max(known) if known else None
    return getattr(data, "max_token_id", None)


def check_items(train_dataset, val_dataset, seq_len: int, vocab_size: int) -> None:
    """Before the first step, from what the data tells cheaply: the first, middle and last item of
    each set hold seq_len + 1 tokens (the inputs and their next-token targets), their ids are below
    vocab_size, and so is the largest id the set records (a token cache's max_token_id). Else a
    one-line ConfigError naming the set and the class `_init_dataset` returned."""
    for name, data in (("training", train_dataset), ("validation", val_dataset)):
        kind, n = type(data).__name__, len(data)
        for i in sorted({0, n // 2, n - 1}) if n else ():
            item = torch.as_tensor(data[i])
            if len(item) != seq_len + 1:
                raise ConfigError(f"item {i} of the {name} set ({kind}) has {len(item)} tokens; each item must "
                                  f"hold --seq_len + 1 = {seq_len + 1} (inputs and next-token targets)")
            largest = int(item.max())
            if largest >= vocab_size:
                raise ConfigError(f"item {i} of the {name} set ({kind}) holds token id {largest}, not below "
                                  f"--vocab_size {vocab_size}")
        recorded = _recorded_max(data)
        if recorded is not None and recorded >= vocab_size:
            raise ConfigError(f"the {name} set ({kind}) holds token ids up to {recorded} (its token cache's "
                              f"max_token_id), not below --vocab_size {vocab_size}")



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


def _origin(trainer) -> str:
    """How the run folder begins: new, resumed, or new from another run's checkpoint."""
    if not trainer.resumed_from:
        return "new"
    if is_inside(trainer.resumed_from, trainer.run_dir):
        return f"resumed at step {trainer.step}"
    return f"new, from {trainer.resumed_from} at step {trainer.step}"


def run_summary(trainer) -> list[str]:
    """The console's start block (global rank 0): where the run writes, its layout, model, step and
    data, so nothing needs finding with `ls`. `trainer`: a Trainer after setup."""
    cfg, t = trainer.config, trainer.config.training
    sep = cfg.parallel.sep_size
    engine = "FSDP2" if trainer.fsdp else "ZeRO-1" if cfg.optim.use_distributed_optimizer else "all-reduce, no ZeRO"
    params = sum(p.numel() for p in trainer.model.parameters())   # this rank's, before any sharding of FSDP
    lg = cfg.logging
    lines = [f"run folder: {trainer.run_dir} ({_origin(trainer)})",
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

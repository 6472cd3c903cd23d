"""Experiment tracking: one `MetricsLogger.log(step, metrics)` call per logged optimizer step feeds

    <run_dir>/metrics.jsonl   always: one JSON object per step, the source of `tinytron-plot`
    <run_dir>/tb/             --tensorboard: TensorBoard event files, x-axis = optimizer step
    W&B run (dir <run_dir>)   --wandb_project: same scalars, run config = the run's Config

The values are already reduced over ranks (plain Python numbers, None, or nested lists of numbers);
only rank 0 writes. Steps count from 0, like log.txt. On resume from the checkpoint taken after
`resume_step` steps, everything logged for steps >= resume_step (done after that checkpoint, then
lost) is dropped, so every step appears once and in order: metrics.jsonl is rewritten, TensorBoard
hides those events (purge_step), and W&B continues the same run id.
"""

import json
import math
import os

from tinytron.training.config import ConfigError

METRICS_FILE = "metrics.jsonl"
_INSTALL = "pip install -e '.[track]'"


def check_sink_packages(logging_config) -> None:
    """Raise ConfigError (a ValueError; one line with the install command) when a sink asked for
    by `logging_config` (a LoggingConfig) cannot be imported. Call it before any work, on every
    rank, so all ranks stop the same way."""
    if logging_config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
        except ImportError:
            raise ConfigError(f"--tensorboard needs the tensorboard package: {_INSTALL}") from None
    if logging_config.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(f"--wandb_project needs the wandb package: {_INSTALL}") from None


def _scalars(metrics: dict):
    """Yield (tag, number) for TensorBoard and W&B: None is left out (not measured), a list
    becomes one scalar per element, e.g. moe/expert_load [layer][expert] -> moe/expert_load/1/3."""
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            yield from _scalars({f"{key}/{i}": v for i, v in enumerate(value)})
        else:
            yield key, value


def _json_safe(value):
    """Non-finite floats (a skipped step's loss) as null: NaN/Infinity are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def read_records(path: str) -> list[dict]:
    """The records of a metrics.jsonl file, in file order; a line cut short by a crash mid-write
    is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def rewind_jsonl(path: str, resume_step: int) -> None:
    """Keep only the records of steps < resume_step. Atomic (temp file + os.replace): a crash here
    leaves the old file."""
    if not os.path.exists(path):
        return
    kept = [json.dumps(r) + "\n" for r in read_records(path) if r["step"] < resume_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsLogger:
    """Writes metrics.jsonl and the optional TensorBoard / W&B sinks on rank 0; a no-op on the
    other ranks (construct and call it on every rank alike).

    resume_step: optimizer steps already done (the resumed checkpoint's step; 0 for a fresh run,
    which also clears what an earlier attempt in the same folder logged). wandb_id: the W&B run id
    saved with the resumed checkpoint (None: a new run)."""

    def __init__(self, run_dir: str, config_dict: dict, *, is_main: bool, resume_step: int,
                 tensorboard: bool, wandb_project: str, wandb_run_name: str, wandb_entity: str,
                 wandb_id: str | None):
        self.is_main = is_main
        self._file = self._tb = self._wandb = None
        if not is_main:
            return
        path = os.path.join(run_dir, METRICS_FILE)
        rewind_jsonl(path, resume_step)
        self._file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events of steps >= resume_step written before the resume.
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step)
        if wandb_project:
            import wandb
            self._wandb = wandb.init(project=wandb_project, entity=wandb_entity or None,
                                     name=wandb_run_name or os.path.basename(os.path.normpath(run_dir)),
                                     dir=run_dir, config=config_dict,
                                     id=wandb_id, resume="allow")  # id None: a new run
            # A resumed online run continues after the last step the server holds; steps below
            # are ignored by W&B, so skip them here instead of a warning for each.
            self._wandb_first_step = self._wandb.step

    @property
    def wandb_id(self) -> str | None:
        """The W&B run id (rank 0, --wandb_project); store it with checkpoints to resume the run."""
        return self._wandb.id if self._wandb is not None else None

    def log(self, step: int, metrics: dict) -> None:
        """Record optimizer step `step` (0-based). metrics: name -> number, None (not measured),
        or a (nested) list of numbers; call on every rank with the same reduced values."""
        if not self.is_main:
            return
        record = {"step": step}
        record.update((k, _json_safe(v)) for k, v in metrics.items() if k != "step")
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in _scalars(metrics) if k != "step"}
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, global_step=step)
        if self._wandb is not None and step >= self._wandb_first_step:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every sink (ends the W&B run)."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None

"""Run configuration: frozen dataclasses, one per concern, assembled into `Config`.

The CLI (arguments.py) is generated from these dataclasses, so CLI and code defaults cannot drift.
`validate_config` checks every cross-field constraint with a one-line message naming the flags,
before any process group exists, so every rank fails the same way before doing work.
"""

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import torch

from tinytron.data.tokenize import DEFAULT_VAL_FRACTION
from tinytron.distributed.sequence_parallel.ulysses import kv_heads_to_send
from tinytron.model.config import ModelConfig


def _help(text: str, **kw) -> dict:
    return {"help": text, **kw}


# The range of a numeric flag, declared next to it (`bound=` in its metadata) and checked by
# validate_config for every field that has one: "> 0", ">= 0", ">= 1" or "[0, 1)".
_BOUNDS = {"> 0": (lambda v: v > 0, "positive"), ">= 0": (lambda v: v >= 0, ">= 0"),
           ">= 1": (lambda v: v >= 1, ">= 1"), "[0, 1)": (lambda v: 0 <= v < 1, "in [0, 1)")}


def check_bounds(cfg) -> None:
    """Raise ConfigError for the first field of `cfg`'s sections outside its declared bound."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            bound = f.metadata.get("bound")
            if bound is None:
                continue
            ok, text = _BOUNDS[bound]
            value = getattr(values, f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if not ok(v):
                    raise ConfigError(f"--{f.name} {' '.join(map(str, value)) if isinstance(value, tuple) else value} "
                                      f"must be {text}")


@dataclass(frozen=True)
class TrainingConfig:
    total_batch_size: int = field(default=524288, metadata=_help("tokens per optimizer step, all ranks", bound="> 0"))
    batch_size: int = field(default=8, metadata=_help("sequences per micro-step per data-parallel rank", bound="> 0"))
    seq_len: int = field(default=1024, metadata=_help("tokens per training sequence", bound="> 0"))
    max_epochs: int = field(default=1, metadata=_help("epochs to train when --max_steps is 0", bound=">= 1"))
    max_steps: int = field(default=0, metadata=_help("optimizer steps to train (0: --max_epochs epochs)", bound=">= 0"))
    grad_clip_value: float = field(default=1.0, metadata=_help(
        "clip the global grad norm to this (0: off)", bound=">= 0"))
    precision: str = field(default="bf16", metadata=_help("bf16 autocast or exact fp32", choices=("bf16", "fp32")))
    seed: int = field(default=42, metadata=_help("seeds init, data order and dropout", bound=">= 0"))
    device: str = field(default="auto", metadata=_help(
        "auto: cuda if available, else cpu", choices=("auto", "cuda", "cpu")))
    backend: str = field(default="auto", metadata=_help(
        "auto: nccl on cuda, gloo on cpu", choices=("auto", "nccl", "gloo")))
    use_compile: bool = field(default=False, metadata=_help(
        "torch.compile the whole forward, output head and loss included"))
    activation_checkpointing: str = field(default="none", metadata=_help(
        "recompute activations in backward: none, full (every block) or selective (the MLPs)",
        choices=("none", "full", "selective")))
    do_val: bool = field(default=True, metadata=_help("evaluate on the validation set"))
    val_every_steps: int = field(default=250, metadata=_help("validate every N steps (and at the end)", bound="> 0"))
    val_max_tokens: int = field(default=2**21, metadata=_help(
        "tokens one evaluation scores at most: a fixed strided subset of the validation set (0: all)", bound=">= 0"))
    eval_tasks: str = field(default="", metadata=_help(
        "comma-separated multiple-choice task files (.jsonl, see docs/evaluation.md) to score with --tokenizer"))
    eval_every_steps: int = field(default=1000, metadata=_help(
        "score --eval_tasks every N steps (and at the end)", bound="> 0"))
    use_profiler: bool = field(default=False, metadata=_help("write a torch.profiler trace on rank 0"))
    steps_to_profile: tuple[int, int] = field(default=(5, 8), metadata=_help(
        "first and last step to profile", nargs=2, bound=">= 0"))
    init_from_hf: str = field(default="", metadata=_help(
        "Hugging Face Llama/Mixtral folder to initialise the weights from"))
    max_skipped_steps: int = field(default=5, metadata=_help(
        "stop after this many consecutive non-finite steps", bound=">= 1"))


@dataclass(frozen=True)
class OptimConfig:
    max_lr: float = field(default=6e-4, metadata=_help("peak learning rate", bound="> 0"))
    min_lr: float = field(default=6e-5, metadata=_help("final learning rate of the cosine decay", bound=">= 0"))
    warmup_steps: int = field(default=700, metadata=_help("linear warmup steps", bound=">= 0"))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay on weight matrices", bound=">= 0"))
    beta1: float = field(default=0.9, metadata=_help("AdamW beta1", bound="[0, 1)"))
    beta2: float = field(default=0.95, metadata=_help("AdamW beta2", bound="[0, 1)"))
    adam_eps: float = field(default=1e-8, metadata=_help("AdamW epsilon", bound="> 0"))
    use_distributed_optimizer: bool = field(default=True, metadata=_help(
        "ZeRO-1: shard optimizer state over data-parallel ranks"))
    optimizer: str = field(default="adamw", metadata=_help(
        "adamw, or muon: Muon on the blocks' weight matrices, AdamW on the rest (training/muon.py)",
        choices=("adamw", "muon")))
    muon_lr: float = field(default=0.0, metadata=_help(
        "Muon's peak learning rate (0: --max_lr, Moonlight's recipe with --muon_adjust_lr match_rms_adamw)",
        bound=">= 0"))
    muon_momentum: float = field(default=0.95, metadata=_help("Muon momentum", bound="[0, 1)"))
    muon_weight_decay: float = field(default=0.1, metadata=_help("Muon decoupled weight decay", bound=">= 0"))
    muon_nesterov: bool = field(default=True, metadata=_help("Muon Nesterov momentum"))
    muon_ns_steps: int = field(default=5, metadata=_help("Muon Newton-Schulz iterations (below 100)", bound=">= 1"))
    muon_adjust_lr: str = field(default="match_rms_adamw", metadata=_help(
        "Muon's per-matrix lr scale: match_rms_adamw (Moonlight: 0.2 sqrt(max(rows, cols))) or original "
        "(sqrt(max(1, rows / cols)))", choices=("match_rms_adamw", "original")))


@dataclass(frozen=True)
class DataConfig:
    use_mock_data: bool = field(default=False, metadata=_help("train on generated data (no files)"))
    mock_data_num_samples: int = field(default=10000, metadata=_help(
        "mock training sequences (validation: 1/10)", bound="> 0"))
    num_workers: int = field(default=2, metadata=_help("DataLoader worker processes per rank", bound=">= 0"))
    dataset: str = field(default="", metadata=_help(
        "hub dataset name or local .txt/.jsonl/.parquet file or folder; comma-separated: a blend"))
    dataset_config: str = field(default="", metadata=_help(
        "dataset configuration name (e.g. sample-10BT; comma-separated: per corpus)"))
    text_column: str = field(default="text", metadata=_help(
        "column holding the documents (comma-separated: per corpus)"))
    dataset_weights: str = field(default="", metadata=_help(
        "comma-separated mixing weights of the comma-separated --dataset corpora (default: equal)"))
    tokenizer: str = field(default="", metadata=_help("transformers tokenizer: hub name or local folder"))
    data_cache_dir: str = field(default="data_cache", metadata=_help("where tokenized corpora are cached"))
    val_fraction: float = field(default=DEFAULT_VAL_FRACTION,
                                metadata=_help("fraction of the tokens held out for validation",
                                                                bound="[0, 1)"))
    tokenize_num_proc: int = field(default=8, metadata=_help("processes for tokenization", bound=">= 1"))
    document_mask: bool = field(default=False, metadata=_help(
        "attend only to earlier tokens of the same document (documents end with the EOS token)"))
    reset_position_ids: bool = field(default=False, metadata=_help(
        "with --document_mask: RoPE positions restart at 0 at each document"))
    eos_token_id: int = field(default=-1, metadata=_help(
        "the token that ends a document for --document_mask (-1: the token cache's EOS)"))


@dataclass(frozen=True)
class ParallelConfig:
    sep_size: int = field(default=1, metadata=_help("sequence/expert-parallel group size", bound=">= 1"))
    dist_timeout_minutes: float = field(default=30.0, metadata=_help(
        "a collective waiting longer than this ends the job: start-up, the first step, validation, "
        "--eval_tasks, saves", bound="> 0"))
    step_timeout_minutes: float = field(default=5.0, metadata=_help(
        "after the first step: a training step that lasts this much longer than the step before it is a hang: "
        "stacks to <run folder>/hangs, one line naming the stuck rank(s), exit 1 (torchrun restarts). "
        "5: far above a healthy step's hiccups, 6x sooner than --dist_timeout_minutes (docs/checkpoints.md)",
        bound="> 0"))
    overlap_grad_reduce: bool = field(default=True, metadata=_help("reduce each grad bucket during the last backward"))
    overlap_param_gather: bool = field(default=True, metadata=_help("all-gather ZeRO-1 params during the next forward"))
    fsdp: bool = field(default=False, metadata=_help(
        "ZeRO-3 through torch FSDP2: shard params, grads and optimizer state over the data-parallel ranks"))


@dataclass(frozen=True)
class LoggingConfig:
    exp_name: str = field(default="tinytron", metadata=_help(
        "run name (the run folder is <log_dir>/<exp_name>_<hash>)"))
    log_dir: str = field(default="logs", metadata=_help("where run folders go"))
    log_expert_load: bool = field(default=False, metadata=_help("log tokens per expert of every MoE layer"))
    tensorboard: bool = field(default=False, metadata=_help("write TensorBoard events to <run folder>/tb"))
    wandb_project: str = field(default="", metadata=_help("log to this Weights & Biases project"))
    wandb_run_name: str = field(default="", metadata=_help("W&B run name (default: the run folder name)"))
    wandb_entity: str = field(default="", metadata=_help("W&B entity (team or user)"))


@dataclass(frozen=True)
class CheckpointConfig:
    do_save: bool = field(default=True, metadata=_help("save checkpoints"))
    save_every_steps: int = field(default=1000, metadata=_help("save every N steps (and at the end)", bound="> 0"))
    resume_path: str = field(default="", metadata=_help(
        "run folder or checkpoint folder to resume from (default: this run's newest)"))
    keep_last_n_checkpoints: int = field(default=0, metadata=_help(
        "keep only the newest N checkpoints (0: keep all)", bound=">= 0"))
    skip_data_steps: int = field(default=0, metadata=_help(
        "when a branch starts (a fresh run or a new --resume_path): continue the data order N global batches further",
        bound=">= 0"))
    save_every_minutes: float = field(default=0.0, metadata=_help(
        "also save when this many minutes passed since the last save (0: off)", bound=">= 0"))
    async_save: bool = field(default=False, metadata=_help(
        "write checkpoints in the background: training waits only while the state is copied to host memory"))


SECTIONS = {"model": ModelConfig, "training": TrainingConfig, "optim": OptimConfig, "data": DataConfig,
            "parallel": ParallelConfig, "logging": LoggingConfig, "checkpoint": CheckpointConfig}

# Fields that do not change what is trained: left out of the run hash, so the same run (same
# folder, same auto-resume) can continue on another layout, device or logging setup.
_NOT_HASHED = {"parallel", "logging", "checkpoint"}
_NOT_HASHED_FIELDS = {"batch_size", "device", "backend", "use_compile", "activation_checkpointing", "use_profiler",
                      "steps_to_profile", "num_workers", "use_distributed_optimizer",
                      "data_cache_dir", "tokenize_num_proc", "max_skipped_steps", "eval_tasks",
                      "eval_every_steps"}
# Fields added after the first release enter the hash only when set to a non-default value, so
# a run started with an older Tinytron keeps its folder (and auto-resumes) after an upgrade.
_HASHED_IF_SET = {"val_max_tokens", "dataset_weights", "document_mask", "reset_position_ids", "eos_token_id",
                  "optimizer", "muon_lr", "muon_momentum", "muon_weight_decay", "muon_nesterov", "muon_ns_steps",
                  "muon_adjust_lr"}


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    parallel: ParallelConfig = ParallelConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        def build(section_cls, values):
            names = {f.name for f in dataclasses.fields(section_cls)}
            return section_cls(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in values.items() if k in names})
        return cls(**{name: build(SECTIONS[name], d.get(name, {})) for name in SECTIONS})

    def short_hash(self, data_identity: str = "") -> str:
        """8 hex digits over what determines the training result (model, data, optimisation,
        schedule, seed): stable across processes and layouts. data_identity: what identifies the
        data a Trainer subclass's own _init_dataset returns (preflight.data_identity); '' for data
        the flags identify (mock data)."""
        defaults = Config().to_dict()
        d = {k: {f: v for f, v in sec.items()
                 if f not in _NOT_HASHED_FIELDS and (f not in _HASHED_IF_SET or v != defaults[k][f])}
             for k, sec in self.to_dict().items() if k not in _NOT_HASHED}
        if data_identity:
            d["data_identity"] = data_identity
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def run_folder(self, data_identity: str = "") -> str:
        """<log_dir>/<exp_name>_<hash>: see short_hash."""
        return os.path.join(self.logging.log_dir, f"{self.logging.exp_name}_{self.short_hash(data_identity)}")

    @property
    def run_dir(self) -> str:
        """The run folder of a run on data the flags identify (the Trainer's own _init_dataset)."""
        return self.run_folder()


class ConfigError(ValueError):
    """A bad flag or flag combination; the message is one line naming the flags."""


# Model fields that may change on resume without changing any tensor shape or meaning; every
# other model field, and these training fields, would change what a step or a sequence is.
_RESUMABLE_MODEL_FIELDS = {"dropout", "block_size", "moe_aux_loss_coeff", "moe_z_loss_coeff"}
_FIXED_TRAINING_FIELDS = {"seq_len", "total_batch_size", "seed"}
# AdamW's and Muon's states hold other tensors for the block matrices: a checkpoint of one does not
# resume the other (under ZeRO-1 and --fsdp alike), rather than starting half the state fresh.
_FIXED_OPTIM_FIELDS = {"optimizer"}


def resume_changes(saved: dict, cfg: Config, source: str) -> list[str]:
    """Compare the config a checkpoint was saved with (Config.to_dict()) with this run's.
    A change that would corrupt the run (model shape, vocabulary, --seq_len, --total_batch_size,
    --seed, --optimizer) raises ConfigError naming the flag and both values; -> "--flag old -> new" for each
    other changed flag (the flags win: hyper-parameters, schedule, cadences, layout)."""
    changes = []
    for section, values in cfg.to_dict().items():
        for name, value in values.items():
            # Not changes of the run: where this branch starts, and how far it moves the data
            # order on from the checkpoint's position (kept: the "resumed from" line says where).
            if name not in saved.get(section, {}) or name in ("resume_path", "skip_data_steps"):
                continue
            old = saved[section][name]
            if (tuple(old) if isinstance(old, list) else old) == value:
                continue
            if (section == "model" and name not in _RESUMABLE_MODEL_FIELDS) or \
                    (section == "training" and name in _FIXED_TRAINING_FIELDS) or \
                    (section == "optim" and name in _FIXED_OPTIM_FIELDS):
                raise ConfigError(f"--{name} {value} differs from {old} in the checkpoint {source}: "
                                  f"it cannot change on resume")
            changes.append(f"--{name} {old} -> {value}")
    return changes


# The oldest torch the project declares (pyproject.toml) and CI tests (.ci/run's second venv).
TORCH_FLOOR = (2, 11)


def check_torch_version() -> None:
    """ConfigError when the installed torch is older than TORCH_FLOOR (e.g. a source checkout run
    with PYTHONPATH in an environment pip never checked)."""
    version = torch.__version__
    major, minor = (int(re.match(r"\d+", part).group()) for part in version.split(".")[:2])
    if (major, minor) < TORCH_FLOOR:
        raise ConfigError(f"torch {version} is installed; Tinytron needs torch >= "
                          f"{'.'.join(map(str, TORCH_FLOOR))} (pip install 'torch>={'.'.join(map(str, TORCH_FLOOR))}')")


def validate_config(cfg: Config, world_size: int) -> int:
    """Check every constraint; return grad_accum_steps. Raises ConfigError."""
    check_torch_version()
    m, t, o, p = cfg.model, cfg.training, cfg.optim, cfg.parallel
    try:
        m.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_bounds(cfg)
    if cfg.checkpoint.async_save and not cfg.checkpoint.do_save:
        raise ConfigError("--async_save writes checkpoints in the background: it needs --do_save (drop --no-do_save)")
    if t.precision not in ("bf16", "fp32"):
        raise ConfigError(f"--precision {t.precision} is not one of bf16, fp32")
    if t.seq_len > m.block_size:
        raise ConfigError(f"--seq_len {t.seq_len} exceeds --block_size {m.block_size}")
    if world_size % p.sep_size:
        raise ConfigError(f"world size {world_size} is not divisible by --sep_size {p.sep_size}")
    sep, dp = p.sep_size, world_size // p.sep_size
    if t.seq_len % sep:
        raise ConfigError(f"--seq_len {t.seq_len} is not divisible by --sep_size {sep}")
    if m.num_attention_heads % sep:
        raise ConfigError(f"--num_attention_heads {m.num_attention_heads} is not divisible by --sep_size {sep}")
    try:
        kv_heads_to_send(m.num_key_value_heads, sep)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if p.fsdp and not o.use_distributed_optimizer:
        raise ConfigError("--fsdp shards the optimizer state itself: drop --no-use_distributed_optimizer")
    if cfg.logging.log_expert_load and not m.use_moe:
        raise ConfigError("--log_expert_load needs --use_moe (a dense model has no experts)")
    if m.use_moe and m.num_experts % sep:
        raise ConfigError(f"--num_experts {m.num_experts} is not divisible by --sep_size {sep}")
    tokens_per_micro_step = t.batch_size * t.seq_len * dp
    if t.total_batch_size % tokens_per_micro_step:
        raise ConfigError(f"--total_batch_size {t.total_batch_size} is not divisible by --batch_size "
                          f"{t.batch_size} x --seq_len {t.seq_len} x data-parallel size {dp} "
                          f"(= {tokens_per_micro_step})")
    if t.max_steps and o.warmup_steps >= t.max_steps:
        raise ConfigError(f"--warmup_steps {o.warmup_steps} must be smaller than --max_steps {t.max_steps}")
    if o.min_lr > o.max_lr:
        raise ConfigError(f"--min_lr {o.min_lr} is larger than --max_lr {o.max_lr}")
    if o.optimizer == "muon" and o.muon_ns_steps >= 100:
        raise ConfigError(f"--muon_ns_steps {o.muon_ns_steps} must be below 100 (torch.optim.Muon's limit)")
    if 0 < t.val_max_tokens < t.seq_len:
        raise ConfigError(f"--val_max_tokens {t.val_max_tokens} must be 0 (no cap) or at least --seq_len {t.seq_len}")
    if t.eval_tasks and not cfg.data.tokenizer:
        raise ConfigError("--eval_tasks needs --tokenizer (the tokenizer of the model's token ids)")
    missing = [f for f in t.eval_tasks.split(",") if f.strip() and not os.path.isfile(f.strip())]
    if missing:
        raise ConfigError(f"--eval_tasks {missing[0]} is not a file")
    a, b = t.steps_to_profile
    if t.use_profiler and a > b:
        raise ConfigError(f"--steps_to_profile {a} {b}: need first <= last")
    if t.init_from_hf and not os.path.isdir(t.init_from_hf):
        raise ConfigError(f"--init_from_hf {t.init_from_hf} is not a folder")
    _validate_document_mask(cfg.data, m.vocab_size)
    return t.total_batch_size // tokens_per_micro_step


def _validate_document_mask(d: DataConfig, vocab_size: int) -> None:
    # The range depends on --vocab_size, and -1 is a sentinel: checked here, not by a `bound`.
    if not -1 <= d.eos_token_id < vocab_size:
        raise ConfigError(f"--eos_token_id {d.eos_token_id} must be -1 (the token cache's) or in "
                          f"[0, --vocab_size {vocab_size})")
    for name in ("reset_position_ids", "eos_token_id"):
        if getattr(d, name) != getattr(DataConfig, name) and not d.document_mask:
            raise ConfigError(f"--{name} needs --document_mask")
    if d.document_mask and d.use_mock_data and d.eos_token_id == -1:
        raise ConfigError("--document_mask with --use_mock_data needs --eos_token_id (mock data has no EOS token)")

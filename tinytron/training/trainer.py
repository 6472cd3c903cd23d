"""The Trainer: one class a researcher can read top to bottom and subclass.

Override `_init_dataset` for your data, `_init_model` for your model, `_init_optimizer` for your
optimizer, `_lr_at` for your schedule. Launch with `python` (one process) or `torchrun`.

Per optimizer step: `grad_accum_steps` micro-steps of forward/backward (gradients accumulate in
flat buffers), one gradient reduction (reduce-scatter with ZeRO-1, all-reduce without), global
norm clipping, the optimizer step, and ONE small all-reduce of the step's statistics, the only
host sync of the step.
"""

import json
import math
import os
import signal
import sys
import time
import traceback
from contextlib import closing, nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from tinytron.data.mock import MockDataset
from tinytron.data.sampler import GlobalBatchSampler, validation_indices
from tinytron.distributed import parallel_state as ps
from tinytron.distributed.expert_parallel import apply_expert_parallel
from tinytron.distributed.sequence_parallel import apply_sequence_parallel, sequence_chunk
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.model import GPT
from tinytron.model.gpt import IGNORE_INDEX, cross_entropy_sum
from tinytron.training import abort
from tinytron.training import checkpoint as ckpt
from tinytron.training.config import Config, ConfigError, resume_changes, validate_config
from tinytron.training.metrics import MetricsLogger, check_sink_packages
from tinytron.training.schedule import lr_at
from tinytron.utils.params import count_parameters
from tinytron.utils.profile import flops_per_token, mfu, peak_flops


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps diverging); one-line message."""


# Signals that ask the run to save and stop: SIGTERM (SLURM's scancel and preemption, Kubernetes,
# torchrun passing its own SIGTERM on) and SIGUSR1 (SLURM's early warning, `--signal=USR1@120`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of the DataLoader workers: the main process decides what a signal means.
    A worker that died of a SIGTERM meant for the whole job (SLURM signals every process,
    torchrun its workers' process groups) would fail the step with "DataLoader worker is killed
    by signal"; SIGINT (Ctrl-C reaches the whole process group) would print a traceback per worker."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        # From the start: a signal during setup (tokenizing, loading a checkpoint) stops the run
        # after its first step instead of killing the process.
        self._stop_signals = set()  # stop signals this process received
        self.stop_signal = None  # name of the stop signal any rank received, once the ranks agreed
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop_signal)
        self._init_distributed()
        self.train_dataset = self.val_dataset = None
        self._init_dataset()
        self.model = self._init_model()
        self.optimizer = DistributedOptimizer(
            self._init_optimizer(), process_group=dist.group.WORLD if dist.is_initialized() else None,
            expert_process_group=ps.get_dp_group(), expert_parallel_group=ps.get_ep_group(),
            grad_scale=1.0 / ps.get_dp_size(),
            shard=config.optim.use_distributed_optimizer,
            param_names={p: n for n, p in self.model.named_parameters()}, model=self.model,
            overlap_grad_reduce=config.parallel.overlap_grad_reduce,
            overlap_param_gather=config.parallel.overlap_param_gather)
        self.steps_per_epoch = len(self.train_dataset) // self.global_batch_seqs
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {len(self.train_dataset)} sequences, fewer than one global "
                              f"batch of {self.global_batch_seqs} (--total_batch_size / --seq_len)")
        t = config.training
        self.total_steps = t.max_steps or t.max_epochs * self.steps_per_epoch
        self.step, self.skipped_steps, self.consecutive_skips = 0, 0, 0
        self._last_save_time = time.monotonic()
        # Dropout: an independent stream per rank (DP replicas and SEP chunks draw different
        # masks), seeded after the init so the weights are the same everywhere; resuming on the
        # same world size restores each rank's stream.
        torch.manual_seed(int(np.random.SeedSequence([t.seed, self.rank]).generate_state(1, np.uint64)[0]))
        self._resume()
        lg = config.logging
        self.metrics = MetricsLogger(self.run_dir, config.to_dict(), is_main=self.is_main, resume_step=self._rewind_to,
                                     tensorboard=lg.tensorboard, wandb_project=lg.wandb_project,
                                     wandb_run_name=lg.wandb_run_name, wandb_entity=lg.wandb_entity,
                                     wandb_id=self._wandb_id)

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        """Validate the config, pick device and backend, create the process groups."""
        cfg = self.config
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.grad_accum_steps = validate_config(cfg, world)
        check_sink_packages(cfg.logging)
        self.global_batch_seqs = cfg.training.total_batch_size // cfg.training.seq_len
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = cfg.training.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available")
        self.device = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
        if device == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.training.precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16 is not supported by this GPU; use --precision fp32")
        backend = cfg.training.backend
        if backend == "auto":
            backend = "nccl" if device == "cuda" else "gloo"
        if backend == "nccl" and device != "cuda":
            raise ConfigError("--backend nccl needs --device cuda")
        self.run_dir = cfg.run_dir
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            if not os.access(self.run_dir, os.W_OK):
                raise PermissionError(self.run_dir)
        except OSError as e:
            raise ConfigError(f"--log_dir {cfg.logging.log_dir} is not writable ({type(e).__name__})") from None
        if world > 1 and not dist.is_initialized():
            # Let the NCCL watchdog abort a stuck collective instead of hanging (no-op on gloo).
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            dist.init_process_group(backend, timeout=timedelta(minutes=cfg.parallel.dist_timeout_minutes))
            abort.watch(world)  # an error on one rank ends every rank (see abort.py)
        if dist.is_initialized():
            ps.initialize_parallel_state(cfg.parallel.sep_size)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0
        self.world_size = world
        if self.is_main and dist.is_initialized():
            ps.print_topology()
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if self.is_main and restarts not in (None, "0"):
            print(f"[tinytron] torchrun restart {restarts}: resuming from the newest complete checkpoint", flush=True)

    def _on_stop_signal(self, signum, frame) -> None:
        # Only a flag: the ranks share it at their next all-reduce (a step's statistics, the
        # validation totals, or the one after a save), and all stop at the same step.
        self._stop_signals.add(signum)

    def _flags_tensor(self, *extra: float) -> torch.Tensor:
        """[SIGTERM received, SIGUSR1 received, *extra] of this rank, on the device for an
        all-reduce (pinned and copied without blocking: it is part of every step)."""
        flags = [float(sig in self._stop_signals) for sig in STOP_SIGNALS] + list(extra)
        return torch.tensor(flags, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)

    def _agree_on_stop(self, flags: list[float]) -> None:
        """flags: the first len(STOP_SIGNALS) values of _flags_tensor summed over all ranks, so
        the same on every rank: any signal on any rank stops the run, named after SIGUSR1 if any
        rank got one (the launcher requeues a SLURM job on SIGUSR1)."""
        got = [sig.name for sig, count in zip(STOP_SIGNALS, flags) if count > 0]
        if got and self.stop_signal is None:
            self.stop_signal = "SIGUSR1" if "SIGUSR1" in got else got[0]

    def _stop_agreed(self) -> bool:
        """Share the stop signals received since the last all-reduce (collective)."""
        flags = self._flags_tensor()
        if dist.is_initialized():
            dist.all_reduce(flags)
        self._agree_on_stop(flags.tolist())
        return self.stop_signal is not None

    def _init_dataset(self) -> None:
        """Set `self.train_dataset` and `self.val_dataset`: map-style datasets whose item i is a
        LongTensor of seq_len + 1 tokens. Override for your data."""
        cfg = self.config
        if not cfg.data.use_mock_data:
            raise ConfigError("no dataset: pass --use_mock_data, use pretrain_example.py, or subclass "
                              "Trainer and override _init_dataset")
        n, t, v, s = cfg.data.mock_data_num_samples, cfg.training.seq_len, cfg.model.vocab_size, cfg.training.seed
        self.train_dataset = MockDataset(n, t, v, s, "train")
        self.val_dataset = MockDataset(max(1, n // 10), t, v, s, "val")

    def _init_model(self) -> torch.nn.Module:
        """Build the model on CPU from the seed (same weights on every rank and layout), apply the
        parallel layout around it, move it to the device."""
        cfg = self.config
        torch.manual_seed(cfg.training.seed)
        model = GPT(cfg.model)
        if ps.get_sep_size() > 1:
            apply_sequence_parallel(model, ps.get_sep_group())
            if cfg.model.use_moe:
                apply_expert_parallel(model, ps.get_ep_group())
        if cfg.training.init_from_hf:  # continued pre-training; a resumed checkpoint still wins
            from tinytron.training.weights import init_from_hf  # lazy: transformers stays optional
            try:  # after the expert split: each rank copies its own experts' slice
                init_from_hf(model, cfg.training.init_from_hf)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        model.to(self.device)
        model.set_activation_checkpointing(cfg.training.activation_checkpointing)
        if cfg.training.use_compile:
            # Dense blocks without sequence parallelism compile to one graph each (fullgraph
            # asserts it); the Ulysses all-to-alls and the MoE split-size sync break graphs.
            fullgraph = ps.get_sep_size() == 1 and not cfg.model.use_moe
            for layer in model.layers:
                layer.compile(fullgraph=fullgraph)
        if self.is_main:
            counts = count_parameters(cfg.model)
            print(f"[tinytron] parameters: {counts['total'] / 1e6:.2f}M total, "
                  f"{counts['active'] / 1e6:.2f}M active per token", flush=True)
        return model

    def _init_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on weight matrices (and stacked expert weights) only: not on norms,
        biases or the embedding table (tied to the head when --tied_lm_head). Override to use
        another optimizer: the Trainer wraps whatever this returns in DistributedOptimizer."""
        o = self.config.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=o.max_lr, betas=(o.beta1, o.beta2), eps=o.adam_eps,
                                 fused=self.device.type == "cuda")

    def _lr_at(self, step: int) -> float:
        o = self.config.optim
        return lr_at(step, o.max_lr, o.min_lr, o.warmup_steps, self.total_steps)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    def _resume(self) -> None:
        """Choose the checkpoint to resume (rank 0 decides, every rank gets its choice), load it
        (falling back to the previous complete one when unreadable, unless --resume_path named
        it), and continue its branch or start a new one: see checkpoint.plan_resume. A new branch
        moves the checkpoints it abandons aside and rewinds the logs to its first step."""
        c = self.config.checkpoint
        plan, new_id = self._on_rank0(lambda: (ckpt.plan_resume(self.run_dir, c.resume_path, c.skip_data_steps),
                                               ckpt.new_branch_id()))
        # The optimizer's hyper-parameters as the flags set them; loading its state replaces them.
        from_flags = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        for path, new_branch in plan:
            meta = self._load_agreed(path, explicit=new_branch and bool(c.resume_path))
            if meta is not None:
                break
        else:
            if plan:
                raise ckpt.CheckpointError(f"no complete checkpoint in {self.checkpoint_root} can be read")
            path, new_branch, meta = None, True, {"step": 0}  # a fresh start
        for group, values in zip(self.optimizer.param_groups, from_flags):
            group.update(values)
        self.step, self.skipped_steps = meta["step"], meta.get("skipped_steps", 0)
        self._wandb_id = meta.get("wandb_id")
        self.branch = meta.get("branch", {"id": "", "resume_path": "", "skip_data_steps": 0, "start_step": 0})
        self.data_offset = meta.get("data_offset", 0)
        if new_branch:
            key = ckpt.branch_key(c.resume_path, self.run_dir) or self.branch["resume_path"]
            self.branch = {"id": new_id, "resume_path": key, "skip_data_steps": c.skip_data_steps,
                           "start_step": self.step}
            self.data_offset += c.skip_data_steps
        # Rewind the logs to the step resumed; to 0 for a fresh start (drop what an aborted attempt
        # logged) or another run's checkpoint (nothing before its step is this run's).
        self._rewind_to = self.step if path and ckpt.is_inside(path, self.run_dir) else 0
        if self.is_main and path:
            later = ckpt.superseded(self.checkpoint_root, path)
            if later:
                dest = ckpt.move_aside(self.checkpoint_root, later, new_id)
                print(f"[tinytron] moved {len(later)} checkpoint(s) of the abandoned branch to {dest}", flush=True)
            print(f"[tinytron] resumed from {path} at step {self.step} (data step {self.step + self.data_offset}"
                  f"{', new branch' if new_branch else ''})", flush=True)
        self._write_run_files(rewind_to=self._rewind_to)

    def _write_run_files(self, rewind_to: int) -> None:
        """config.json, and log.txt rewound to `rewind_to` so resumed steps are not logged twice."""
        if not self.is_main:
            return
        with open(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        log = os.path.join(self.run_dir, "log.txt")
        if os.path.exists(log):
            with open(log) as f:
                kept = [line for line in f if int(line.split()[0]) < rewind_to]
            with open(log + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(log + ".tmp", log)

    def _on_rank0(self, fn):
        """fn() on rank 0 only, its result sent to every rank; a checkpoint, config or file-system
        error on rank 0 is raised on every rank (none waits for a broadcast that never comes)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except (ConfigError, ckpt.CheckpointError, OSError) as e:
                error = str(e)
        if dist.is_initialized():
            box = [result, error]
            dist.broadcast_object_list(box, src=0)
            result, error = box
        if error is not None:
            raise ckpt.CheckpointError(error)
        return result

    def _first_error(self, error: str | None) -> str | None:
        """The first rank's error of a step every rank did, or None: so all ranks act alike."""
        if not dist.is_initialized():
            return error
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e is not None), None)

    def _load_agreed(self, path: str, explicit: bool) -> dict | None:
        """Load checkpoint `path` on every rank; -> its meta, or None (a warning) when some rank
        cannot read it. explicit (--resume_path named it): an unreadable checkpoint is an error.
        A config that may not change is an error either way."""
        meta = error = None
        try:
            meta = ckpt.read_meta(path)
        except ckpt.CheckpointError as e:
            error = str(e)
        error = self._first_error(error)
        if error is None:
            changes = resume_changes(meta.get("config", {}), self.config, path)
            try:
                ckpt.load_checkpoint(path, self.model, self.optimizer)
            except ckpt.CheckpointError as e:
                error = str(e)
            error = self._first_error(error)
        if error is None:
            if self.is_main:
                for change in changes:
                    print(f"resume: {change}", flush=True)
            return meta
        if explicit:
            raise ckpt.CheckpointError(error)
        if self.is_main:
            print(f"warning: {error}; falling back to the previous complete checkpoint", file=sys.stderr, flush=True)
        return None

    def save(self) -> None:
        """Write checkpoint `self.step` (collective)."""
        self.optimizer.finish_param_gather()
        data_step = self.step + self.data_offset
        meta = {"step": self.step, "skipped_steps": self.skipped_steps,
                "tokens_seen": self.step * self.config.training.total_batch_size,
                "data_offset": self.data_offset, "branch": self.branch,
                "data_position": {"epoch": data_step // self.steps_per_epoch,
                                  "step_in_epoch": data_step % self.steps_per_epoch},
                "world_size": self.world_size, "sep_size": ps.get_sep_size(), "wandb_id": self.metrics.wandb_id,
                "config": self.config.to_dict()}
        ckpt.save_checkpoint(self.checkpoint_root, self.step, self.model, self.optimizer, meta,
                             self.config.checkpoint.keep_last_n_checkpoints)
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------------ steps
    def _split_batch(self, batch: torch.Tensor):
        """batch: [b, T+1] full sequences (same on every rank of a SEP group) -> this rank's
        inputs and targets [b, T/sep], their global position ids [1, T/sep], and the number of
        valid targets of the FULL sequences (so per-rank losses sum to the full mean over SEP)."""
        batch = batch.to(self.device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        count = (targets != IGNORE_INDEX).sum()
        return *sequence_chunk(inputs, targets, ps.get_sep_rank(), ps.get_sep_size()), count

    def _autocast(self):
        if self.config.training.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _forward_loss(self, batch: torch.Tensor):
        """-> (language-model loss, auxiliary loss, expert load [layers, experts] or None for dense
        models) of one micro-batch on this rank, as tensors."""
        inputs, targets, positions, count = self._split_batch(batch)
        with self._autocast():
            out = self.model(inputs, position_ids=positions, return_aux=True)
        lm = cross_entropy_sum(out.logits, targets) / count.clamp(min=1)
        return lm, out.aux_loss, out.expert_load

    def train_step(self, batches) -> dict:
        """One optimizer step over `grad_accum_steps` micro-batches; returns the step's statistics
        reduced over all ranks (the step's one host sync)."""
        lr = self._lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        acc = torch.zeros(2, device=self.device)
        load = None  # tokens per expert per MoE layer, summed over micro-steps: [layers, experts]
        for micro in range(self.grad_accum_steps):
            lm, aux, expert_load = self._forward_loss(next(batches))
            with self.optimizer.micro_step(last=micro == self.grad_accum_steps - 1):
                ((lm + aux) / self.grad_accum_steps).backward()
            acc += torch.stack((lm.detach(), aux.detach()))
            if self.config.logging.log_expert_load:
                load = expert_load.float() if load is None else load + expert_load.float()
        self.optimizer.reduce_gradients()
        grad_norm = self.optimizer.clip_grad_norm(self.config.training.grad_clip_value)
        # SEP ranks hold shares of one sequence's loss (sum them); DP ranks hold different
        # sequences (average them): a SUM over the world divided by dp_size does both. The same
        # all-reduce carries the stop signals (on any rank) and rank 0's time-based save
        # decision, so every rank acts on them at the same step.
        minutes = self.config.checkpoint.save_every_minutes
        save_due = self.is_main and minutes > 0 and time.monotonic() - self._last_save_time >= 60 * minutes
        flags = self._flags_tensor(float(save_due))
        # Expert loads are already totals over the EP (= SEP) group: divide by sep before the sum.
        extra = [] if load is None else [load.flatten() / ps.get_sep_size()]
        stats = torch.cat((acc / (self.grad_accum_steps * ps.get_dp_size()), flags, *extra))
        if dist.is_initialized():
            dist.all_reduce(stats)
        values = torch.cat((stats, grad_norm.view(1))).tolist()  # the step's one host sync
        grad_norm = values.pop()
        lm_loss, aux_loss, stop_term, stop_usr1, save_due = values[:5]
        self._agree_on_stop([stop_term, stop_usr1])
        expert_load = None if load is None else [
            [round(v) for v in values[5 + i * load.shape[1]:5 + (i + 1) * load.shape[1]]] for i in range(load.shape[0])]
        finite = math.isfinite(lm_loss) and math.isfinite(aux_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        return {"loss": lm_loss, "aux_loss": aux_loss, "grad_norm": grad_norm, "lr": lr,
                "finite": finite, "stop": self.stop_signal is not None, "save_due": save_due > 0,
                "expert_load": expert_load}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the validation set, or over the fixed subset of at most
        --val_max_tokens tokens (`validation_indices`): each DP rank takes every dp_size-th
        sequence of it; loss sums and token counts are all-reduced, so the value does not depend
        on the layout. The same all-reduce shares the stop signals received meanwhile."""
        self.optimizer.finish_param_gather()
        self.model.eval()
        t = self.config.training
        scored = validation_indices(len(self.val_dataset), t.val_max_tokens // t.seq_len)
        val = Subset(self.val_dataset, scored[ps.get_dp_rank()::ps.get_dp_size()].tolist())
        totals = torch.zeros(2, device=self.device)
        # A private generator, so validation never draws from the global (dropout) RNG.
        for batch in DataLoader(val, batch_size=self.config.training.batch_size, generator=torch.Generator()):
            inputs, targets, positions, _ = self._split_batch(batch)
            with self._autocast():
                logits = self.model(inputs, position_ids=positions)
            totals += torch.stack((cross_entropy_sum(logits, targets),
                                   (targets != IGNORE_INDEX).sum().float()))
        totals = torch.cat((totals, self._flags_tensor()))
        if dist.is_initialized():
            dist.all_reduce(totals)
        self.model.train()
        loss = totals[0] / totals[1].clamp(min=1)
        loss, *flags = torch.cat((loss.view(1), totals[2:])).tolist()
        self._agree_on_stop(flags)
        return loss

    def _train_loader(self):
        """The training batches, from this rank's position in the data order: a generator, so that
        closing it shuts the DataLoader workers down even while an exception is raised (they ignore
        SIGTERM, so the interpreter's exit would wait on them forever)."""
        t = self.config.training
        sampler = GlobalBatchSampler(len(self.train_dataset), self.global_batch_seqs, t.batch_size,
                                     ps.get_dp_rank(), ps.get_dp_size(), t.seed,
                                     start_step=self.step + self.data_offset,  # --skip_data_steps
                                     blend=getattr(self.train_dataset, "blend", None))
        workers = self.config.data.num_workers
        # A private generator: creating the iterator draws a seed from it, which from the global
        # RNG would shift the dropout stream of a resumed run (restored RNG, then a new iterator).
        yield from DataLoader(self.train_dataset, batch_sampler=sampler, num_workers=workers,
                              pin_memory=self.device.type == "cuda",
                              prefetch_factor=4 if workers else None, worker_init_fn=_ignore_stop_signals,
                              generator=torch.Generator().manual_seed(t.seed))

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.config
        t, c = cfg.training, cfg.checkpoint
        flops_tok, peak = flops_per_token(cfg.model, t.seq_len), peak_flops(self.device)
        profiler = None
        self.model.train()
        # `with`: the bar's line is ended even on an error, so the error prints on its own line.
        with closing(self._train_loader()) as batches, \
                tqdm(total=self.total_steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True) as bar:
            while self.step < self.total_steps:
                if self.is_main and t.use_profiler and self.step == t.steps_to_profile[0]:
                    profiler = torch.profiler.profile()
                    profiler.__enter__()
                t0 = time.perf_counter()
                stats = self.train_step(batches)
                stats["step_time"] = time.perf_counter() - t0
                stats["tokens_per_s"] = t.total_batch_size / stats["step_time"]
                stats["mfu"] = mfu(stats["tokens_per_s"] / self.world_size, flops_tok, peak)
                step = self.step
                self.step += 1
                self._log_train(step, stats, bar)
                self._count_skips(stats["finite"])
                if profiler is not None and step == t.steps_to_profile[1]:
                    self._finish_profile(profiler)
                    profiler = None
                last = self.step == self.total_steps
                if t.do_val and (self.step % t.val_every_steps == 0 or last):
                    stats["val_loss"] = self.evaluate()
                    self._log(f"{step} val {stats['val_loss']:.6f}")
                self._log_metrics(step, stats)
                stopping = self.stop_signal is not None  # agreed in the step's or validation's all-reduce
                if c.do_save and (self.step % c.save_every_steps == 0 or last or stopping or stats["save_due"]):
                    self.save()
                    # A signal that came during this save: stop here, the step is saved.
                    stopping = stopping or (not last and self._stop_agreed())
                if stopping:
                    self._stopped()
                    break
            if profiler is not None:  # the run ended inside the profiled range
                self._finish_profile(profiler)
        self.optimizer.finish_param_gather()   # the model is complete when train() returns
        self.metrics.close()

    def _stopped(self) -> None:
        """After the agreed stop (and its complete checkpoint): say so, and tell the launcher
        (scripts/launch.sh) through $TINYTRON_STOP_FILE that this node's workers stopped on a
        signal on purpose: torchrun itself exits 1 when it got the signal too."""
        saved = f"saved step {self.step}" if self.config.checkpoint.do_save else f"at step {self.step}, not saved"
        if self.is_main:
            print(f"[tinytron] {self.stop_signal}: {saved}, exiting", flush=True)
        stop_file = os.environ.get("TINYTRON_STOP_FILE")
        if stop_file and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            with open(stop_file, "w") as f:
                f.write(f"{self.stop_signal} {self.step}\n")

    def _log_metrics(self, step: int, stats: dict) -> None:
        """One record per step to metrics.jsonl / TensorBoard / W&B (rank 0 writes)."""
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        record = {"tokens": self.step * self.config.training.total_batch_size, "train/loss": stats["loss"],
                  "val/loss": stats.get("val_loss"), "train/lr": stats["lr"], "train/grad_norm": stats["grad_norm"],
                  "perf/step_time_s": stats["step_time"], "perf/tokens_per_s": stats["tokens_per_s"],
                  "perf/mfu": stats["mfu"], "perf/peak_memory_gib": mem, "train/skipped_steps": self.skipped_steps}
        if self.config.model.use_moe:
            record["moe/aux_loss"] = stats["aux_loss"]
        if stats["expert_load"] is not None:
            record["moe/expert_load"] = stats["expert_load"]
        self.metrics.log(step, record)

    def _finish_profile(self, profiler) -> None:
        self.optimizer.finish_param_gather()   # no collective still recording into the trace
        profiler.__exit__(None, None, None)
        profiler.export_chrome_trace(os.path.join(self.run_dir, "rank0_trace.json"))

    def _count_skips(self, finite: bool) -> None:
        """A non-finite step was not applied; too many in a row stop the run (the last complete
        checkpoint stays as it is)."""
        if finite:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        limit = self.config.training.max_skipped_steps
        if self.consecutive_skips >= limit:
            last = ckpt.find_latest(self.run_dir)
            raise TrainingError(f"{limit} consecutive steps with a non-finite loss or grad norm "
                                f"(--max_skipped_steps {limit}) at step {self.step - 1}; "
                                f"last good checkpoint: {last or 'none'}")

    def _log(self, line: str) -> None:
        if self.is_main:
            with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
                f.write(line + "\n")

    def _log_train(self, step: int, stats: dict, bar) -> None:
        if not stats["finite"]:
            self._log(f"{step} skipped non-finite loss {stats['loss']} grad_norm {stats['grad_norm']}")
        else:
            self._log(f"{step} train {stats['loss']:.6f}")
        if not self.is_main:
            return
        aux = f" | aux {stats['aux_loss']:.4f}" if self.config.model.use_moe else ""
        util, tok_s = stats["mfu"], stats["tokens_per_s"]
        mfu_s = "n/a" if util is None else f"{100 * util:.1f}%"
        bar.write(f"step {step:6d} | loss {stats['loss']:.6f}{aux} | lr {stats['lr']:.3e} | grad norm "
                  f"{stats['grad_norm']:.4f} | {1000 * stats['step_time']:.0f} ms | {tok_s:,.0f} tok/s | MFU {mfu_s}")
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{tok_s:,.0f}", mfu=mfu_s)
        bar.update(1)


def run(trainer_cls=Trainer, parser=None, argv=None) -> None:
    """Entry point for scripts: parse flags and train. A failure is one line, the same on every
    rank (see abort.py), and the exit code: 2 for bad input, 1 otherwise."""
    from tinytron.training.arguments import build_parser, config_from_args
    parser = parser or build_parser()
    config = config_from_args(parser.parse_args(argv))
    try:
        trainer_cls(config).train()
    except (ConfigError, ckpt.CheckpointError) as e:
        abort.fail(f"error: {e}", 2)
    except TrainingError as e:
        abort.fail(f"error: {e}", 1)
    except Exception as e:  # noqa: BLE001 - one line for the other ranks, after the traceback
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError)
        if dist.is_initialized() and isinstance(e, RuntimeError) and _is_comm_failure(e):
            # A peer stopped answering (timeout) or died: a symptom, so not posted to the other
            # ranks (they see it too); say which rank saw it and what it waited for.
            abort.fail(f"error: rank {rank}: collective failed (a rank died or exceeded "
                       f"--dist_timeout_minutes {config.parallel.dist_timeout_minutes}): {first}", 1, post=False)
        traceback.print_exc()
        abort.fail(f"error: rank {rank}: {type(e).__name__}: {first}", 1)
    abort.stop_watching()
    if dist.is_initialized():
        dist.destroy_process_group()


def _is_comm_failure(e: Exception) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(
        k in text for k in ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl"))

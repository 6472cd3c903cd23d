"""The Trainer: one class a researcher can read top to bottom and subclass.

Launch with `python` (one process) or `torchrun`. Override points (each returns what it builds;
the Trainer stores it):

    _init_dataset(self) -> (train_dataset, val_dataset)
        map-style datasets whose item i is a LongTensor of seq_len + 1 tokens (`self.config` set)
    _init_model(self) -> nn.Module
        the model, parallel layout applied, on `self.device`
    _init_optimizer(self) -> torch.optim.Optimizer
        any torch optimizer over `self.model`'s parameters; the Trainer wraps it in
        DistributedOptimizer (ZeRO-1), which rebinds the parameters into its flat buffers, or
        with --fsdp in FSDPOptimizer (the parameters are then FSDP2's DTensor shards)
    _lr_at(self, step: int) -> float
        the learning rate of optimizer step `step` (0-based)

Per optimizer step: `grad_accum_steps` micro-steps of forward/backward into flat buffers, one
gradient reduction, clipping, the optimizer step, and ONE small all-reduce of the step's
statistics, its only host sync (sync.py).
"""

import math
import os
import time
from contextlib import closing, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from tinytron.data.mock import MockDataset
from tinytron.data.sampler import GlobalBatchSampler, validation_indices
from tinytron.distributed import parallel_state as ps
from tinytron.distributed.expert_parallel import apply_expert_parallel
from tinytron.distributed.fsdp import FSDPOptimizer, apply_fsdp
from tinytron.distributed.runtime import RuntimeSetupError, init_runtime
from tinytron.distributed.sequence_parallel import apply_sequence_parallel, sequence_chunk
from tinytron.distributed.signals import ignore_stop_signals
from tinytron.distributed.watchdog import Watchdog
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.model import GPT
from tinytron.model.gpt import IGNORE_INDEX, cross_entropy_sum
from tinytron.training import checkpoint as ckpt
from tinytron.training.checkpoint_async import AsyncSaver, SyncSaver
from tinytron.training.config import Config, ConfigError, validate_config
from tinytron.training.documents import document_layout_fn
from tinytron.training.downstream import downstream_from_config
from tinytron.training.logger import RunLogger, check_writable
from tinytron.training.metrics import check_sink_packages
from tinytron.training.muon import muon_optimizer
from tinytron.training.preflight import check_items, data_identity, finished_error, run_summary, short_run_warnings
from tinytron.training.resume import on_rank0, resume
from tinytron.training.schedule import lr_at
from tinytron.training.sync import reduce_step_stats, reduce_validation, share_stop
from tinytron.utils.params import count_parameters
from tinytron.utils.profile import StepProfiler, flops_per_token, mfu, peak_flops


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps diverging); one-line message."""


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        self._init_runtime()
        # --eval_tasks, tokenized once (None without); FSDP forwards are collective: equal counts
        self.downstream = downstream_from_config(config, equal_forwards=self.fsdp)
        datasets = self._init_dataset()
        if datasets is None:
            raise TypeError("_init_dataset must return (train_dataset, val_dataset), not set them")
        self.train_dataset, self.val_dataset = datasets
        check_items(self.train_dataset, self.val_dataset, config.training.seq_len, config.model.vocab_size)
        # A subclass's data enters the run's identity: other data never resumes this folder.
        own_data = type(self)._init_dataset is not Trainer._init_dataset
        self.data_identity = (on_rank0(lambda: data_identity(*datasets), self.is_main) if own_data else "")
        self.run_dir = config.run_folder(self.data_identity)   # created by RunLogger, once nothing failed
        check_writable(self.run_dir, config.logging.log_dir)
        self.document_layout = document_layout_fn(config, self.train_dataset, self.device)  # --document_mask
        self.model = self._init_model()
        # From here on the optimizer's flat buffers hold the model's parameters and gradients.
        self.optimizer = self._wrap_optimizer(self._init_optimizer())
        self.steps_per_epoch = len(self.train_dataset) // self.global_batch_seqs
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {len(self.train_dataset)} sequences, fewer than one global "
                              f"batch of {self.global_batch_seqs} (--total_batch_size / --seq_len)")
        t = config.training
        self.total_steps = t.max_steps or t.max_epochs * self.steps_per_epoch
        self.consecutive_skips = 0
        self._last_save_time = time.monotonic()
        # Dropout: an independent stream per rank (DP replicas and SEP chunks draw different
        # masks), seeded after the init so the weights are the same everywhere; resuming on the
        # same world size restores each rank's stream.
        torch.manual_seed(int(np.random.SeedSequence([t.seed, self.rank]).generate_state(1, np.uint64)[0]))
        point = resume(config, self.run_dir, self.model, self.optimizer, self.is_main)
        self.step, self.skipped_steps, self.branch, self.data_offset, self.resumed_from = (
            point.step, point.skipped_steps, point.branch, point.data_offset, point.path)
        if self.step >= self.total_steps:   # a finished run found again: before anything is written or shown
            raise finished_error(self.run_dir, point.path, self.step, self.total_steps,
                                 config.checkpoint.skip_data_steps)
        self.log = RunLogger(self.run_dir, config, is_main=self.is_main, resume_step=point.rewind_to,
                             wandb_id=point.wandb_id)
        # Writes the checkpoints; --async_save: in the background (collective: its gloo group)
        self.saver = (AsyncSaver if config.checkpoint.async_save else SyncSaver)(self.log.console)
        if self.is_main:
            for line in run_summary(self) + [f"warning: {w}" for w in short_run_warnings(config, self.total_steps)]:
                print(f"[tinytron] {line}", flush=True)

    # ------------------------------------------------------------------ setup
    def _init_runtime(self) -> None:
        """Validate the config; device, backend, process groups, stop signals (distributed/runtime.py)."""
        cfg, t = self.config, self.config.training
        self.grad_accum_steps = validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        check_sink_packages(cfg.logging)
        self.global_batch_seqs = t.total_batch_size // t.seq_len
        try:
            rt = init_runtime(t.device, t.backend, cfg.parallel.sep_size, cfg.parallel.dist_timeout_minutes,
                              catch_stop_signals=True)
        except RuntimeSetupError as e:
            raise ConfigError(str(e)) from None
        if t.precision == "bf16" and rt.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16 is not supported by this GPU; use --precision fp32")
        self.device, self.rank, self.world_size, self.is_main, self.signals = (
            rt.device, rt.rank, rt.world_size, rt.is_main, rt.signals)
        self.fsdp = cfg.parallel.fsdp and self.world_size > 1   # one process has nothing to shard
        if self.is_main and dist.is_initialized():
            ps.print_topology()
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if self.is_main and restarts not in (None, "0"):
            print(f"[tinytron] torchrun restart {restarts}: resuming from the newest complete checkpoint", flush=True)

    def _init_dataset(self) -> tuple:
        """-> (train_dataset, val_dataset): mock data (--use_mock_data). Override for your data."""
        cfg = self.config
        if not cfg.data.use_mock_data:
            raise ConfigError("no dataset: pass --use_mock_data, use pretrain_example.py, or subclass "
                              "Trainer and override _init_dataset")
        n, t, v, s = cfg.data.mock_data_num_samples, cfg.training.seq_len, cfg.model.vocab_size, cfg.training.seed
        return MockDataset(n, t, v, s, "train"), MockDataset(max(1, n // 10), t, v, s, "val")

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
            # The whole forward, head and loss included. One process with a dense model compiles
            # to one graph (fullgraph asserts it); graphs break at the Ulysses all-to-alls, the MoE
            # split-size sync, ZeRO-1's all-gather waits and FSDP's hooks. Dense shapes never
            # change: static; MoE's per-expert token counts do: dynamic after the first change.
            model.compile(fullgraph=self.world_size == 1 and not cfg.model.use_moe,
                          dynamic=None if cfg.model.use_moe else False)
        if self.fsdp:   # ZeRO-3: params, grads and optimizer state sharded (distributed/fsdp)
            apply_fsdp(model, dist.group.WORLD, ps.get_dp_group(), ps.get_dp_size(), cfg.training.precision == "bf16")
        if self.is_main:
            counts = count_parameters(cfg.model)
            print(f"[tinytron] parameters: {counts['total'] / 1e6:.2f}M total, "
                  f"{counts['active'] / 1e6:.2f}M active per token", flush=True)
        return model

    def _init_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on weight matrices (and stacked expert weights) only: not on norms,
        biases or the embedding table (tied to the head when --tied_lm_head); --optimizer muon:
        Muon on the blocks' matrices, this AdamW on the rest (training/muon.py). Override to use
        another optimizer: the Trainer wraps whatever this returns in DistributedOptimizer."""
        o = self.config.optim
        if o.optimizer == "muon":
            return muon_optimizer(self.model, o, fused=self.device.type == "cuda")
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=o.max_lr, betas=(o.beta1, o.beta2), eps=o.adam_eps,
                                 fused=self.device.type == "cuda")

    def _wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> DistributedOptimizer:
        """ZeRO-1 (or FSDP2) around `optimizer`. With ZeRO-1 each `p.data` and `p.grad` is from here
        on a view into the optimizer's flat buffers (zero1/grad_buffer.py)."""
        p = self.config.parallel
        if self.fsdp:
            return FSDPOptimizer(optimizer, self.model, dist.group.WORLD, ps.get_ep_group())
        return DistributedOptimizer(optimizer, self.model, shard=self.config.optim.use_distributed_optimizer,
                                    overlap_grad_reduce=p.overlap_grad_reduce,
                                    overlap_param_gather=p.overlap_param_gather)

    def _lr_at(self, step: int) -> float:
        o = self.config.optim
        return lr_at(step, o.max_lr, o.min_lr, o.warmup_steps, self.total_steps)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    def save(self) -> str:
        """Write checkpoint `self.step` (collective; --async_save: start writing it); -> its folder."""
        self.optimizer.finish_param_gather()
        data_step = self.step + self.data_offset
        meta = {"step": self.step, "skipped_steps": self.skipped_steps,
                "tokens_seen": self.step * self.config.training.total_batch_size,
                "data_offset": self.data_offset, "branch": self.branch,
                "data_position": {"epoch": data_step // self.steps_per_epoch,
                                  "step_in_epoch": data_step % self.steps_per_epoch},
                "world_size": self.world_size, "sep_size": ps.get_sep_size(), "wandb_id": self.log.wandb_id,
                "config": self.config.to_dict()}
        path = self.saver.save(self.checkpoint_root, self.step, self.model, self.optimizer, meta,
                               self.config.checkpoint.keep_last_n_checkpoints)
        self._last_save_time = time.monotonic()
        return path

    # ------------------------------------------------------------------ steps
    def _split_batch(self, batch: torch.Tensor):
        """batch: [b, T+1] full sequences (same on every rank of a SEP group) -> this rank's
        inputs and targets [b, T/sep], their position ids ([1, T/sep] global, or [b, T/sep] in
        their documents with --reset_position_ids), the --document_mask over the FULL sequences
        (None without), and the number of valid targets of the FULL sequences (so per-rank losses
        sum to the full mean over SEP)."""
        largest = int(batch.max()) if batch.device.type == "cpu" else -1   # the host copy: no device sync
        if largest >= self.config.model.vocab_size:   # one line, not an IndexError or a device-side assert
            raise ConfigError(f"a batch of step {self.step} holds token id {largest}, not below --vocab_size "
                              f"{self.config.model.vocab_size}")
        batch = batch.to(self.device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        count = (targets != IGNORE_INDEX).sum()
        local_inputs, local_targets, positions = sequence_chunk(inputs, targets, ps.get_sep_rank(), ps.get_sep_size())
        mask = None
        if self.document_layout is not None:
            mask, positions = self.document_layout(inputs, positions)
        return local_inputs, local_targets, positions, mask, count

    def _autocast(self):
        if self.config.training.precision == "bf16":
            # No cast cache: it would keep every layer's bf16 weight until forward ends (14 GiB at
            # 7B); each weight is cast once per forward anyway (benchmarks/casts.py counts them).
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return nullcontext()

    def _forward_loss(self, batch: torch.Tensor):
        """-> (language-model loss, auxiliary loss, expert load [layers, experts] or None for dense
        models) of one micro-batch on this rank, as tensors."""
        inputs, targets, positions, mask, count = self._split_batch(batch)
        with self._autocast():
            # The loss is computed inside the model (compiled with it), without full logits.
            out = self.model(inputs, targets=targets, position_ids=positions, return_aux=True, document_mask=mask)
        lm = out.loss_sum / count.clamp(min=1)
        return lm, out.aux_loss, out.expert_load

    def train_step(self, batches) -> dict:
        """One optimizer step over `grad_accum_steps` micro-batches; returns the step's statistics
        reduced over all ranks (the step's one host sync)."""
        start = time.perf_counter()
        lr = self._lr_at(self.step)
        for group in self.optimizer.param_groups:   # Muon's group: times --muon_lr / --max_lr
            group["lr"] = lr * group.get("lr_scale", 1.0)
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
        # This rank's own part of the step: data, forward, backward, before it waits for the others.
        own_seconds = time.perf_counter() - start
        self.optimizer.reduce_gradients()
        grad_norm = self.optimizer.clip_grad_norm(self.config.training.grad_clip_value)
        minutes = self.config.checkpoint.save_every_minutes
        save_due = self.is_main and minutes > 0 and time.monotonic() - self._last_save_time >= 60 * minutes
        s = reduce_step_stats(acc, self.grad_accum_steps, grad_norm, self.signals, save_due, load, own_seconds)
        finite = math.isfinite(s.loss) and math.isfinite(s.aux_loss) and math.isfinite(s.grad_norm)
        if finite:
            self.optimizer.step()
        return {"loss": s.loss, "aux_loss": s.aux_loss, "grad_norm": s.grad_norm, "lr": lr, "finite": finite,
                "stop": self.signals.agreed is not None, "save_due": s.save_due, "expert_load": s.expert_load,
                "slowest_rank": s.slowest_rank, "slowest_s": s.slowest_s, "fastest_s": s.fastest_s}

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
        mine = scored[ps.get_dp_rank()::ps.get_dp_size()].tolist()
        # --fsdp: a forward is collective over the world, so every rank runs as many; the extra
        # sequences (repeats of the first) score nothing.
        pad = -(-len(scored) // ps.get_dp_size()) - len(mine) if self.fsdp else 0
        val = Subset(self.val_dataset, mine + scored[:1].tolist() * pad)
        totals = torch.zeros(2, device=self.device)
        # A private generator, so validation never draws from the global (dropout) RNG.
        for i, batch in enumerate(DataLoader(val, batch_size=t.batch_size, generator=torch.Generator())):
            inputs, targets, positions, mask, _ = self._split_batch(batch)
            if pad:
                rows = i * t.batch_size + torch.arange(len(batch), device=targets.device)
                targets = targets.masked_fill((rows >= len(mine))[:, None], IGNORE_INDEX)
            with self._autocast():
                logits = self.model(inputs, position_ids=positions, document_mask=mask)
            totals += torch.stack((cross_entropy_sum(logits, targets),
                                   (targets != IGNORE_INDEX).sum().float()))
        self.model.train()
        return reduce_validation(totals, self.signals)

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
                              prefetch_factor=4 if workers else None, worker_init_fn=ignore_stop_signals,
                              generator=torch.Generator().manual_seed(t.seed))

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.config
        t, c = cfg.training, cfg.checkpoint
        flops_tok, peak = flops_per_token(cfg.model, t.seq_len), peak_flops(self.device)
        profiler = StepProfiler(self.is_main and t.use_profiler, t.steps_to_profile,
                                os.path.join(self.run_dir, "rank0_trace.json"),
                                before_stop=self.optimizer.finish_param_gather)  # no collective in the trace
        watchdog = Watchdog(self.rank, self.world_size, cfg.parallel.step_timeout_minutes, os.path.join(
            self.run_dir, "hangs"), wait_points=(reduce_step_stats.__code__.co_filename,))
        self.model.train()
        with closing(self._train_loader()) as batches, self.log.progress(self.total_steps, self.step), profiler:
            while self.step < self.total_steps:
                step = self.step
                with profiler.step(step):
                    t0 = time.perf_counter()
                    with watchdog.step(step):
                        stats = self.train_step(batches)
                    stats["step_time"] = time.perf_counter() - t0
                    stats["tokens_per_s"] = t.total_batch_size / stats["step_time"]
                    stats["mfu"] = mfu(stats["tokens_per_s"] / self.world_size, flops_tok, peak)
                    self.step += 1
                    self.log.train_step(step, stats)
                    self._count_skips(stats["finite"])
                last = self.step == self.total_steps
                if t.do_val and (self.step % t.val_every_steps == 0 or last):
                    stats["val_loss"] = self.evaluate()
                    self.log.val(step, stats["val_loss"])
                if self.downstream and (self.step % t.eval_every_steps == 0 or last):
                    self.optimizer.finish_param_gather()
                    stats["eval"] = self.downstream.evaluate(self.model, self._autocast, self.signals)
                    self.log.downstream(step, stats["eval"])
                self.log.metrics_record(step, stats, self.step * t.total_batch_size, self.skipped_steps, self.device)
                stopping = self.signals.agreed is not None  # agreed in the step's or validation's all-reduce
                saved = None
                if c.do_save and (self.step % c.save_every_steps == 0 or last or stopping or stats["save_due"]):
                    saved = self.save()
                    # A signal that came during this save: stop here, the step is saved.
                    stopping = stopping or (not last and share_stop(self.signals, self.device))
                if stopping:
                    self.saver.wait()   # --async_save: the stop's checkpoint complete
                    self.signals.announce_stop(self.step, saved, self.is_main)
                    break
            self.saver.wait()
        watchdog.close()
        self.optimizer.finish_param_gather()   # the model is complete when train() returns
        self.log.close()

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

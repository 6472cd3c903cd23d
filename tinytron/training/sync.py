"""What the ranks agree on: stop signals, the time-based save, each step's statistics (all carried
by the step's ONE all-reduce, the only host sync of a step) and the validation loss."""

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinytron.distributed import parallel_state as ps

# Signals that ask the run to save and stop: SIGTERM (SLURM's scancel and preemption, Kubernetes,
# torchrun passing its own SIGTERM on) and SIGUSR1 (SLURM's early warning, `--signal=USR1@120`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of the DataLoader workers: the main process decides what a signal means.
    A worker that died of a SIGTERM meant for the whole job (SLURM signals every process,
    torchrun its workers' process groups) would fail the step with "DataLoader worker is killed
    by signal"; SIGINT (Ctrl-C reaches the whole process group) would print a traceback per worker."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Catches STOP_SIGNALS from construction on (a signal during setup stops the run after its
    first step instead of killing the process). A handler only sets a flag: the ranks share the
    flags at their next all-reduce (a step's statistics, the validation totals, or the one after a
    save), and all stop at the same step."""

    def __init__(self):
        self.received = set()  # stop signals this process received
        self.agreed = None     # name of the stop signal any rank received, once the ranks agreed
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received.add(signum)

    def flags(self, device: torch.device, *extra: float) -> torch.Tensor:
        """[SIGTERM received, SIGUSR1 received, *extra] of this rank, on `device` for an
        all-reduce (pinned and copied without blocking: it is part of every step)."""
        flags = [float(sig in self.received) for sig in STOP_SIGNALS] + list(extra)
        return torch.tensor(flags, pin_memory=device.type == "cuda").to(device, non_blocking=True)

    def agree(self, counts: list[float]) -> None:
        """counts: the first len(STOP_SIGNALS) values of flags() summed over all ranks, so the
        same on every rank: any signal on any rank stops the run, named after SIGUSR1 if any rank
        got one (the launcher requeues a SLURM job on SIGUSR1)."""
        got = [sig.name for sig, count in zip(STOP_SIGNALS, counts) if count > 0]
        if got and self.agreed is None:
            self.agreed = "SIGUSR1" if "SIGUSR1" in got else got[0]

    def share(self, device: torch.device) -> bool:
        """Share the stop signals received since the last all-reduce (collective); -> stop?"""
        flags = self.flags(device)
        if dist.is_initialized():
            dist.all_reduce(flags)
        self.agree(flags.tolist())
        return self.agreed is not None

    def announce_stop(self, step: int, saved: bool, is_main: bool) -> None:
        """After the agreed stop (and its complete checkpoint): say so, and tell the launcher
        (scripts/launch.sh) through $TINYTRON_STOP_FILE that this node's workers stopped on a
        signal on purpose: torchrun itself exits 1 when it got the signal too."""
        if is_main:
            print(f"[tinytron] {self.agreed}: {f'saved step {step}' if saved else f'at step {step}, not saved'}, "
                  "exiting", flush=True)
        stop_file = os.environ.get("TINYTRON_STOP_FILE")
        if stop_file and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            with open(stop_file, "w") as f:
                f.write(f"{self.agreed} {step}\n")


@dataclass
class StepStats:
    """A step's statistics, the same on every rank."""
    loss: float                # mean language-model loss per token of the global batch
    aux_loss: float            # mean MoE auxiliary loss (0 for dense models)
    grad_norm: float           # global gradient norm, before clipping
    save_due: bool             # rank 0's --save_every_minutes clock says save
    expert_load: list | None   # tokens routed to each expert, [layer][expert], summed over ranks


def reduce_step_stats(losses: torch.Tensor, micro_steps: int, grad_norm: torch.Tensor,
                      signals: StopSignals, save_due: bool, expert_load: torch.Tensor | None) -> StepStats:
    """The step's one all-reduce and host sync. losses: [lm, aux] summed over this rank's
    micro-steps; grad_norm: already the same on every rank; expert_load: [layers, experts] of
    this rank summed over micro-steps (totals over its EP = SEP group), or None. The stop flags
    and rank 0's save decision travel in the same all-reduce, so every rank acts on them at the
    same step (see StopSignals)."""
    # SEP ranks hold shares of one sequence's loss (sum them); DP ranks hold different sequences
    # (average them): a SUM over the world divided by dp_size does both.
    flags = signals.flags(losses.device, float(save_due))
    # Expert loads are already totals over the EP (= SEP) group: divide by sep before the sum.
    extra = [] if expert_load is None else [expert_load.flatten() / ps.get_sep_size()]
    stats = torch.cat((losses / (micro_steps * ps.get_dp_size()), flags, *extra))
    if dist.is_initialized():
        dist.all_reduce(stats)
    values = torch.cat((stats, grad_norm.view(1))).tolist()  # the step's one host sync
    norm = values.pop()
    lm, aux, stop_term, stop_usr1, save = values[:5]
    signals.agree([stop_term, stop_usr1])
    load = None
    if expert_load is not None:
        experts = expert_load.shape[1]
        load = [[round(v) for v in values[5 + i * experts:5 + (i + 1) * experts]] for i in range(expert_load.shape[0])]
    return StepStats(loss=lm, aux_loss=aux, grad_norm=norm, save_due=save > 0, expert_load=load)


def reduce_validation(totals: torch.Tensor, signals: StopSignals) -> float:
    """totals: [sum of token losses, tokens] over this rank's validation sequences -> the mean
    token loss over all ranks. The same all-reduce shares the stop signals received meanwhile."""
    totals = torch.cat((totals, signals.flags(totals.device)))
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss = totals[0] / totals[1].clamp(min=1)
    loss, *flags = torch.cat((loss.view(1), totals[2:])).tolist()
    signals.agree(flags)
    return loss

"""What the ranks agree on: each step's statistics, with the stop signals (caught by
distributed/signals.py) and the time-based save carried by the same all-reduce (the step's ONE
all-reduce, its only host sync), and the validation loss."""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinytron.distributed import parallel_state as ps
from tinytron.distributed.signals import STOP_SIGNALS, StopSignals


def stop_flags(signals: StopSignals, device: torch.device, *extra: float) -> torch.Tensor:
    """[SIGTERM, SIGUSR1, SIGINT received, *extra] of this rank, on `device` for an all-reduce
    (pinned and copied without blocking: it is part of every step)."""
    flags = [float(sig in signals.received) for sig in STOP_SIGNALS] + list(extra)
    return torch.tensor(flags, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def agree_on_stop(signals: StopSignals, counts: list[float]) -> None:
    """counts: the first len(STOP_SIGNALS) values of stop_flags summed over all ranks, so the same
    on every rank: any signal on any rank stops the run (`signals.agreed`), named after SIGUSR1 if
    any rank got one (the launcher requeues a SLURM job on SIGUSR1)."""
    got = [sig.name for sig, count in zip(STOP_SIGNALS, counts) if count > 0]
    if got and signals.agreed is None:
        signals.agreed = "SIGUSR1" if "SIGUSR1" in got else got[0]


def share_stop(signals: StopSignals, device: torch.device) -> bool:
    """Share the stop signals received since the last all-reduce (collective); -> stop?"""
    flags = stop_flags(signals, device)
    if dist.is_initialized():
        dist.all_reduce(flags)
    agree_on_stop(signals, flags.tolist())
    return signals.agreed is not None


@dataclass
class StepStats:
    """A step's statistics, the same on every rank."""
    loss: float                # mean language-model loss per token of the global batch
    aux_loss: float            # mean MoE auxiliary loss (0 for dense models)
    grad_norm: float           # global gradient norm, before clipping
    save_due: bool             # rank 0's --save_every_minutes clock says save
    expert_load: list | None   # tokens routed to each expert, [layer][expert], summed over ranks
    slowest_rank: int          # the rank whose own part of the step (`own_seconds`) took longest
    slowest_s: float           # its own part, in seconds
    fastest_s: float           # the shortest own part of any rank


def reduce_step_stats(losses: torch.Tensor, micro_steps: int, grad_norm: torch.Tensor,
                      signals: StopSignals, save_due: bool, expert_load: torch.Tensor | None,
                      own_seconds: float = 0.0) -> StepStats:
    """The step's one all-reduce and host sync. losses: [lm, aux] summed over this rank's
    micro-steps; grad_norm: already the same on every rank; expert_load: [layers, experts] of
    this rank summed over micro-steps (totals over its EP = SEP group), or None; own_seconds:
    this rank's own part of the step (host time until it waits for the others), of which the
    slowest and fastest rank are found. The stop flags and rank 0's save decision travel in the
    same all-reduce, so every rank acts on them at the same step."""
    # SEP ranks hold shares of one sequence's loss (sum them); DP ranks hold different sequences
    # (average them): a SUM over the world divided by dp_size does both. Each rank's time goes in
    # its own slot of a [world] vector: after the SUM every rank holds all of them.
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    times = [0.0] * world
    times[rank] = own_seconds
    flags = stop_flags(signals, losses.device, float(save_due), *times)
    # Expert loads are already totals over the EP (= SEP) group: divide by sep before the sum.
    extra = [] if expert_load is None else [expert_load.flatten() / ps.get_sep_size()]
    stats = torch.cat((losses / (micro_steps * ps.get_dp_size()), flags, *extra))
    if dist.is_initialized():
        dist.all_reduce(stats)
    values = torch.cat((stats, grad_norm.view(1))).tolist()  # the step's one host sync
    norm = values.pop()
    n = len(STOP_SIGNALS)
    lm, aux, *stops, save = values[:3 + n]
    times, values = values[3 + n:3 + n + world], values[3 + n + world:]
    agree_on_stop(signals, stops)
    load = None
    if expert_load is not None:
        experts = expert_load.shape[1]
        load = [[round(v) for v in values[i * experts:(i + 1) * experts]] for i in range(expert_load.shape[0])]
    slowest = max(range(world), key=times.__getitem__)
    return StepStats(loss=lm, aux_loss=aux, grad_norm=norm, save_due=save > 0, expert_load=load,
                     slowest_rank=slowest, slowest_s=times[slowest], fastest_s=min(times))


def reduce_validation(totals: torch.Tensor, signals: StopSignals) -> float:
    """totals: [sum of token losses, tokens] over this rank's validation sequences -> the mean
    token loss over all ranks. The same all-reduce shares the stop signals received meanwhile."""
    totals = torch.cat((totals, stop_flags(signals, totals.device)))
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss = totals[0] / totals[1].clamp(min=1)
    loss, *flags = torch.cat((loss.view(1), totals[2:])).tolist()
    agree_on_stop(signals, flags)
    return loss

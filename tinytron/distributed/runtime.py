"""The runtime of one process: its device, the process group, the parallel groups and (for training)
its stop-signal handlers.

`init_runtime` is the one set-up shared by the Trainer, the benchmarks and generation: launched
with `python` (WORLD_SIZE unset: one process, no process group) or `torchrun` (one process per
device, env:// rendezvous).
"""

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tinytron.distributed import abort
from tinytron.distributed import parallel_state as ps
from tinytron.distributed.signals import StopSignals, stop_interrupt_thread


class RuntimeSetupError(ValueError):
    """A device or backend that cannot be used here; the message is one line naming the flag."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device  # this process's device: cuda:LOCAL_RANK, or cpu
    rank: int             # global rank (0 without a process group)
    world_size: int
    is_main: bool         # global rank 0: the one that prints and writes the run's files
    signals: StopSignals | None = None  # SIGTERM / SIGUSR1 caught (catch_stop_signals), else None


def pick_device(device: str = "auto") -> torch.device:
    """"auto" (CUDA when available), "cpu", "cuda" (this process's GPU: cuda:LOCAL_RANK) or
    "cuda:N" -> the device, made the current CUDA device. No process group needed: also the
    device of single-process inference."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise RuntimeSetupError(f"--device {device} but no CUDA device is available "
                                 "(--device auto picks CUDA when there is one, else the CPU)")
    if dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(dev)
    return dev


def init_runtime(device: str = "auto", backend: str = "auto", sep_size: int = 1,
                 timeout_minutes: float = 30.0, catch_stop_signals: bool = False) -> Runtime:
    """Pick the device ("auto": CUDA when available) and the backend ("auto": nccl on CUDA, else
    gloo); when WORLD_SIZE > 1, start the process group (a collective timeout of
    `timeout_minutes`), watch for other ranks' failures (abort.py) and build the DP/SEP groups
    (parallel_state.py). Raises RuntimeSetupError for a device or backend that cannot be used.
    Without WORLD_SIZE > 1 it only picks the device (see pick_device). catch_stop_signals: from
    here on SIGTERM and SIGUSR1 ask for a stop the ranks agree on (signals.py) instead of killing
    the process, so a signal during the rest of the set-up (tokenizing, loading a checkpoint)
    stops a training run after its first step."""
    signals = StopSignals() if catch_stop_signals else None
    dev = pick_device(device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise RuntimeSetupError("--backend nccl needs --device cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # Let the NCCL watchdog abort a stuck collective instead of hanging (no-op on gloo).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        abort.watch(world)  # an error on one rank ends every rank (see abort.py)
    if dist.is_initialized():
        ps.initialize_parallel_state(sep_size)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(device=dev, rank=rank, world_size=world, is_main=rank == 0, signals=signals)


def close_runtime() -> None:
    """At a normal exit, before the interpreter's: stop and join the threads the runtime started
    (the second-SIGINT thread, the failure watcher); free what the run left in reference cycles
    (a Trainer's model and optimizer hold tensors and collective handles: freed during the
    interpreter's teardown instead, their C++ side may need the GIL from a backend thread, which
    then aborts with "terminate called without an active exception"); drop the parallel groups,
    then destroy every process group (torch shuts them down in order)."""
    stop_interrupt_thread()
    abort.stop_watching()
    gc.collect()
    ps.destroy_parallel_state()
    if dist.is_initialized():
        dist.destroy_process_group()

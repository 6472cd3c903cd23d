"""Run a function in N processes on the gloo backend (CPU) and collect what each returns."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (fixed ports collide with other jobs on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two cores shared by several ranks
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        from tinytron.distributed.parallel_state import destroy_parallel_state
        destroy_parallel_state()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> list:
    """Call fn(*args) on every rank of a fresh gloo world of `world_size` processes (torch.distributed
    initialised, env vars RANK/WORLD_SIZE/... set); return the per-rank results, rank order.
    fn must be a module-level function (processes are spawned); a failure in any rank raises."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]

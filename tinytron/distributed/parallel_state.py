"""Process groups: data parallel (DP) and sequence-and-expert parallel (SEP).

The world of `dp_size * sep_size` ranks is cut into SEP groups of contiguous ranks (so SEP traffic,
the heavy all-to-alls, stays inside a node) and DP groups of strided ranks (same offset in every
SEP block). With world 8 and sep 2: SEP groups [0,1] [2,3] [4,5] [6,7]; DP groups [0,2,4,6]
[1,3,5,7]. SEP is both the sequence-parallel (Ulysses) and the expert-parallel group.

Every getter works with torch.distributed not initialised (sizes 1, ranks 0, groups None), so
library code can call them unconditionally.
"""

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    world_size: int
    rank: int
    dp_size: int
    dp_rank: int
    sep_size: int
    sep_rank: int
    dp_group: object
    sep_group: object


_STATE: ParallelState | None = None


def sep_group_ranks(world_size: int, sep_size: int) -> list[list[int]]:
    return [list(range(b, b + sep_size)) for b in range(0, world_size, sep_size)]


def dp_group_ranks(world_size: int, sep_size: int) -> list[list[int]]:
    return [list(range(offset, world_size, sep_size)) for offset in range(sep_size)]


def initialize_parallel_state(sep_size: int = 1) -> ParallelState:
    """Build the DP and SEP groups. Collective: every rank calls it with the same sep_size after
    `dist.init_process_group`. Raises ValueError if the world does not split into SEP groups."""
    global _STATE
    world, rank = dist.get_world_size(), dist.get_rank()
    if sep_size < 1 or world % sep_size:
        raise ValueError(f"world size {world} is not divisible by --sep_size {sep_size}")
    dp_group = sep_group = None
    # new_group is collective over the whole world: every rank creates every group, same order.
    for ranks in sep_group_ranks(world, sep_size):
        group = dist.new_group(ranks)
        if rank in ranks:
            sep_group = group
    for ranks in dp_group_ranks(world, sep_size):
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    _STATE = ParallelState(world_size=world, rank=rank, dp_size=world // sep_size,
                           dp_rank=rank // sep_size, sep_size=sep_size, sep_rank=rank % sep_size,
                           dp_group=dp_group, sep_group=sep_group)
    return _STATE


def destroy_parallel_state() -> None:
    global _STATE
    _STATE = None


def get_state() -> ParallelState:
    if _STATE is not None:
        return _STATE
    return ParallelState(world_size=1, rank=0, dp_size=1, dp_rank=0, sep_size=1, sep_rank=0,
                         dp_group=None, sep_group=None)


def get_dp_group():
    return get_state().dp_group


def get_dp_size() -> int:
    return get_state().dp_size


def get_dp_rank() -> int:
    return get_state().dp_rank


def get_sep_group():
    return get_state().sep_group


def get_sep_size() -> int:
    return get_state().sep_size


def get_sep_rank() -> int:
    return get_state().sep_rank


# Sequence parallelism and expert parallelism share the SEP group.
get_sp_group = get_ep_group = get_sep_group
get_sp_size = get_ep_size = get_sep_size
get_sp_rank = get_ep_rank = get_sep_rank


def topology_string() -> str:
    s = get_state()
    return (f"world {s.world_size} = dp {s.dp_size} x sep {s.sep_size}; "
            f"SEP groups {sep_group_ranks(s.world_size, s.sep_size)}; "
            f"DP groups {dp_group_ranks(s.world_size, s.sep_size)}")


def print_topology() -> None:
    """Print the group layout once, on global rank 0."""
    if get_state().rank == 0:
        print(f"[tinytron] {topology_string()}", flush=True)

"""Process-group layout: SEP groups of contiguous ranks, DP groups strided (gloo, world 4)."""

import torch
import torch.distributed as dist

from tests.dist_helper import run_distributed
from tinytron.distributed import parallel_state as ps

# The layouts the module promises, written out by hand for world 4.
EXPECTED = {
    1: {"sep": [[0], [1], [2], [3]], "dp": [[0, 1, 2, 3]]},
    2: {"sep": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]]},
    4: {"sep": [[0, 1, 2, 3]], "dp": [[0], [1], [2], [3]]},
}


def _group_of(rank: int, groups: list[list[int]]) -> list[int]:
    return next(g for g in groups if rank in g)


def _state_worker() -> dict:
    rank = dist.get_rank()
    out = {}
    for sep in (3, 0):
        # Raised before any group is created, identically on every rank: nobody is left waiting.
        try:
            ps.initialize_parallel_state(sep_size=sep)
        except ValueError as e:
            out[f"error{sep}"] = str(e)
    for sep in EXPECTED:
        ps.initialize_parallel_state(sep_size=sep)
        # 2**rank identifies the members of a group from the sum of an all-reduce over it.
        sep_sum = torch.tensor([2.0 ** rank])
        dp_sum = torch.tensor([2.0 ** rank])
        dist.all_reduce(sep_sum, group=ps.get_sep_group())
        dist.all_reduce(dp_sum, group=ps.get_dp_group())
        out[sep] = {
            "sizes": (ps.get_sep_size(), ps.get_dp_size(), ps.get_sp_size(), ps.get_ep_size()),
            "ranks": (ps.get_sep_rank(), ps.get_dp_rank(), ps.get_sp_rank(), ps.get_ep_rank()),
            "group_sizes": (dist.get_world_size(ps.get_sep_group()),
                            dist.get_world_size(ps.get_dp_group())),
            "group_ranks": (dist.get_rank(ps.get_sep_group()), dist.get_rank(ps.get_dp_group())),
            "same_group": ps.get_sp_group() is ps.get_sep_group() is ps.get_ep_group(),
            "sums": (sep_sum.item(), dp_sum.item()),
            "state": (ps.get_state().world_size, ps.get_state().rank),
            "topology": ps.topology_string(),
        }
    return out


def test_groups_world4():
    results = run_distributed(_state_worker, 4)
    for rank, out in enumerate(results):
        assert "--sep_size 3" in out["error3"] and "\n" not in out["error3"]
        assert "--sep_size 0" in out["error0"]
        for sep, layout in EXPECTED.items():
            got = out[sep]
            sep_members = _group_of(rank, layout["sep"])
            dp_members = _group_of(rank, layout["dp"])
            assert got["sizes"] == (len(sep_members), len(dp_members),
                                    len(sep_members), len(sep_members))
            # Rank within a group = index in the group's rank list, for getters and for torch.
            assert got["ranks"] == (sep_members.index(rank), dp_members.index(rank),
                                    sep_members.index(rank), sep_members.index(rank))
            assert got["group_sizes"] == (len(sep_members), len(dp_members))
            assert got["group_ranks"] == (sep_members.index(rank), dp_members.index(rank))
            assert got["same_group"]
            assert got["sums"] == (sum(2.0 ** r for r in sep_members),
                                   sum(2.0 ** r for r in dp_members))
            assert got["state"] == (4, rank)
            assert str(layout["sep"]) in got["topology"] and str(layout["dp"]) in got["topology"]


def test_group_rank_lists():
    for sep, layout in EXPECTED.items():
        assert ps.sep_group_ranks(4, sep) == layout["sep"]
        assert ps.dp_group_ranks(4, sep) == layout["dp"]
    assert ps.sep_group_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ps.dp_group_ranks(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_getters_without_process_group():
    assert not dist.is_initialized()
    ps.destroy_parallel_state()
    assert (ps.get_dp_size(), ps.get_sep_size(), ps.get_sp_size(), ps.get_ep_size()) == (1, 1, 1, 1)
    assert (ps.get_dp_rank(), ps.get_sep_rank(), ps.get_sp_rank(), ps.get_ep_rank()) == (0, 0, 0, 0)
    assert ps.get_dp_group() is None and ps.get_sep_group() is None and ps.get_ep_group() is None

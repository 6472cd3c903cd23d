"""Expert parallelism (EP) over the SEP group: dropless token dispatch with variable all-to-alls.

The experts of every MoE layer are split over the EP group (the SEP group): rank r holds global
experts [r * E_local, (r + 1) * E_local). Each rank routes its own tokens, sorts the (token, slot)
assignments by global expert (which also sorts them by destination rank), and then:

  1. exchanges per-expert counts (one small `all_to_all_single`) and reads the split sizes to the
     host (the layer's one host sync),
  2. sends every assignment's hidden state to the rank owning its expert (variable all-to-all),
  3. runs its local experts on what it received, regrouped expert-major,
  4. sends the results back (the reverse all-to-all); the source rank applies the routing weights.

Every rank takes part in both all-to-alls even when it sends or receives nothing, so nobody hangs
and every expert's gradient is defined (zero when it saw no token). Dropless: no capacity factor.
`dispatch` does 1-2 and `combine` 4; `ExpertParallel` runs 1-4 and sums the layer's routing counts
per sequence over the group (its load-balancing statistics). `apply_expert_parallel` slices the
expert weights and puts an `ExpertParallel` in place of each MoE layer's `Experts` submodule; the
model itself is unchanged.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from tinytron.distributed.all_to_all import all_to_all_variable
from tinytron.model.moe import MoE, swiglu_experts


def _transpose_chunks(x: torch.Tensor, sizes: list[int], rows: int, cols: int) -> torch.Tensor:
    """x is `rows * cols` consecutive chunks along dim 0, chunk (i, j) at position i * cols + j with
    sizes[i * cols + j] rows; return them in the order (j, i) (the transposed chunk grid)."""
    if rows == 1 or cols == 1:
        return x
    chunks = x.split(sizes)
    return torch.cat([chunks[i * cols + j] for j in range(cols) for i in range(rows)])


class Route(NamedTuple):
    """The split sizes `dispatch` read, which `combine` needs to send the results back."""
    send_splits: list[int]   # rows this rank sends to each rank
    recv_splits: list[int]   # rows it receives from each rank
    recv_counts: list[int]   # [r * E_local + e]: rows from rank r for local expert e


def dispatch(x: torch.Tensor, counts: torch.Tensor, group
             ) -> tuple[torch.Tensor, torch.Tensor, list[int], Route]:
    """Send this rank's routed rows to the ranks of the EP `group` holding their experts.

    x: [M, C] this rank's (token, slot) hidden states sorted by global expert id.
    counts: [E] int64 (global experts), how many of the M rows go to each expert (sums to M).
    Returns (x_local [M', C] the rows for this rank's E / ep experts, sorted by local expert;
    their counts [E_local] int64 on x's device; the same counts as a host list; the Route for
    `combine`). One host sync (split sizes).
    """
    ep = dist.get_world_size(group)
    num_local = counts.numel() // ep
    # recv_counts[r * E_local + e]: rows rank r sends to my local expert e.
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    host = torch.cat((counts, recv_counts)).tolist()  # the one host sync of the layer
    send_host, recv_host = host[:counts.numel()], host[counts.numel():]
    send_splits = [sum(send_host[r * num_local:(r + 1) * num_local]) for r in range(ep)]
    recv_splits = [sum(recv_host[r * num_local:(r + 1) * num_local]) for r in range(ep)]
    local_counts_host = [sum(recv_host[e::num_local]) for e in range(num_local)]

    x = all_to_all_variable(x, send_splits, recv_splits, group)        # (source rank, expert)
    x = _transpose_chunks(x, recv_host, ep, num_local)                 # (expert, source rank)
    local_counts = recv_counts.view(ep, num_local).sum(0)
    return x, local_counts, local_counts_host, Route(send_splits, recv_splits, recv_host)


def combine(y: torch.Tensor, route: Route, group) -> torch.Tensor:
    """y: [M', C] the local experts' outputs for `dispatch`'s x_local, same order -> [M, C] the
    output of each row of the x given to `dispatch`, in its order (back on its source rank)."""
    ep = len(route.send_splits)
    num_local = len(route.recv_counts) // ep
    expert_major_sizes = [route.recv_counts[r * num_local + e] for e in range(num_local) for r in range(ep)]
    y = _transpose_chunks(y, expert_major_sizes, num_local, ep)        # (source rank, expert)
    return all_to_all_variable(y, route.recv_splits, route.send_splits, group)


class ExpertParallel(nn.Module):
    """An MoE layer's expert computation with its experts split over `group` (the EP = SEP group):
    the same forward as `tinytron.model.moe.Experts`.

    forward(x [M, C] this rank's (token, slot) rows sorted by global expert, seq_counts [B, E] int64
    its rows per (sequence, expert), gate_up [E_local, C, 2I], down [E_local, I, C] this rank's
    experts) -> (y [M, C] the expert outputs in x's order, seq_counts summed over `group`: the
    group's ranks hold chunks of the same B sequences). seq_counts is reduced in place.
    """

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor, seq_counts: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, counts, counts_host, route = dispatch(x, seq_counts.sum(dim=0), self.group)
        y = combine(swiglu_experts(x, gate_up, down, counts, counts_host), route, self.group)
        dist.all_reduce(seq_counts, group=self.group)
        return y, seq_counts


def apply_expert_parallel(model: nn.Module, group) -> None:
    """Split the experts of every `MoE` module of `model` over `group` (the SEP group).

    Its expert parameters (the ones marked `is_expert`, stacked along dim 0 over all experts) each
    keep rows [ep_rank * E_local, (ep_rank + 1) * E_local) under the same name, so the full tensor
    is the concatenation over the group in rank order (which the checkpoint relies on), and
    initialisation (done on the full tensors) does not depend on the layout; its `experts`
    submodule becomes `ExpertParallel`. Call it once, after building the model and before creating
    the optimizer. Raises ValueError when the experts do not split evenly.
    """
    ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    for module in list(model.modules()):
        if not isinstance(module, MoE):
            continue
        if isinstance(module.experts, ExpertParallel):   # its weights are already a slice
            raise ValueError("apply_expert_parallel was already applied to this model")
        for name, p in list(module.named_parameters(recurse=False)):
            if not getattr(p, "is_expert", False):
                continue
            if p.shape[0] % ep:
                raise ValueError(f"--num_experts {p.shape[0]} is not divisible by --sep_size {ep} "
                                 "(expert parallelism)")
            num_local = p.shape[0] // ep
            local = nn.Parameter(p.detach()[ep_rank * num_local:(ep_rank + 1) * num_local].clone(),
                                 requires_grad=p.requires_grad)
            local.is_expert = True
            setattr(module, name, local)
        module.experts = ExpertParallel(group)

"""--fsdp --optimizer muon: each Muon matrix made whole on one owner rank for its update, then
handed back to FSDP2's row shards.

FSDP2 holds every param as a DTensor sharded on dim 0 over its group (apply.py: rank r of N holds
rows [r c, (r + 1) c), c = ceil(rows / N)); Muon orthogonalises whole matrices:
    a 2-D hidden weight [m, n]             one matrix, its rows spread over the group
    a stacked expert weight [E, m, n]      E matrices (this expert-parallel rank's experts); its
                                           dim-0 shards hold whole experts, on some of the ranks
Every matrix is owned by one rank of its param's group (dense params: the world; experts: the DP
group), chosen greedily by size as ZeRO-1 chooses its whole-matrix owners (whole_matrices.py's
greedy_owners), so no rank owns more than 1/N of the Muon elements plus one matrix; the owner
alone holds the matrix's momentum. One step, per process group (the same order on every rank):

    gather   ONE all_to_all_single: each rank sends each owner its rows of the owner's matrices,
             grad rows then param rows, matrix by matrix (uneven split sizes, all known from the
             shapes at construction: no host sync, no per-parameter collective)
    step     the owner cats the rows (in rank order) into whole [m, n] grads and params, and
             torch.optim.Muon steps them: momentum, Newton-Schulz, adjust_lr_fn and decoupled
             weight decay are torch's own code on the whole matrix
    return   ONE all_to_all_single: each owner sends each rank its rows of the updated matrices,
             copied into that rank's shard

Why the params travel to the owner too: torch.optim.Muon writes the whole param
(p (1 - lr wd) - lr' O); running its code on the real matrix makes the step torch's bit for bit,
where returning only the update would redo the weight decay here. The cost: each Muon element
crosses the wire at most three times per step (grad and param to the owner, the update back), so
a rank sends about 3 (N - 1) / N^2 of the Muon bytes: 1.5 / N times what a ring reduce-scatter
plus all-gather of the same matrices would (docs/benchmarks.md has the measured bytes).
Transient, on each rank: the gather's send (2 x its rows) and receive (2 x its owned matrices)
buffers and the owned matrices' whole grads and params; then the return's buffers (its owned
matrices; its rows). tinytron.training.memory counts them all, exactly.
"""

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from tinytron.distributed.fsdp.apply import local_rows, shard_rows
from tinytron.distributed.zero1.whole_matrices import greedy_owners


def matrices(shapes: list[tuple[int, ...]], size: int) -> list["Matrix"]:
    """The Muon matrices of params of `shapes` ([m, n]: one; stacked [E, m, n]: E), sharded over
    one process group of `size` ranks, in the optimizer's order, each with its owner: greedy by
    size. A pure function: tinytron.training.memory plans with it."""
    out = []
    for shape in shapes:
        height, row = (1, shape[1] * shape[2]) if len(shape) == 3 else (shape[0], shape[1])
        out += [Matrix(shape[0], i * height, height, row, size) for i in range(shape[0] // height)]
    for m, owner in zip(out, greedy_owners([m.height * m.row for m in out], [0] * size)):
        m.owner = owner
    return out


def split_sizes(ms: list["Matrix"], rank: int) -> tuple[list[int], list[int]]:
    """(to_each, from_each): the elements group rank `rank` sends each rank s (s's rows of the
    matrices `rank` owns) and receives from each owner o (its own rows of o's matrices) when the
    updated params return; the gather receives (from each s) and sends (to each o) twice as many:
    grads and params."""
    size = ms[0].size if ms else 1
    to_each = [sum(m.numel(s) for m in ms if m.owner == rank) for s in range(size)]
    from_each = [sum(m.numel(rank) for m in ms if m.owner == o) for o in range(size)]
    return to_each, from_each


@dataclasses.dataclass
class Matrix:
    """One Muon matrix: dim-0 rows [first, first + height) of a param of `rows` dim-0 rows (a 2-D
    [m, n]: all m rows; a stacked [E, m, n]: expert `first`, height 1), `row` elements per dim-0
    row, sharded over `size` ranks."""
    rows: int
    first: int
    height: int
    row: int
    size: int
    owner: int = 0                    # its owner's rank in the param's group
    param: nn.Parameter | None = None   # the FSDP2 DTensor it is a matrix of
    whole: nn.Parameter | None = None   # what torch.optim.Muon steps (on the owner): the [m, n]
                                        # matrix inside the step, an empty tensor between steps

    def span(self, rank: int) -> tuple[int, int]:
        """[lo, hi) of the matrix's flat (row-major) elements that group rank `rank` holds."""
        start, end = shard_rows(self.rows, self.size, rank)
        lo, hi = max(start, self.first), min(end, self.first + self.height)
        return ((lo - self.first) * self.row, (hi - self.first) * self.row) if hi > lo else (0, 0)

    def numel(self, rank: int) -> int:
        lo, hi = self.span(rank)
        return hi - lo

    def local(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's (group rank `rank`) piece of the matrix in `t` (the param or its grad,
        sharded like it), a flat view into the local shard."""
        shard, start = local_rows(t)
        lo, hi = self.span(rank)
        at = (self.first - start) * self.row   # the matrix's element 0, in the shard's flat index
        return shard.view(-1)[at + lo:at + hi]


class _Group:
    """The matrices of the params sharded over one process group (a DeviceMesh's: the world for
    dense params, the DP group for experts), in the same order on every rank, and the split sizes
    (elements, per group rank) of its two all-to-alls. All buffers are 1-D, in the params' dtype,
    on their device."""

    def __init__(self, mesh, params: list[nn.Parameter]):
        self.group, self.size, self.rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        self.matrices = matrices([tuple(p.shape) for p in params], self.size)
        of_matrix = [p for p in params for _ in range(p.shape[0] if p.dim() == 3 else 1)]
        for m, p in zip(self.matrices, of_matrix, strict=True):
            m.param, m.whole = p, nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device))
        self.mine = [m for m in self.matrices if m.owner == self.rank]
        self.to_each, self.from_each = split_sizes(self.matrices, self.rank)

    def gather_launch(self) -> tuple:
        """Launch the gather: send [owner 0's matrices: (grad rows, param rows) each | owner 1's |
        ...] (this rank's rows), receive [from rank 0: (grad rows, param rows) of each matrix I own
        | from rank 1 | ...]. -> (its Work, the send buffer, the receive buffer)."""
        parts = []
        for o in range(self.size):
            for m in self.matrices:
                if m.owner == o:
                    grad = m.param.grad
                    piece = m.local(m.param, self.rank)
                    # A param without a grad steps as zeros, as ZeRO-1's flat grad buffers hold.
                    parts += [piece.new_zeros(piece.shape) if grad is None else m.local(grad, self.rank), piece]
        send = torch.cat(parts)
        recv = send.new_empty(2 * sum(self.to_each))
        work = dist.all_to_all_single(recv, send, [2 * n for n in self.to_each],
                                      [2 * n for n in self.from_each], group=self.group, async_op=True)
        return work, send, recv

    def assemble(self, recv: torch.Tensor) -> None:
        """Each owned matrix's whole [m, n] grad and param (its `whole` tensor's .grad and .data,
        fresh tensors) from the received rows: a matrix's rows come in rank order."""
        grads, params, at = {id(m): [] for m in self.mine}, {id(m): [] for m in self.mine}, 0
        for s in range(self.size):
            for m in self.mine:
                lo, hi = m.span(s)
                grads[id(m)].append(recv[at:at + hi - lo])
                params[id(m)].append(recv[at + hi - lo:at + 2 * (hi - lo)])
                at += 2 * (hi - lo)
        for m in self.mine:
            shape = m.param.shape[-2:]
            m.whole.data = torch.cat(params[id(m)]).view(shape)
            m.whole.grad = torch.cat(grads[id(m)]).view(shape)

    def return_launch(self) -> tuple:
        """Launch the return: send [rank 0's rows of each matrix I own | rank 1's | ...], receive
        [my rows of owner 0's matrices | owner 1's | ...]; frees the whole matrices. -> (its Work,
        the send buffer, the receive buffer)."""
        send = torch.cat([m.whole.detach().view(-1)[slice(*m.span(s))] for s in range(self.size) for m in self.mine]
                         or [local_rows(self.matrices[0].param)[0].new_empty(0)])   # owning none
        recv = send.new_empty(sum(self.from_each))
        for m in self.mine:   # the whole matrices are no longer needed
            m.whole.data, m.whole.grad = m.whole.data.new_empty(0), None
        work = dist.all_to_all_single(recv, send, self.from_each, self.to_each, group=self.group, async_op=True)
        return work, send, recv

    def scatter(self, recv: torch.Tensor) -> None:
        """Copy the returned rows into this rank's param shards (in place: FSDP2's local tensors)."""
        at = 0
        for o in range(self.size):
            for m in self.matrices:
                if m.owner == o:
                    piece = m.local(m.param, self.rank)
                    piece.copy_(recv[at:at + piece.numel()])
                    at += piece.numel()


class WholeMatrices:
    """The params of `optimizer`'s "whole_matrices" groups (FSDP2 DTensors; Muon's), one owner per
    matrix (see the module docstring). Replaces each such group's params by the `whole` tensors of
    the matrices this rank owns (none: an empty group), so the wrapped optimizer steps, and keeps
    state for, exactly those. Call gather() before the optimizer's step and scatter() after it.

    stepped: {whole tensor: its Matrix}; transient: the bytes of the last step's buffers (send,
    recv, whole: gather; back_send, back_recv: return), summed over the process groups."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        by_mesh: dict = {}
        for group in optimizer.param_groups:
            if group.get("whole_matrices"):
                for p in group["params"]:
                    by_mesh.setdefault(p.device_mesh, []).append(p)
        self.groups = [_Group(mesh, params) for mesh, params in by_mesh.items()]
        self.stepped = {m.whole: m for g in self.groups for m in g.mine}
        of_param = {}
        for g in self.groups:
            for m in g.mine:
                of_param.setdefault(m.param, []).append(m.whole)
        for group in optimizer.param_groups:
            if group.get("whole_matrices"):
                group["params"] = [w for p in group["params"] for w in of_param.get(p, [])]
        self.transient: dict[str, int] = {}

    @torch.no_grad()
    def gather(self) -> None:
        """Collective over each process group: the whole grads and params of my matrices."""
        launched = [g.gather_launch() for g in self.groups]   # both groups' all-to-alls in flight
        self.transient = {"send": sum(s.nbytes for _, s, _ in launched),
                          "recv": sum(r.nbytes for _, _, r in launched)}
        for g, (work, _, recv) in zip(self.groups, launched):
            work.wait()
            g.assemble(recv)
        self.transient["whole"] = sum(2 * m.whole.nbytes for m in self.stepped.values())

    @torch.no_grad()
    def scatter(self) -> None:
        """Collective over each process group: every rank's rows of the updated matrices."""
        launched = [g.return_launch() for g in self.groups]
        self.transient.update(back_send=sum(s.nbytes for _, s, _ in launched),
                              back_recv=sum(r.nbytes for _, _, r in launched))
        for g, (work, _, recv) in zip(self.groups, launched):
            work.wait()
            g.scatter(recv)

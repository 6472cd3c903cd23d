"""Differentiable all-to-alls, the one collective that sequence and expert parallelism share.

`all_to_all_variable` sends rows of a tensor to the ranks of a group with any split sizes (expert
dispatch); `all_to_all` is its equal-split form along any two dims (Ulysses' head/sequence swap).
The backward of an all-to-all is the reverse all-to-all.
"""

import torch
import torch.distributed as dist


def _all_to_all_variable(x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                         group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_splits,
                           input_split_sizes=send_splits, group=group)
    return out


class _AllToAllVariable(torch.autograd.Function):
    """Variable-split all-to-all whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all_variable(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_variable(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


# Kept out of compiled graphs (--use_compile breaks the graph here, as it must at a collective):
# torch 2.11's dynamo traced this Function into the compiled block and gave wrong gradients under
# Ulysses + expert parallelism (tests/test_parallel_training.py::test_compile_parity).
@torch.compiler.disable
def all_to_all_variable(x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                        group) -> torch.Tensor:
    """x: [sum(send_splits), ...] on this rank; rows [sum(send_splits[:r]), +send_splits[r]) go to
    rank r of `group`. Returns [sum(recv_splits), ...]: what each rank sent here, in rank order.
    Differentiable (the gradient takes the reverse route)."""
    return _AllToAllVariable.apply(x, send_splits, recv_splits, group)


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into `world` equal chunks along scatter_dim, send chunk i to rank i of `group`, and
    concatenate what arrives (in rank order) along gather_dim: that dim grows `world` times, the
    scatter dim shrinks as much. Differentiable (stack/cat are tracked by autograd; the exchange
    itself is `all_to_all_variable`, whose backward is the reverse exchange)."""
    world = dist.get_world_size(group)
    send = torch.stack(x.chunk(world, dim=scatter_dim))             # [world, ...]: row i -> rank i
    recv = all_to_all_variable(send, [1] * world, [1] * world, group)
    return torch.cat(recv.unbind(0), dim=gather_dim)

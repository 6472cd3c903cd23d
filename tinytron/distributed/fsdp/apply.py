"""Shard a GPT's parameters with FSDP2 (`torch.distributed.fsdp.fully_shard`), the way torchtitan
composes FSDP with context and expert parallelism.

Units (one all-gather before a unit's forward and again before its backward, one reduce-scatter
after its backward; FSDP2 prefetches the next unit's all-gather):
    each Block         its dense params (norms, attention, dense MLP), over the whole world
                       (dp x sep ranks: every SEP rank holds the same dense weights)
    each MoE layer     its stacked expert weights (after `apply_expert_parallel`: this SEP rank's
                       experts), over the DP group only, whose ranks hold the same experts
    each MoE router    over the world, gathered in fp32 (the router runs in fp32)
    the GPT itself     embedding, final norm and LM head (tied or not), over the world
Every param becomes a DTensor sharded on dim 0 (`Shard(0)`, torch.chunk's split: each rank holds
ceil(rows / N) rows, the last ones fewer or none).

Gradients are reduce-scattered with a SUM and then divided by the DP size, for dense and expert
params alike: the sum over SEP and the mean over DP replicas of ZeRO-1 (grad_scale 1/dp), so both
engines compute the same numbers; sums only, never ReduceOp.AVG / PREMUL_SUM (gloo has neither).

bf16 (`MixedPrecisionPolicy`): the blocks' and experts' params are all-gathered and computed in
bf16, grads reduced in fp32 into the fp32 master shards; unit inputs are not cast, so the trainer's
autocast sees the same fp32 residual stream and fp32 embedding output as without FSDP. The root
(embedding, head: autocast runs the head in bf16 anyway) and the routers are gathered in fp32.
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from tinytron.model.moe import MoE


def apply_fsdp(model: nn.Module, dense_group, expert_group, dp_size: int, bf16: bool) -> None:
    """Wrap every block, MoE layer, router and `model` itself with `fully_shard` (see the module
    docstring). dense_group: the group dense params are sharded over (the world); expert_group:
    the DP group (expert params). Call after the model is on its device, after the expert split
    and any weight initialisation, before creating the optimizer. Collective."""
    if isinstance(model, FSDPModule):
        raise ValueError("apply_fsdp was already applied to this model")
    device = next(model.parameters()).device.type
    experts = {name for name, p in model.named_parameters() if getattr(p, "is_expert", False)}
    dense_mesh = DeviceMesh.from_group(dense_group, device)
    expert_mesh = DeviceMesh.from_group(expert_group, device)
    compute = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                   reduce_dtype=torch.float32, cast_forward_inputs=False)
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.layers:
        if isinstance(block.mlp, MoE):
            fully_shard(block.mlp.router, mesh=dense_mesh, mp_policy=fp32)
            fully_shard(block.mlp, mesh=expert_mesh, mp_policy=compute)
        fully_shard(block, mesh=dense_mesh, mp_policy=compute)
    fully_shard(model, mesh=dense_mesh, mp_policy=fp32)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(float(dp_size))
    for name, p in model.named_parameters():   # fully_shard made new Parameters: mark them again
        if name in experts:
            p.is_expert = True


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of `t`, the index of the first one) for a DTensor sharded on dim 0 over a
    1-D mesh (what `fully_shard` makes); (t, 0) for a plain tensor."""
    if not hasattr(t, "device_mesh"):
        return t, 0
    mesh, local = t.device_mesh, t.to_local()
    start, end = shard_rows(t.shape[0], mesh.size(), mesh.get_local_rank())
    if local.shape[0] != end - start:
        raise ValueError(f"unexpected DTensor layout {t.placements} of a {tuple(t.shape)} tensor")
    return local, start


def shard_rows(rows: int, size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the dim-0 rows that rank `rank` of `size` holds of a `rows`-row tensor under
    Shard(0) (torch.chunk's split: ceil(rows / size) rows each, the last ranks fewer or none)."""
    per_rank = -(-rows // size)
    start = min(rank * per_rank, rows)
    return start, min(start + per_rank, rows)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (all-gathered: collective over its mesh); t itself if plain."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


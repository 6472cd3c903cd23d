"""The optimizer side of `--fsdp`: the interface the Trainer and the checkpoints drive ZeRO-1's
DistributedOptimizer through (zero_grad, micro_step, reduce_gradients, clip_grad_norm, step,
finish_param_gather, save, load), over a model wrapped by `apply_fsdp`.

FSDP2 itself all-gathers params before each unit's forward and backward and reduce-scatters the
grads after its backward; the wrapped torch optimizer steps the DTensor shards (its state is
DTensors too: sharded like the params). What is left here:
  micro_step   no reduce-scatter in the micro-steps before the last (FSDP2 keeps the unsharded
               grads and accumulates them; the last backward reduce-scatters their sum)
  clip_grad_norm  the global norm from the local shards with ONE scalar all-reduce
  save / load  the optimizer state in ZeRO-1's checkpoint layout (state.py)
  step         a "whole_matrices" group (Muon's, --optimizer muon) is stepped on whole matrices,
               each on its owner rank, gathered from and returned to the shards (muon.py)
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from tinytron.distributed.fsdp import state
from tinytron.distributed.fsdp.muon import WholeMatrices


class FSDPOptimizer:
    """Drives `optimizer` (a torch optimizer over the params of `model`, a module wrapped by
    `apply_fsdp`); see the module docstring.

    process_group: the group dense params are sharded over (the world); every rank's shards of
    all params (experts: this expert-parallel rank's, over its DP group) partition the model.
    expert_parallel_group: the group across which expert params differ (the SEP group; None: all
    experts local), used to place them in the checkpoint's global (all-experts) tensors.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, process_group,
                 expert_parallel_group=None):
        if not isinstance(model, FSDPModule):
            raise ValueError("FSDPOptimizer needs a model wrapped by apply_fsdp")
        self.optimizer, self.model = optimizer, model
        self.process_group, self.expert_parallel_group = process_group, expert_parallel_group
        self._names: dict[nn.Parameter, str] = {}
        for name, p in model.named_parameters():
            self._names.setdefault(p, name)   # a tied param keeps its first name
        self._group_names = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p not in self._names or not hasattr(p, "device_mesh"):
                    raise ValueError(f"optimizer parameter of shape {tuple(p.shape)} is not a sharded "
                                     "parameter of the model (create the optimizer after apply_fsdp)")
            self._group_names.append([self._names[p] for p in group["params"]])
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        # Muon's groups: from here on they hold the whole matrices this rank owns (muon.py).
        self._whole = WholeMatrices(optimizer)

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's param groups (set 'lr' here, e.g. from a schedule)."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for p in self._params:
            p.grad = None

    @contextlib.contextmanager
    def micro_step(self, last: bool):
        """Wrap each micro-step's backward: only the last one (last=True) reduce-scatters."""
        self.model.set_requires_gradient_sync(last)
        yield

    def reduce_gradients(self) -> None:
        """Nothing left to do: the last micro-step's backward reduce-scattered every unit's grads
        (sum, then / dp: see apply.py) and FSDP2 waited for them at its end."""

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global L2 norm of the grads (before clipping), a 0-dim fp32 tensor, the same on
        every rank; if max_norm > 0, scales the grads by min(1, max_norm / (norm + 1e-6)) (as
        torch.nn.utils.clip_grad_norm_), without a host sync. Dense shards partition the dense
        grads over the world, expert shards one expert-parallel rank's experts over its DP group,
        and the expert-parallel ranks hold different experts: one all-reduce of the local sums of
        squares over the world counts every element once."""
        grads = [p.grad.to_local() for p in self._params if p.grad is not None]
        sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()
        if self.process_group is not None and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(sq, group=self.process_group)
        norm = sq.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)
        return norm

    def step(self) -> None:
        self._whole.gather()   # nothing without a whole_matrices group
        self.optimizer.step()
        self._whole.scatter()

    def finish_param_gather(self) -> None:
        """Nothing in flight between steps: FSDP2 gathers params inside each forward and frees
        them after it. The model's params stay DTensor shards (`full_tensor()` gathers one)."""

    def save(self, directory: str) -> list[str]:
        """Collective: each rank writes its shards of the state into `directory` in ZeRO-1's
        layout (state.py); returns the paths of the files this rank wrote."""
        return state.save(self, directory)

    def checkpoint_state(self) -> dict:
        """What save() writes, for a writer of its own (async saves; see ZeRO-1's)."""
        return state.checkpoint_state(self)

    def load(self, directory: str) -> None:
        """Collective: load a folder written by this or by ZeRO-1's save() at any layout, each
        rank reading only its shards."""
        state.load(self, directory)

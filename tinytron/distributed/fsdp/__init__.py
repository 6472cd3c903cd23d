"""ZeRO-3 through torch's FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded
over the data-parallel ranks (apply.py), driven by the Trainer through the same optimizer
interface as ZeRO-1 (optimizer.py), checkpointed in ZeRO-1's layout (state.py)."""

from tinytron.distributed.fsdp.apply import apply_fsdp
from tinytron.distributed.fsdp.optimizer import FSDPOptimizer

__all__ = ["FSDPOptimizer", "apply_fsdp"]

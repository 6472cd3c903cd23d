"""ZeRO-1 distributed optimizer, and plain data parallelism through the same flat buffers."""

from tinytron.distributed.zero1.distributed_optimizer import DistributedOptimizer

__all__ = ["DistributedOptimizer"]

from tinytron.distributed.expert_parallel.comm import ExpertParallel, apply_expert_parallel, combine, dispatch

__all__ = ["ExpertParallel", "apply_expert_parallel", "combine", "dispatch"]

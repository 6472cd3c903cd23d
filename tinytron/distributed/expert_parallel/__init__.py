from tinytron.distributed.expert_parallel.comm import (
    ExpertParallel,
    all_to_all_variable,
    apply_expert_parallel,
    combine,
    dispatch,
)

__all__ = ["ExpertParallel", "all_to_all_variable", "apply_expert_parallel", "combine", "dispatch"]

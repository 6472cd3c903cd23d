from tinytron.distributed.expert_parallel.comm import (all_to_all_variable, apply_expert_parallel,
                                                        dispatch_and_combine)

__all__ = ["all_to_all_variable", "apply_expert_parallel", "dispatch_and_combine"]

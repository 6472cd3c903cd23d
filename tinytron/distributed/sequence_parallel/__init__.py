from tinytron.distributed.sequence_parallel.ulysses import UlyssesAttention, apply_sequence_parallel, sequence_chunk

__all__ = ["UlyssesAttention", "apply_sequence_parallel", "sequence_chunk"]

from tinytron.distributed.sequence_parallel.ulysses import apply_sequence_parallel, ulysses_attention

__all__ = ["apply_sequence_parallel", "ulysses_attention"]

"""Language-model loss. Computed in fp32 on logits of any dtype; targets equal to -100 are ignored."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits: [B, T, V], targets: [B, T] -> scalar sum of the token losses over valid targets.

    Returning the sum (not the mean) lets a caller divide by a token count taken over more than
    this tensor, e.g. the full sequence when this rank holds one sequence-parallel chunk.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token loss over valid targets (0 when there are none)."""
    num_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return cross_entropy_sum(logits, targets) / num_valid

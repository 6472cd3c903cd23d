"""The document-mask test windows (tests/test_document_mask.py), in a module of their own that imports
only the model and Ulysses, so that the spawned SEP workers start quickly."""

import numpy as np
import torch
import torch.distributed as dist

from tinytron.distributed.parallel_state import get_sep_group, get_sep_rank, initialize_parallel_state
from tinytron.distributed.sequence_parallel import apply_sequence_parallel, sequence_chunk
from tinytron.model import GPT, ModelConfig
from tinytron.model.document_mask import document_layout
from tinytron.model.gpt import cross_entropy_sum

B, T, VOCAB, EOS = 2, 16, 96, 0
# Documents per row (lengths; every one but the last ends with EOS). Row 1 has a one-token
# document (an EOS right after an EOS) and documents that cross every sep-4 chunk boundary.
DOCS = [(5, 7, 4), (3, 1, 9, 3)]


def build_model(heads: int, kv_heads: int) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(block_size=T, vocab_size=VOCAB, num_layer=2, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, hidden_size=64, intermediate_size=128))


def window() -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] tokens (EOS only where DOCS put it) and targets."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(1, VOCAB, (B, T), generator=g)
    for row, lengths in enumerate(DOCS):
        ends = np.cumsum(lengths)[:-1] - 1
        idx[row, ends] = EOS
    return idx, torch.randint(VOCAB, (B, T), generator=g)


def window_run(model, idx, targets, reset: bool, use_flex: bool, rank: int = 0, sep: int = 1):
    """Logits of this rank's chunk and the gradients of the window's summed loss, as the Trainer
    computes them: the mask and positions from the full window, then the chunk. flex_attention has
    no backward on CPU: forward only (gradients None)."""
    local_idx, local_targets, positions = sequence_chunk(idx, targets, rank, sep)
    mask, positions = document_layout(idx, EOS, positions, reset, use_flex)
    with torch.set_grad_enabled(not use_flex):
        logits = model(local_idx, position_ids=positions, document_mask=mask)
    if use_flex:
        return logits, None
    cross_entropy_sum(logits, local_targets).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def documents_alone(heads: int, kv_heads: int, reset: bool):
    """Reference: [B, T, V] logits and the summed gradients of every document run alone."""
    model = build_model(heads, kv_heads)
    idx, targets = window()
    logits = torch.empty(B, T, VOCAB)
    for row, lengths in enumerate(DOCS):
        start = 0
        for n in lengths:
            positions = None if reset else torch.arange(start, start + n)[None]
            doc = model(idx[row:row + 1, start:start + n], position_ids=positions)
            cross_entropy_sum(doc, targets[row:row + 1, start:start + n]).backward()
            logits[row, start:start + n] = doc[0].detach()
            start += n
    return logits, {n: p.grad for n, p in model.named_parameters()}


def sep_checks(sep: int, cases: list) -> list:
    """In a world of `sep` processes: the logits (gathered) and gradients (summed) of the window
    over the SEP group, per case (heads, kv heads, reset positions, flex)."""
    initialize_parallel_state(sep_size=sep)
    idx, targets = window()
    out = []
    for heads, kv_heads, reset, flex in cases:
        model = build_model(heads, kv_heads)
        apply_sequence_parallel(model, get_sep_group())
        logits, grads = window_run(model, idx, targets, reset, flex, get_sep_rank(), sep)
        pieces = [torch.empty_like(logits) for _ in range(sep)]
        dist.all_gather(pieces, logits.contiguous())
        for g in grads.values() if grads is not None else ():
            dist.all_reduce(g)
        out.append((torch.cat(pieces, dim=1), grads))
    return out

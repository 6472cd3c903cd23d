"""The training loss without full-vocabulary logits (tinytron/model/gpt.py) against the plain head +
F.cross_entropy: the loss and the gradients of the hidden states, the head and every parameter.

Tolerance 1e-6 relative to the largest element (fp32): both sides compute the same fp32 math and
differ only in summation order (the head's weight gradient summed chunk by chunk, the log-sum-exp
in another association), measured below 3e-7; a wrong gradient (an ignored token counted, a chunk
lost or counted twice) gives errors of order 1e-2 or more.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.dist_helper import run_distributed
from tests.utils import TINY_MODEL, max_rel, tiny_config
from tinytron.model import GPT
from tinytron.model.document_mask import document_layout
from tinytron.model.gpt import CHUNK_TOKENS, IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy_sum
from tinytron.training import Trainer

TOL = 1e-6


def _targets(B: int, T: int, V: int) -> torch.Tensor:
    """Random targets with ignored ones: scattered, and a whole chunk's worth in a row."""
    targets = torch.randint(0, V, (B, T))
    targets[torch.rand(B, T) < 0.2] = IGNORE_INDEX
    targets[1, 3:20] = IGNORE_INDEX
    return targets


def test_linear_cross_entropy_equals_plain():
    """Chunks of 7 tokens over 3 x 20 (the last chunk partial, one chunk wholly ignored) and one
    chunk holding everything."""
    torch.manual_seed(0)
    B, T, C, V = 3, 20, 16, 97
    targets = _targets(B, T, V)
    hidden = torch.randn(B, T, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    ref = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    ref_grads = torch.autograd.grad(2.5 * ref, (hidden, weight))   # a scaled loss, as under grad accumulation
    for chunk in (7, B * T):
        loss = linear_cross_entropy_sum(hidden, weight, targets, chunk)
        grads = torch.autograd.grad(2.5 * loss, (hidden, weight))
        assert loss.dtype == torch.float32 and max_rel(loss, ref) < TOL, chunk
        for name, g, r in zip(("hidden", "weight"), grads, ref_grads):
            assert max_rel(g, r) < TOL, (chunk, name, max_rel(g, r))


def test_linear_cross_entropy_at_every_chunk_remainder():
    """Chunk sizes c = 7 and 5 over N = 1 .. 2c + 2 tokens: every remainder of N modulo c (0: the
    last chunk full, 1: a one-token last chunk, ..., c - 1), after 0, 1 and 2 full chunks, so most
    counts are not multiples of c. The loss and both gradients equal the plain head +
    F.cross_entropy in fp32 (the last token's target ignored at odd N).
    Checked against a planted bug: the loop stopping one chunk early when N % c == 1 (the last
    one-token chunk dropped: 8 tokens at chunk 7 lose a token's loss and backward fails on the
    gradient's shape)."""
    torch.manual_seed(0)
    C, V = 8, 29
    weight = torch.randn(V, C, requires_grad=True)
    for chunk in (7, 5):
        for n in range(1, 2 * chunk + 3):   # remainders 0..c-1, with 0, 1 and 2 full chunks before
            hidden = torch.randn(1, n, C, requires_grad=True)
            targets = torch.randint(0, V, (1, n))
            if n % 2:
                targets[0, -1] = IGNORE_INDEX
            ref = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten(),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            ref_grads = torch.autograd.grad(ref, (hidden, weight))
            loss = linear_cross_entropy_sum(hidden, weight, targets, chunk)
            assert max_rel(loss, ref) < TOL, (chunk, n, loss, ref)
            grads = torch.autograd.grad(loss, (hidden, weight))
            for name, g, r in zip(("hidden", "weight"), grads, ref_grads):
                assert max_rel(g, r) < TOL, (chunk, n, name, max_rel(g, r))


class _CastCounts(TorchDispatchMode):
    """{name: dtype casts (aten._to_copy) of that tensor} over the ops run under it, forward and
    backward."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {id(t): n for n, t in tensors.items()}
        self.counts = dict.fromkeys(tensors, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.names:
            self.counts[self.names[id(args[0])]] += 1
        return func(*args, **(kwargs or {}))


def test_head_weight_cast_once_per_micro_batch():
    """Under the Trainer's bf16 autocast (no cast cache), a training forward + backward with the
    targets casts the head weight (tied: the embedding) to bf16 once, not once per loss chunk
    (3 chunks here); every other matrix once too."""
    torch.manual_seed(0)
    T = 2 * CHUNK_TOKENS + 1
    model = GPT(dataclasses.replace(TINY_MODEL, block_size=T, num_layer=1)).train()
    idx = torch.randint(0, TINY_MODEL.vocab_size, (1, T + 1))
    casts = _CastCounts({n: p for n, p in model.named_parameters() if p.dim() == 2})
    with casts:
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            out = model(idx[:, :-1], targets=idx[:, 1:], return_aux=True)
        out.loss_sum.backward()
    assert casts.counts == dict.fromkeys(casts.counts, 1)


def _grads(model: GPT) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_model_training_loss_equals_full_logits():
    """GPT in training mode: the chunked loss (targets given) against the full logits of the same
    forward, with ignored targets and a document mask, head tied and untied."""
    torch.manual_seed(0)
    idx = torch.randint(0, TINY_MODEL.vocab_size, (2, 32))
    targets = _targets(2, 32, TINY_MODEL.vocab_size)
    mask, positions = document_layout(idx, int(idx[0, 5]), torch.arange(32)[None], True, False)
    for tied in (False, True):
        torch.manual_seed(1)
        model = GPT(dataclasses.replace(TINY_MODEL, tied_lm_head=tied)).train()
        out = model(idx, position_ids=positions, return_aux=True, document_mask=mask)
        assert out.loss_sum is None
        ref = cross_entropy_sum(out.logits, targets)
        ref.backward()
        ref_grads = _grads(model)
        out = model(idx, targets=targets, position_ids=positions, return_aux=True, document_mask=mask)
        assert out.logits is None   # never materialised in training
        out.loss_sum.backward()
        assert max_rel(out.loss_sum, ref) < TOL
        for name, g in _grads(model).items():
            assert max_rel(g, ref_grads[name]) < TOL, (tied, name, max_rel(g, ref_grads[name]))


def _trainer_micro_step_both_ways(log_dir):
    """One micro-batch of the Trainer at sep 2 with the document mask: its loss (each rank's chunk
    divided by the token count of the FULL sequences) and local grads, through `_forward_loss`
    (chunked) and through full logits with the same normalisation."""
    trainer = Trainer(tiny_config(log_dir, "--sep_size", "2", "--document_mask", "--eos_token_id", "3",
                                  "--reset_position_ids", "--no-do_save", "--no-do_val"))
    batch = torch.stack([trainer.train_dataset[i] for i in range(trainer.config.training.batch_size)])
    model = trainer.model.train()
    lm, aux, _ = trainer._forward_loss(batch)
    (lm + aux).backward()
    chunked = (lm.detach(), _grads(model))
    inputs, targets, positions, mask, count = trainer._split_batch(batch)
    out = model(inputs, position_ids=positions, return_aux=True, document_mask=mask)
    lm = cross_entropy_sum(out.logits, targets) / count
    (lm + out.aux_loss).backward()
    return chunked, (lm.detach(), _grads(model))


def test_trainer_sep2_loss_equals_full_logits(tmp_path):
    for (loss, grads), (ref, ref_grads) in run_distributed(_trainer_micro_step_both_ways, 2, str(tmp_path)):
        assert max_rel(loss, ref) < TOL
        for name, g in grads.items():
            assert max_rel(g, ref_grads[name]) < TOL, (name, max_rel(g, ref_grads[name]))

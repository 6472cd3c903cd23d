"""Ulysses sequence parallelism against a single-process reference (gloo, CPU, fp32).

Each SEP rank runs its chunk `sep_rank` of the same sequences with global position ids; the
logits gathered over the group and the parameter gradients summed over it must equal those of
the unsharded model. Tolerance: rtol 1e-5 with atol 1e-5 * max|reference| per tensor. Both sides
compute the same fp32 math; Ulysses only moves data, so the differences are summation order
(matmuls of different shapes, the grad all-reduce, the loss split into per-chunk sums), i.e. a
few ulp of fp32 (~1e-7) amplified through two layers; a wrong head, chunk or position gives
errors of order 1.
"""

import pytest
import torch
import torch.distributed as dist

from tests.dist_helper import run_distributed
from tinytron.distributed.parallel_state import get_sep_group, get_sep_rank, get_sep_size, initialize_parallel_state
from tinytron.distributed.sequence_parallel import UlyssesAttention, apply_sequence_parallel, sequence_chunk
from tinytron.distributed.sequence_parallel.ulysses import all_to_all, kv_heads_to_send
from tinytron.model import GPT, ModelConfig
from tinytron.model.gpt import IGNORE_INDEX, CausalAttention, cross_entropy_loss, cross_entropy_sum

B, T, VOCAB = 2, 16, 96

# (num_attention_heads, num_key_value_heads) per sep size: MHA, GQA with kv % sep == 0, and GQA
# with sep % kv == 0 (kv heads replicated before the all-to-all).
CASES = {
    2: [(4, 4), (8, 4), (4, 1)],
    4: [(4, 4), (8, 4), (4, 1), (8, 2)],
}


def _build_model(heads: int, kv_heads: int) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(block_size=T, vocab_size=VOCAB, num_layer=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, hidden_size=64, intermediate_size=128,
                         dropout=0.0)
    return GPT(config)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same [B, T] tokens and targets on every rank; a few ignored targets in several chunks."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(VOCAB, (B, T), generator=g)
    targets = torch.randint(VOCAB, (B, T), generator=g)
    targets[0, 1] = targets[1, T // 2 + 1] = targets[1, T - 1] = IGNORE_INDEX
    return idx, targets


# All-to-all check: per-rank input [B, T/sep, H, D] and upstream gradient [B, T, H/sep, D], built
# from seeds so that every process (and the test) can rebuild any rank's tensors.
A2A_B, A2A_TL, A2A_HEADS_PER_RANK, A2A_D = 2, 3, 2, 5


def _a2a_input(rank: int, sep: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(A2A_B, A2A_TL, A2A_HEADS_PER_RANK * sep, A2A_D, generator=g)


def _a2a_upstream(rank: int, sep: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + rank)
    return torch.randn(A2A_B, A2A_TL * sep, A2A_HEADS_PER_RANK, A2A_D, generator=g)


def _sep_worker(sep: int) -> dict:
    initialize_parallel_state(sep_size=sep)
    group, rank = get_sep_group(), get_sep_rank()
    assert get_sep_size() == sep == dist.get_world_size()
    out = {"models": []}

    # All-to-all: sequence-sharded -> head-sharded, round trip, and backward of (y * g).sum().
    x = _a2a_input(rank, sep).requires_grad_()
    y = all_to_all(x, group, scatter_dim=2, gather_dim=1)
    z = all_to_all(y, group, scatter_dim=1, gather_dim=2)
    (y * _a2a_upstream(rank, sep)).sum().backward()
    out["a2a"] = (y.detach(), z.detach(), x.grad)

    # A head count that does not split over the group fails cleanly, before any collective.
    if sep == 4:
        q = torch.zeros(1, 2, 6, 4)
        kv = torch.zeros(1, 2, 2, 4)
        try:
            UlyssesAttention(CausalAttention(), group)(q, kv, kv)
        except ValueError as e:
            out["heads_error"] = str(e)

    idx, targets = _batch()
    num_valid = (targets != IGNORE_INDEX).sum()
    idx, targets, position_ids = sequence_chunk(idx, targets, rank, sep)
    for heads, kv_heads in CASES[sep]:
        model = _build_model(heads, kv_heads)
        apply_sequence_parallel(model, group)
        logits = model(idx, position_ids=position_ids)          # [B, T/sep, V]
        loss = cross_entropy_sum(logits, targets) / num_valid
        loss.backward()
        pieces = [torch.empty_like(logits) for _ in range(sep)]
        dist.all_gather(pieces, logits.detach().contiguous(), group=group)
        total_loss = loss.detach().clone()
        dist.all_reduce(total_loss, group=group)
        grads = {}
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad, group=group)
            grads[name] = p.grad
        out["models"].append((torch.cat(pieces, dim=1), total_loss, grads))
    return out


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("sep", [2, 4])
def test_ulysses_matches_single_process(sep):
    results = run_distributed(_sep_worker, sep, sep)

    idx, targets = _batch()
    references = []
    for heads, kv_heads in CASES[sep]:
        model = _build_model(heads, kv_heads)
        logits = model(idx)
        loss = cross_entropy_loss(logits, targets)
        loss.backward()
        references.append((logits.detach(), loss.detach(),
                           {n: p.grad for n, p in model.named_parameters()}))

    hs, tl = A2A_HEADS_PER_RANK, A2A_TL
    for rank, out in enumerate(results):
        # Pure data movement: exact equality.
        y, z, x_grad = out["a2a"]
        expected_y = torch.cat([_a2a_input(j, sep)[:, :, rank * hs:(rank + 1) * hs]
                                for j in range(sep)], dim=1)
        expected_x_grad = torch.cat([_a2a_upstream(j, sep)[:, rank * tl:(rank + 1) * tl]
                                     for j in range(sep)], dim=2)
        assert torch.equal(y, expected_y), "all_to_all forward"
        assert torch.equal(z, _a2a_input(rank, sep)), "all_to_all round trip"
        assert torch.equal(x_grad, expected_x_grad), "all_to_all backward"
        if sep == 4:
            msg = out["heads_error"]
            assert "--num_attention_heads 6" in msg and "--sep_size 4" in msg and "\n" not in msg

        for (heads, kv_heads), (logits, loss, grads), (ref_logits, ref_loss, ref_grads) in zip(
                CASES[sep], out["models"], references):
            case = f"sep {sep} rank {rank} heads {heads} kv {kv_heads}"
            _assert_close(logits, ref_logits, f"{case} logits")
            _assert_close(loss, ref_loss, f"{case} loss")
            assert grads.keys() == ref_grads.keys()
            for name, grad in grads.items():
                _assert_close(grad, ref_grads[name], f"{case} grad {name}")


def test_kv_heads_to_send():
    assert kv_heads_to_send(4, 2) == 4   # split as they are
    assert kv_heads_to_send(1, 4) == 4   # replicated, one per rank
    assert kv_heads_to_send(2, 4) == 4
    with pytest.raises(ValueError) as e:
        kv_heads_to_send(3, 2)           # e.g. 6 query heads, 3 kv heads, sep 2
    msg = str(e.value)
    assert "--num_key_value_heads 3" in msg and "--sep_size 2" in msg and "\n" not in msg

"""--document_mask: a window holding several documents computes what each document computes alone.

Reference (independent of the mask): every document cut out of the window and run through the plain
causal model on its own, with its original positions in the window (offset position ids), or with
positions from 0 under --reset_position_ids. The EOS closes its document. The window's logits must
equal the documents' logits, and the gradient of the window's summed loss the sum of the documents'
(the loss is a sum over tokens, so it splits by document), for both engines (SDPA's boolean mask;
flex_attention's block mask, here torch's eager CPU implementation of it, forward only: torch has no
flex backward on CPU, which test_flex_backward_equals_documents_alone checks on CUDA), in one process and under
Ulysses at sep 2 and 4 (gloo), MHA and GQA. Tolerance 1e-5 relative to the largest element (fp32):
the two sides differ only in summation order (softmax over masked-out keys, matmuls of other shapes,
the SEP all-reduce of the gradients), measured below 1e-6; a token seeing another document or a wrong
position gives errors of order 1e-1.

Trainer: the same run with the mask at sep 1 and sep 2 (one of them with full recomputation) gives
the same losses, grad norms and validation losses (measured: 2e-7 relative at most; 1e-5, as
tests/test_parallel_training.py), and the mask changes them by 3e-2 (it is applied); off by default
and then the step is bitwise the plain causal model's. The position ids the model receives from the
Trainer are observed at its input (the losses cannot tell them apart: RoPE sees relative positions).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.dist_helper import run_distributed
from tests.document_windows import DOCS, EOS, VOCAB, T, build_model, documents_alone, sep_checks, window, window_run
from tests.test_parallel_training import RecordingTrainer
from tests.utils import max_rel, tiny_config
from tinytron.data.mock import MockDataset
from tinytron.distributed.sequence_parallel import sequence_chunk
from tinytron.model.document_mask import document_attention, document_layout
from tinytron.model.gpt import cross_entropy_sum
from tinytron.training import Trainer
from tinytron.training.config import ConfigError, validate_config


def _assert_same(actual, expected, what: str) -> None:
    logits, grads = actual
    ref_logits, ref_grads = expected
    assert max_rel(logits, ref_logits) < 1e-5, f"{what} logits: {max_rel(logits, ref_logits):.2e}"
    for name, grad in ref_grads.items() if grads is not None else ():
        assert max_rel(grads[name], grad) < 1e-5, f"{what} grad {name}: {max_rel(grads[name], grad):.2e}"


HEADS = [(4, 4), (8, 4), (4, 1)]   # MHA, GQA, MQA
CASES = [(h, kv, reset, flex) for h, kv in HEADS for reset in (False, True) for flex in (False, True)]


def test_window_equals_documents_alone():
    idx, targets = window()
    for heads, kv_heads, reset, flex in CASES:
        out = window_run(build_model(heads, kv_heads), idx, targets, reset, flex)
        _assert_same(out, documents_alone(heads, kv_heads, reset), f"heads {heads}/{kv_heads} reset {reset} "
                     f"flex {flex}")


def test_positions_restart_at_each_document():
    """The position ids each SEP rank gets: its chunk of [0..n-1 for each document] with
    --reset_position_ids, its global positions without."""
    idx, _ = window()
    per_document = torch.tensor([[p for n in lengths for p in range(n)] for lengths in DOCS])
    for sep in (1, 2, 4):
        for rank in range(sep):
            chunk = slice(rank * T // sep, (rank + 1) * T // sep)
            _, _, global_positions = sequence_chunk(idx, idx, rank, sep)
            _, reset = document_layout(idx, EOS, global_positions, True, False)
            _, kept = document_layout(idx, EOS, global_positions, False, False)
            assert torch.equal(reset, per_document[:, chunk]) and torch.equal(kept, torch.arange(T)[None, chunk])


# Under Ulysses: GQA with the kv heads split over the group, and one kv head replicated to every
# rank; both position modes; both engines at sep 2 (the mask object only passes through the
# all-to-alls, so sep 4 checks SDPA's, sparing four processes the flex_attention start-up).
SEP_CASES = {2: [(8, 4, False, False), (4, 1, True, False), (8, 4, True, True), (4, 1, False, True)],
             4: [(8, 4, False, False), (4, 1, True, False)]}


def _assert_ulysses(results: list, sep: int) -> None:
    for i, (heads, kv_heads, reset, flex) in enumerate(SEP_CASES[sep]):
        expected = documents_alone(heads, kv_heads, reset)
        for rank, out in enumerate(results):
            _assert_same(out[i], expected, f"sep {sep} rank {rank} heads {heads}/{kv_heads} reset {reset} flex {flex}")


# flex_attention's backward: windows of 256 tokens (two of flex's 128-token blocks) of documents
# crossing the block boundary, ending on it, one token long, and one document filling the window.
FLEX_DOCS = [(100, 1, 60, 95), (128, 128), (256,)]
FLEX_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.xfail(
        raises=NotImplementedError, strict=True,
        reason="torch's flex_attention has no backward on CPU (the Trainer uses SDPA's mask there); strict: "
               "a torch that adds one makes this case run")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs CUDA")]),
]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("device", FLEX_DEVICES)
def test_flex_backward_equals_documents_alone(device, heads, kv_heads):
    """flex_attention with the document block mask (the path the Trainer takes on CUDA: the copy
    compiled once per process): the gradients of q, k and v of a packed window equal those of each
    document run alone through SDPA's causal attention (independent of the mask), for any upstream
    gradient. fp32; 1e-5 relative to the largest element, as the forward checks: the two sides
    differ only in summation order (blockwise online softmax vs SDPA's), measured on an H200 (torch
    2.11) at most 1.2e-6; a mask of one document per window gives 0.66-0.95."""
    g = torch.Generator().manual_seed(0)
    B, T, D = len(FLEX_DOCS), sum(FLEX_DOCS[0]), 16
    tokens = torch.randint(1, VOCAB, (B, T), generator=g)
    for row, lengths in enumerate(FLEX_DOCS):
        tokens[row, np.cumsum(lengths)[:-1] - 1] = EOS
    q, k, v, up = (torch.randn(B, h, T, D, generator=g).to(device) for h in (heads, kv_heads, kv_heads, heads))
    mask, _ = document_layout(tokens.to(device), EOS, torch.arange(T, device=device)[None], False, True)
    window = [t.clone().requires_grad_() for t in (q, k, v)]
    (document_attention(*window, mask) * up).sum().backward()
    alone = [t.clone().requires_grad_() for t in (q, k, v)]
    for row, lengths in enumerate(FLEX_DOCS):
        for start, end in zip(np.cumsum((0, *lengths[:-1])), np.cumsum(lengths)):
            doc = [t[row:row + 1, :, start:end] for t in alone]
            out = F.scaled_dot_product_attention(*doc, is_causal=True, enable_gqa=heads != kv_heads)
            (out * up[row:row + 1, :, start:end]).sum().backward()
    for name, got, want in zip("qkv", window, alone):
        assert max_rel(got.grad, want.grad) < 1e-5, f"d{name}: {max_rel(got.grad, want.grad):.2e}"


class PackedDocuments(MockDataset):
    """Mock sequences with an EOS (id 0) at 20% of the tokens: several documents per window."""
    eos_token_id = EOS

    def __getitem__(self, i: int) -> torch.Tensor:
        tokens = super().__getitem__(i)
        ends = np.random.default_rng([self.seed, self.split_id, i, 7]).random(len(tokens)) < 0.2
        return tokens.masked_fill(torch.from_numpy(ends), EOS)


class DocumentsTrainer(RecordingTrainer):
    """Also records, for every forward, the full sequences of the micro-batch (before the SEP split)
    and the position ids the model receives: `self.positions`, [(inputs [b, T], position ids)]."""

    def _init_dataset(self):
        n, t, v, s = 256, self.config.training.seq_len, self.config.model.vocab_size, self.config.training.seed
        return PackedDocuments(n, t, v, s, "train"), PackedDocuments(32, t, v, s, "val")

    def _init_model(self):
        self.positions = []
        model = super()._init_model()
        model.register_forward_pre_hook(self._record_positions, with_kwargs=True)
        return model

    def _split_batch(self, batch):
        self._full_inputs = batch[:, :-1].cpu()
        return super()._split_batch(batch)

    def _record_positions(self, module, args, kwargs):
        self.positions.append((self._full_inputs, kwargs["position_ids"].cpu()))


TRAIN = ["--no-use_mock_data", "--max_steps", "6", "--no-do_save", "--val_every_steps", "3",
         "--total_batch_size", "256"]
# name -> (flags, the sep-2 run's layout flags: full recomputation re-runs the blocks with the mask)
MASKED = {"mask": (["--document_mask"], ["--activation_checkpointing", "full"]),
          "mask reset": (["--document_mask", "--reset_position_ids"], [])}


def _train(log_dir, *flags):
    """-> (history, val_history, [(full inputs, position ids the model got)] of every forward)."""
    trainer = DocumentsTrainer(tiny_config(log_dir, *TRAIN, *flags))
    trainer.history, trainer.val_history = [], []
    trainer.train()
    return np.array(trainer.history), np.array(trainer.val_history), trainer.positions


def _world2_job(log_dir: str) -> dict:
    """One spawned world of 2 for both sep-2 tests (spawning costs more than the checks)."""
    checks = sep_checks(2, SEP_CASES[2])
    return {"model": checks, "train": {name: _train(f"{log_dir}/{name}", "--sep_size", "2", *flags, *layout)
                                      for name, (flags, layout) in MASKED.items()}}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_distributed(_world2_job, 2, str(tmp_path_factory.mktemp("sep2")))


def test_window_equals_documents_alone_at_sep2(world2):
    _assert_ulysses([out["model"] for out in world2], 2)


def test_window_equals_documents_alone_at_sep4():
    _assert_ulysses(run_distributed(sep_checks, 4, 4, SEP_CASES[4]), 4)


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    """The sep-1 runs: without the mask ("plain") and every MASKED one."""
    base = tmp_path_factory.mktemp("sep1")
    return {name: _train(base / name, *flags) for name, (flags, _) in {"plain": ([], []), **MASKED}.items()}


def test_training_with_the_mask_matches_across_sep(world2, world1):
    sep2 = world2[0]["train"]
    plain = world1["plain"][0]
    for name in MASKED:
        (ref, ref_val, _), (got, got_val, _) = world1[name], sep2[name]
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(got_val, ref_val, rtol=1e-5, err_msg=name)
        assert np.abs(ref[1:, 0] - plain[1:, 0]).max() > 1e-3, f"{name}: the mask changed nothing"


def expected_positions(inputs: torch.Tensor, reset: bool) -> torch.Tensor:
    """[b, T] full sequences -> [b, T] the position of every token: its index in the window, or
    with `reset` its index in its document (0 at the window start and after each EOS)."""
    out = torch.empty_like(inputs)
    for row in range(inputs.shape[0]):
        p = 0
        for t in range(inputs.shape[1]):
            out[row, t] = p if reset else t
            p = 0 if inputs[row, t] == EOS else p + 1
    return out


def test_trainer_gives_the_model_document_positions(world1, world2):
    """The position ids the model receives in every forward of the Trainer's runs (training and
    validation) with --document_mask, observed at the model's input (RoPE depends only on
    relative positions, so losses cannot tell): each rank's chunk of the positions within each
    document under --reset_position_ids, of the window positions without; at sep 1 and sep 2.
    Exact (integers)."""
    runs = [(world1, 0, 1)] + [(out["train"], rank, 2) for rank, out in enumerate(world2)]
    for name, (flags, _) in MASKED.items():
        reset = "--reset_position_ids" in flags
        restarted = False
        for by_name, rank, sep in runs:
            records = by_name[name][2]
            assert len(records) > 6, name   # every micro-batch of 6 steps, and validation
            for inputs, positions in records:
                chunk = slice(rank * T // sep, (rank + 1) * T // sep)
                want = expected_positions(inputs, reset)[:, chunk]
                assert torch.equal(positions.expand_as(want), want), (name, sep, rank, positions, want)
                restarted |= not torch.equal(want, expected_positions(inputs, False)[:, chunk])
        assert restarted == reset, name   # some chunk starts a document after its first token


def test_off_by_default_and_bitwise_unchanged(tmp_path):
    """Default flags: no mask, and a micro-batch holding EOS tokens gives bitwise the loss of the
    plain causal model called as before the feature (no mask argument)."""
    trainer = DocumentsTrainer(tiny_config(tmp_path, *TRAIN))
    assert trainer.document_layout is None
    batch = torch.stack([trainer.train_dataset[i] for i in range(2)])
    assert (batch == EOS).any()
    lm, _, _ = trainer._forward_loss(batch)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = trainer.model(inputs, targets=targets, position_ids=torch.arange(T)[None], return_aux=True)
    assert torch.equal(lm, out.loss_sum / targets.numel())


@pytest.mark.parametrize("reset", [False, True])
def test_trainer_loss_equals_documents_alone(tmp_path, reset):
    """The Trainer's own wiring (which tokens the mask is built from, the EOS id, the positions):
    its micro-batch loss with --document_mask equals the plain model's loss over each document of
    the inputs cut out and run alone (split after each EOS; offset positions, or from 0 with
    --reset_position_ids), summed and divided by the token count. 1e-5 relative (fp32)."""
    flags = ["--document_mask", *(["--reset_position_ids"] if reset else [])]
    trainer = DocumentsTrainer(tiny_config(tmp_path, *TRAIN, *flags))
    batch = torch.stack([trainer.train_dataset[i] for i in range(2)])
    inputs, targets = batch[:, :-1], batch[:, 1:]
    assert ((inputs == EOS).sum(1) >= 2).all()  # every row holds several documents
    with torch.no_grad():
        lm, _, _ = trainer._forward_loss(batch)
        total = torch.zeros(())
        for row in range(len(inputs)):
            ends = [i + 1 for i in (inputs[row] == EOS).nonzero().flatten().tolist()]
            for start, end in zip([0, *ends], [*ends, T]):
                if start == end:
                    continue
                positions = torch.arange(end - start)[None] if reset else torch.arange(start, end)[None]
                logits = trainer.model(inputs[row:row + 1, start:end], position_ids=positions)
                total += cross_entropy_sum(logits, targets[row:row + 1, start:end])
    assert abs(lm - total / targets.numel()) <= 1e-5 * abs(lm), (lm, total / targets.numel())


@pytest.mark.parametrize("flags, message", [
    (["--reset_position_ids"], "--reset_position_ids needs --document_mask"),
    (["--eos_token_id", "3"], "--eos_token_id needs --document_mask"),
    (["--document_mask"], "--document_mask with --use_mock_data needs --eos_token_id"),
    (["--document_mask", "--eos_token_id", "64"], "--eos_token_id 64 must be -1 (the token cache's) or in [0, "
                                                  "--vocab_size 64)"),
])
def test_bad_flags(tmp_path, flags, message):
    with pytest.raises(ConfigError) as e:
        validate_config(tiny_config(tmp_path, *flags), 1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_eos_must_come_from_the_dataset_or_agree_with_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        DocumentsTrainer(tiny_config(tmp_path, *TRAIN, "--document_mask", "--eos_token_id", "3"))
    assert str(e.value) == "--eos_token_id 3 differs from the dataset's EOS id [0]"
    with pytest.raises(ConfigError) as e:
        NoEosTrainer(tiny_config(tmp_path, *TRAIN, "--document_mask"))
    assert str(e.value) == "--document_mask: the training dataset has no eos_token_id; pass --eos_token_id"


class NoEosTrainer(Trainer):
    def _init_dataset(self):
        return MockDataset(256, 16, 64, 0), MockDataset(32, 16, 64, 0, "val")

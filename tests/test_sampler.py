"""Data order at any scale: the Feistel permutation, blended corpora, and the bounded validation set."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_helper import run_distributed, run_script
from tests.utils import read_log, tiny_config
from tinytron.data.blend import Blend, floor_sum
from tinytron.data.mock import MockDataset
from tinytron.data.sampler import GlobalBatchSampler, epoch_permutation, validation_indices

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 15, 16, 17, 63, 64, 65, 100, 1000, 4097])
def test_epoch_order_is_a_permutation(n):
    for seed, epoch in [(0, 0), (1, 0), (0, 7)]:
        order = epoch_permutation(n, seed, epoch)(np.arange(n))
        assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))


def test_orders_differ_by_seed_and_epoch_and_cover_the_epoch():
    orders = {key: epoch_permutation(1000, *key)(np.arange(1000)).tolist() for key in [(0, 0), (1, 0), (0, 1)]}
    assert len({tuple(o) for o in orders.values()}) == 3 and orders[0, 0] != list(range(1000))
    # Through the sampler: the steps of one epoch (N = 10 G) take every index exactly once, and
    # a step's indices are those of the stateless permutation at its positions.
    sampler = GlobalBatchSampler(1000, 100, 10, 0, 1, seed=3)
    steps = [sampler.indices_of_step(s) for s in range(10)]
    assert np.array_equal(np.sort(np.concatenate(steps)), np.arange(1000))
    assert steps[4].tolist() == epoch_permutation(1000, 3, 0)(np.arange(400, 500)).tolist()
    assert not np.array_equal(sampler.indices_of_step(10), steps[0])  # epoch 1: a new order


def test_floor_sum():
    rng = np.random.default_rng(0)
    for n, m, a, b in rng.integers([0, 1, -50, -50], [40, 30, 50, 50], size=(500, 4)).tolist():
        assert floor_sum(n, m, a, b) == sum((a * i + b) // m for i in range(n))


@pytest.mark.parametrize("weights,global_batch", [([0.7, 0.3], 10), ([0.7, 0.2, 0.1], 24),
                                                  ([5, 3, 1, 1], 7), ([1, 1, 1], 1)])
def test_blend_proportions(weights, global_batch):
    """Every global batch holds floor or ceil of w_c * G sequences of corpus c (within one), the
    counts sum to G, and the running count stays within 3 sequences of w_c * G * steps."""
    blend = Blend([1000] * len(weights), weights)
    share = np.array(blend.weights) / 2**32
    np.testing.assert_allclose(share, np.array(weights) / sum(weights), atol=1e-9)
    consumed = np.zeros(len(weights), dtype=np.int64)
    for step in range(3000):
        assert blend.consumed_before(step, global_batch) == consumed.tolist()
        counts = np.array(blend.counts_of_step(step, global_batch))
        assert counts.sum() == global_batch
        assert np.all(np.abs(counts - share * global_batch) < 1)
        consumed += counts
        assert np.all(np.abs(consumed - share * global_batch * (step + 1)) < 3)
    # Far steps in O(1): the closed form agrees with the counts around step 10^12.
    far = 10**12
    assert (np.array(blend.consumed_before(far + 1, global_batch)) - blend.consumed_before(far, global_batch)
            ).tolist() == blend.counts_of_step(far, global_batch)


def test_blend_walks_each_corpus_without_repetition():
    """A corpus' k-th sequence is its own epoch k // N_c's permutation at k % N_c: after any number
    of steps every index of corpus c has been read q or q + 1 times (q = full epochs)."""
    sizes, global_batch = [50, 13, 7], 8
    blend = Blend(sizes, [0.5, 0.3, 0.2])
    seen = [np.zeros(n, dtype=np.int64) for n in sizes]
    offsets = np.cumsum([0] + sizes)
    for step in range(60):
        idx = blend.indices_of_step(step, global_batch, seed=5)
        assert len(idx) == global_batch
        corpus = np.searchsorted(offsets, idx, side="right") - 1
        assert np.bincount(corpus, minlength=3).tolist() == blend.counts_of_step(step, global_batch)
        for c, n in enumerate(sizes):
            np.add.at(seen[c], idx[corpus == c] - offsets[c], 1)
            consumed = blend.consumed_before(step + 1, global_batch)[c]
            assert seen[c].sum() == consumed and seen[c].max() - seen[c].min() <= 1
            assert seen[c].min() == consumed // n


def test_blend_is_layout_invariant():
    """The sequences of each global batch are the same at dp 1 and 2, with any micro-batch."""
    blend = Blend([40, 30], [0.6, 0.4])

    def batches(dp_size, micro):
        iters = [iter(GlobalBatchSampler(70, 8, micro, r, dp_size, seed=1, start_step=3, blend=blend))
                 for r in range(dp_size)]
        return [sorted(i for it in iters for _ in range(8 // (micro * dp_size)) for i in next(it))
                for _ in range(20)]
    reference = batches(1, 8)
    assert batches(1, 2) == reference and batches(2, 1) == reference and batches(2, 4) == reference
    assert reference[0] == sorted(blend.indices_of_step(3, 8, seed=1).tolist())


def test_bad_blend_and_cap_flags():
    from tinytron.data.blend import parse_list, parse_weights
    from tinytron.training.config import ConfigError, validate_config
    with pytest.raises(ValueError, match="--dataset_weights has 3 values for 2 corpora"):
        parse_weights("1,2,3", 2)
    with pytest.raises(ValueError, match="every weight must be a positive number"):
        parse_weights("1,0", 2)
    with pytest.raises(ValueError, match="--text_column has 2 comma-separated values for 3 corpora"):
        parse_list("a,b", 3, "text_column")
    assert parse_weights("", 3) == [1.0] * 3 and parse_list("text", 2, "text_column") == ["text", "text"]
    with pytest.raises(ConfigError, match="--val_max_tokens 8 must be 0 .no cap. or at least --seq_len 16"):
        validate_config(tiny_config("unused", "--val_max_tokens", "8"), 1)


def test_validation_subset():
    assert validation_indices(10, 0).tolist() == list(range(10))
    assert validation_indices(10, 10).tolist() == list(range(10))
    assert validation_indices(10, 4).tolist() == [0, 2, 5, 7]
    idx = validation_indices(10**12, 1000)
    assert len(np.unique(idx)) == 1000 and idx[-1] > 0.99e12


# ------------------------------------------------------------------ bounded validation parity

_CAP = ["--val_max_tokens", "160"]  # 10 of the 25 mock validation sequences of 16 tokens


def _val_loss(log_dir, flags):
    from tinytron.training import Trainer
    return Trainer(tiny_config(log_dir, "--no-do_save", *_CAP, *flags)).evaluate()


def test_capped_validation_matches_reference_on_every_layout(tmp_path):
    """With the cap active, dp 1, dp 2 and sep 2 score the same 10 sequences and agree with a
    plain single-process fp32 loop over exactly those sequences (1e-5: summation order only)."""
    from tinytron.model import GPT
    from tinytron.model.gpt import cross_entropy_sum
    cfg = tiny_config(tmp_path, *_CAP)
    t = cfg.training
    torch.manual_seed(t.seed)
    model = GPT(cfg.model).eval()
    val = MockDataset(cfg.data.mock_data_num_samples // 10, t.seq_len, cfg.model.vocab_size, t.seed, "val")
    subset = validation_indices(len(val), t.val_max_tokens // t.seq_len)
    assert len(subset) == 10 < len(val)
    with torch.no_grad():
        def mean_loss(indices):
            batch = torch.stack([val[int(i)] for i in indices])
            return (cross_entropy_sum(model(batch[:, :-1]), batch[:, 1:]) / batch[:, 1:].numel()).item()
        reference, whole = mean_loss(subset), mean_loss(range(len(val)))
    assert abs(reference - whole) > 1e-4  # the cap changes what is scored: the test can fail
    got = {"dp1": _val_loss(tmp_path / "dp1", [])}
    got["dp2"], got_rank1 = run_distributed(_val_loss, 2, str(tmp_path / "dp2"), [])
    got["sep2"], _ = run_distributed(_val_loss, 2, str(tmp_path / "sep2"), ["--sep_size", "2"])
    assert got["dp2"] == got_rank1
    for layout, value in got.items():
        assert value == pytest.approx(reference, rel=1e-5), layout


# ------------------------------------------------------------------ end to end

def test_pretrain_example_blends_two_corpora(tmp_path):
    """pretrain_example.py on two halves of Tiny Shakespeare, weights 0.75 / 0.25: trains, and
    both corpora are tokenized into the cache. Bad weights: one line, exit 2."""
    text = (SHAKESPEARE / "input.txt").read_text()[:200_000]
    (tmp_path / "a.txt").write_text(text[:100_000])
    (tmp_path / "b.txt").write_text(text[100_000:])
    flags = ["--dataset", f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", "--dataset_weights", "0.75,0.25",
             "--tokenizer", str(SHAKESPEARE / "tokenizer"), "--data_cache_dir", str(tmp_path / "cache"),
             "--val_fraction", "0.05", "--device", "cpu", "--precision", "fp32", "--num_workers", "2",
             "--num_layer", "2", "--hidden_size", "64", "--num_attention_heads", "4", "--num_key_value_heads", "2",
             "--intermediate_size", "128", "--vocab_size", "4096", "--block_size", "64", "--seq_len", "64",
             "--batch_size", "4", "--total_batch_size", "1024", "--max_steps", "4", "--warmup_steps", "1",
             "--val_every_steps", "2", "--val_max_tokens", "1024", "--log_dir", str(tmp_path / "logs"),
             "--tokenize_num_proc", "1", "--no-do_save"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    r = run_script("pretrain_example.py", *flags, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp_path / "logs").iterdir()
    assert sorted(read_log(run_dir)) == [0, 1, 2, 3] and sorted(read_log(run_dir, "val")) == [1, 3]
    assert len(list((tmp_path / "cache").iterdir())) == 2

    bad = run_script("pretrain_example.py", *flags, "--dataset_weights", "0.7,x", cwd=REPO, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == \
        "[tinytron] error: --dataset_weights '0.7,x' must be comma-separated numbers"

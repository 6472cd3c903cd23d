"""Pre-tokenization cache and token windows, against an independent reference: the `tokenizers`
library encoding each document directly (no `datasets`, no `transformers`), EOS appended by hand."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import tinytron.data.tokenize as tokenize_mod
from tests.dist_helper import run_distributed
from tinytron.commands.tokenize import main as tokenize_main
from tinytron.data import TokenWindowDataset, prepare_token_shards, prepare_token_shards_distributed
from tinytron.data.tokenize import INDEX_FILE, TOKENS_FILE, token_dtype

# The dev extra installs it; a stock CUDA image may not (there, `pytest -m cuda` still collects this file).
datasets = pytest.importorskip("datasets")

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare"
CORPUS, TOKENIZER = SHAKESPEARE / "input.txt", SHAKESPEARE / "tokenizer"
EOS = 0  # <|endoftext|> in the Tiny Shakespeare tokenizer


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    # Keep `datasets`' own Arrow cache out of ~/.cache (read at call time by load_dataset).
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf"))


@pytest.fixture(scope="module")
def reference():
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def docs():
    """The first ~50 KB of Tiny Shakespeare as 4 documents cut at blank lines (newlines kept)."""
    text = CORPUS.read_text()[:50_000]
    cuts = [0] + [text.index("\n\n", k * len(text) // 4) + 2 for k in (1, 2, 3)] + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def _write_jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _read_cache(path: Path):
    index = json.loads((path / INDEX_FILE).read_text())
    return index, np.fromfile(path / TOKENS_FILE, dtype=index["dtype"])


def _expected(docs, reference) -> list[int]:
    return [t for d in docs for t in reference(d) + [EOS]]


def test_jsonl_tokens_windows_and_split(tmp_path, docs, reference):
    path = prepare_token_shards(str(_write_jsonl(tmp_path / "c.jsonl", docs)), str(TOKENIZER),
                                tmp_path / "cache", num_proc=2, val_fraction=0.1)
    index, tokens = _read_cache(path)
    expected = _expected(docs, reference)
    assert tokens.dtype == np.uint16 and index["vocab_size"] == 4096 and index["num_documents"] == 4
    assert index["num_tokens"] == len(expected) and tokens.tolist() == expected
    assert index["max_token_id"] == max(expected) and TokenWindowDataset(path, 64).max_token_id == max(expected)

    n, seq_len = len(expected), 64
    boundary = n - round(0.1 * n)
    assert index["splits"] == {"train": [0, boundary], "val": [boundary, n]}
    for split, start, end in (("train", 0, boundary), ("val", boundary, n)):
        ds = TokenWindowDataset(path, seq_len, split)
        assert len(ds) == (end - start - 1) // seq_len and ds.vocab_size == 4096
        for i in range(len(ds)):
            window = ds[i]
            assert window.dtype == torch.int64 and window.shape == (seq_len + 1,)
            lo = start + i * seq_len
            assert window.tolist() == expected[lo:lo + seq_len + 1]
        # Every window lies inside its split, so train and val never share a token.
        assert start + len(ds) * seq_len + 1 <= end
        with pytest.raises(IndexError):
            ds[len(ds)]


def test_txt_is_verbatim_document(tmp_path, docs, reference):
    # A folder of .txt files: one document per file, in sorted file order, same ids as the .jsonl.
    folder = tmp_path / "txt"
    folder.mkdir()
    for k, d in enumerate(docs):
        (folder / f"doc{k}.txt").write_text(d)
    _, tokens = _read_cache(prepare_token_shards(str(folder), str(TOKENIZER), tmp_path / "cache"))
    assert tokens.tolist() == _expected(docs, reference)

    # A single .txt file is one document, newlines and blank lines included (not one per line).
    single = tmp_path / "one.txt"
    single.write_text("".join(docs))
    path = prepare_token_shards(str(single), str(TOKENIZER), tmp_path / "cache")
    index, tokens = _read_cache(path)
    assert index["num_documents"] == 1 and tokens.tolist() == _expected(["".join(docs)], reference)
    assert Tokenizer.from_file(str(TOKENIZER / "tokenizer.json")).decode(tokens[:-1].tolist()) == "".join(docs)


def test_cache_reused_and_keyed(tmp_path, docs, monkeypatch):
    corpus, cache = _write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "cache"
    path = prepare_token_shards(str(corpus), str(TOKENIZER), cache)
    mtime = (path / TOKENS_FILE).stat().st_mtime_ns

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    with monkeypatch.context() as m:
        m.setattr(tokenize_mod, "_load_corpus", forbidden)
        m.setattr(tokenize_mod, "_tokenize_and_write", forbidden)
        # Same file through another relative spelling: still a hit.
        monkeypatch.chdir(tmp_path)
        assert prepare_token_shards("./c.jsonl", str(TOKENIZER), cache) == path
    assert (path / TOKENS_FILE).stat().st_mtime_ns == mtime

    # Anything that changes the bytes or the split gets its own folder.
    other_split = prepare_token_shards(str(corpus), str(TOKENIZER), cache, val_fraction=0.2)
    _write_jsonl(corpus, docs[:2])
    changed = prepare_token_shards(str(corpus), str(TOKENIZER), cache)
    assert len({path, other_split, changed}) == 3 and _read_cache(changed)[0]["num_documents"] == 2
    assert sorted(cache.iterdir()) == sorted([path, other_split, changed])  # no temporary leftovers


def test_crash_leaves_no_cache(tmp_path, docs, monkeypatch):
    corpus, cache = _write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "cache"
    real = tokenize_mod._tokenize_and_write

    def crash(*args, **kwargs):
        real(*args, **kwargs)  # the token file is fully written, the index not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenize_mod, "_tokenize_and_write", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_token_shards(str(corpus), str(TOKENIZER), cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert (prepare_token_shards(str(corpus), str(TOKENIZER), cache) / INDEX_FILE).exists()


def _word_tokenizer(path: Path, vocab_size: int, eos: str | None) -> str:
    """A whitespace word-level tokenizer where word 'w<i>' is id i."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    kwargs = {}
    if eos is not None:
        vocab[eos] = vocab_size - 1
        del vocab[f"w{vocab_size - 1}"]
        kwargs["eos_token"] = eos
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(path)
    return str(path)


def test_dtype_and_missing_eos(tmp_path):
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    corpus = _write_jsonl(tmp_path / "c.jsonl", ["w65535 w65536 w3", "w69998 w0"])
    # 70,000 ids: ids above 65,535 must survive, so the file is uint32.
    big = _word_tokenizer(tmp_path / "big", 70_000, eos="</s>")
    index, tokens = _read_cache(prepare_token_shards(str(corpus), big, tmp_path / "cache"))
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70_000 and index["eos_token_id"] == 69_999
    assert tokens.tolist() == [65535, 65536, 3, 69_999, 69_998, 0, 69_999] and index["max_token_id"] == 69_999

    no_eos = _word_tokenizer(tmp_path / "noeos", 100, eos=None)
    with pytest.raises(ValueError, match="has no EOS token"):
        prepare_token_shards(str(corpus), no_eos, tmp_path / "cache")
    with pytest.raises(ValueError, match="--text_column body"):
        prepare_token_shards(str(corpus), big, tmp_path / "cache", text_column="body")


def test_vocab_check_and_workers(tmp_path, docs):
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", docs))
    with pytest.raises(ValueError, match=r"^--vocab_size 64 is smaller than the tokenizer's vocabulary 4096"):
        prepare_token_shards(corpus, str(TOKENIZER), tmp_path / "cache", vocab_size=64)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # before any tokenizing
    path = prepare_token_shards(corpus, str(TOKENIZER), tmp_path / "cache", vocab_size=4096)
    # A padded model vocabulary is fine (GPT-2's 50257 rounded up to 50304), and the cache is reused.
    assert prepare_token_shards(corpus, str(TOKENIZER), tmp_path / "cache", vocab_size=4224) == path
    ds = TokenWindowDataset(path, 128)
    with pytest.raises(ValueError, match="--seq_len"):
        TokenWindowDataset(path, 10**6, "val")

    ds[0]  # maps the file; pickling (what DataLoader workers receive) must not carry the map
    assert pickle.loads(pickle.dumps(ds))._tokens is None
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), torch.stack([ds[i] for i in range(len(ds))]))


def _prepare_on_rank(corpus: str, cache: str, hf_cache: str):
    datasets.config.HF_DATASETS_CACHE = hf_cache
    calls = []
    real = tokenize_mod._tokenize_and_write
    tokenize_mod._tokenize_and_write = lambda *a, **k: calls.append(1) or real(*a, **k)
    return str(prepare_token_shards_distributed(corpus, str(TOKENIZER), cache)), len(calls)


def test_distributed_tokenizes_once(tmp_path, docs):
    corpus = _write_jsonl(tmp_path / "c.jsonl", docs)
    results = run_distributed(_prepare_on_rank, 2, str(corpus), str(tmp_path / "cache"),
                              str(tmp_path / "hf"))
    # Local rank 0 tokenized; rank 1 waited at the barrier and then hit the finished cache.
    assert [calls for _, calls in results] == [1, 0]
    assert results[0][0] == results[1][0]


def test_full_tiny_shakespeare(tmp_path, reference):
    path = prepare_token_shards(str(CORPUS), str(TOKENIZER), tmp_path / "cache")
    index, tokens = _read_cache(path)
    # The whole file is one document: the tokenizer's 344,104 tokens (data/README.md) + EOS.
    assert index["num_tokens"] == 344_104 + 1 and tokens[-1] == EOS
    assert tokens.tolist() == reference(CORPUS.read_text()) + [EOS]


def test_tokenize_command(tmp_path, docs, capsys):
    """tinytron-tokenize prints the folder prepare_token_shards returns with the same defaults
    (--val_fraction included: the library call is a cache hit) and its token count; a bad path is
    one line, exit 2."""
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", docs[:1]))
    tokenize_main(["--dataset", corpus, "--tokenizer", str(TOKENIZER), "--cache_dir", str(tmp_path / "cache"),
                   "--num_proc", "1"])
    path = prepare_token_shards(corpus, str(TOKENIZER), tmp_path / "cache")
    count = json.loads((path / INDEX_FILE).read_text())["num_tokens"]
    assert capsys.readouterr().out.strip() == f"{path}: {count:,} tokens"
    assert len(list((tmp_path / "cache").iterdir())) == 1
    with pytest.raises(SystemExit) as exit_:
        tokenize_main(["--dataset", str(tmp_path / "nowhere.jsonl"), "--tokenizer", str(TOKENIZER),
                       "--cache_dir", str(tmp_path / "cache")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("[tinytron] error: --dataset")

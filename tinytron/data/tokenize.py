"""Pre-tokenization: a text corpus -> one flat array of token ids on disk, plus a JSON index.

    path = prepare_token_shards("data/tinyshakespeare/input.txt",
                                "data/tinyshakespeare/tokenizer", "data_cache")
    TokenWindowDataset(path, seq_len=256, split="train")   # see token_dataset.py

Layout of the cache folder `<cache_dir>/<name>-<hash>/`:
    tokens.bin   every document's ids followed by one EOS, documents concatenated in corpus order,
                 as a raw uint16 array (uint32 when the vocabulary exceeds 65,536 ids)
    index.json   num_tokens, dtype, vocab_size, max_token_id (the largest id in tokens.bin; caches
                 written before it was recorded lack it), eos_token_id, tokenizer, source, and the split:
                 train = tokens[0:b], val = tokens[b:num_tokens] (the corpus' last `val_fraction`)
The hash covers everything that changes the bytes (source incl. local files' size and mtime,
config, split, text column, tokenizer name and vocabulary, val_fraction), so a second call with the
same arguments finds the folder and returns at once, without loading the corpus. The folder is
built under a temporary name and renamed into place, so a crash never leaves a half-written cache.

What is a document: a row of the dataset (a .jsonl/.parquet line, a hub row), and a whole file for
.txt. The "text" builder's default splits a .txt file into lines and drops the newlines; we load it
with `sample_by="document"` instead, so the text is tokenized verbatim (Tiny Shakespeare keeps its
line breaks and blank lines: 344,104 tokens + 1 EOS, the tokenizer's own count for the file). A .txt
file is read whole into one row, so a large corpus belongs in .jsonl/.parquet files, or a folder of
.txt files (one document each), which `num_proc` processes tokenize in parallel.

Ids come from `tokenizer(text, add_special_tokens=False)`: no BOS; the EOS we append is the only
document separator (the GPT-2 / nanoGPT convention).

Run it once before a multi-node launch (tokenizing a large corpus can outlast the process-group
timeout that `prepare_token_shards_distributed` waits under):
    tinytron-tokenize --dataset ... --tokenizer ... --cache_dir ...     (tinytron/commands/tokenize.py)
"""

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

INDEX_FILE = "index.json"
TOKENS_FILE = "tokens.bin"
DEFAULT_VAL_FRACTION = 0.005  # --val_fraction of training and of tinytron-tokenize
DEFAULT_NUM_PROC = min(8, os.cpu_count() or 1)
_FORMAT_VERSION = 1  # bump when the bytes written for the same inputs change

# Local file suffix -> `datasets` builder. .txt is special-cased to whole-file documents (see above).
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")  # `datasets` decompresses these transparently


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids 0..vocab_size-1."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _builder_of(file: Path) -> str | None:
    suffixes = [s for s in file.suffixes[-2:] if s not in _COMPRESSION]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_local(name: str) -> bool:
    """A path, not a hub name: absolute, ./ ../ ~ relative, two or more folders deep, or a data
    file name. Hub names ("org/name") never start with those characters and have one slash at most."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or _builder_of(Path(name)) is not None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0].rstrip(' :')}"


def _local_files(dataset: str) -> list[Path] | None:
    """The data files of a local `dataset` path (a file, or every supported file under a folder,
    sorted), or None when `dataset` is not a local path (a hub name)."""
    path = Path(dataset).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder_of(p))
    elif _looks_local(dataset):
        raise ValueError(f"--dataset {dataset}: no such file or folder")
    else:
        return None
    if not files:
        raise ValueError(f"--dataset {dataset}: no .txt/.jsonl/.json/.parquet files found")
    builders = {_builder_of(f) for f in files}
    if None in builders or len(builders) > 1:
        raise ValueError(f"--dataset {dataset}: need files of one kind (.txt, .jsonl/.json or "
                         f".parquet), got {sorted({''.join(f.suffixes) for f in files})}")
    return [f.resolve() for f in files]


def _load_corpus(dataset, dataset_config, split, files):
    from datasets import load_dataset

    if files is None:
        try:
            return load_dataset(dataset, dataset_config, split=split)
        except OSError as e:  # not on the hub, no connection, offline and not cached
            raise ValueError(f"--dataset {dataset}: not a local file or folder, and not loadable from the "
                             f"hub ({_first_line(e)})") from None
    builder = _builder_of(files[0])
    extra = {"sample_by": "document"} if builder == "text" else {}
    return load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split, **extra)


def load_tokenizer(name: str):
    """transformers.AutoTokenizer from a local folder or a hub name; ValueError, one line naming
    --tokenizer, for a path that does not exist or a folder or name that holds no tokenizer."""
    from transformers import AutoTokenizer

    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise ValueError(f"--tokenizer {name}: no such folder")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:  # not a tokenizer folder, not on the hub, offline and not cached
        raise ValueError(f"--tokenizer {name}: cannot load a tokenizer from it ({_first_line(e)})") from None


def _eos_id(tokenizer, name: str) -> int:
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    eos = tokenizer.get_vocab().get("<|endoftext|>")
    if eos is None:
        raise ValueError(f"--tokenizer {name} has no EOS token (no eos_token and no <|endoftext|>); "
                         "documents need one as separator")
    return eos


def _cache_name(dataset, dataset_config, split, text_column, files, tokenizer_name, tokenizer,
                eos, val_fraction) -> str:
    local_tokenizer = Path(tokenizer_name).expanduser()
    key = {
        "version": _FORMAT_VERSION, "config": dataset_config, "split": split,
        "text_column": text_column, "val_fraction": val_fraction,
        # Local files by absolute path, size and mtime: the same file named by another relative
        # path hits the cache, a file that changed is re-tokenized.
        "dataset": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files] if files
        else dataset,
        "tokenizer": str(local_tokenizer.resolve()) if local_tokenizer.exists() else tokenizer_name,
        # The vocabulary itself, not just the name: a tokenizer re-trained in place gets a new cache.
        "eos": eos, "vocab": hashlib.sha256(
            json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(dataset).name}-{Path(tokenizer_name).name}")
    return f"{readable[:60]}-{digest}"


def _encode_batch(batch, tokenizer, text_column, eos):
    # verbose=False: documents longer than the tokenizer's model_max_length are fine here (we never
    # feed a document to a model whole), so its "sequence too long" warning would only be noise.
    ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
    ids = [doc + [eos] for doc in ids]
    return {"ids": ids, "len": [len(doc) for doc in ids]}


def _tokenize_and_write(corpus, tokenizer, text_column, eos, num_proc, out_dir: Path, dtype) -> tuple[int, int]:
    """Tokenize `corpus` (a datasets.Dataset) and write the flat id array to out_dir/tokens.bin;
    return the number of tokens and the largest id."""
    if text_column not in corpus.column_names:
        raise ValueError(f"--text_column {text_column} is not a column of the dataset "
                         f"(columns: {corpus.column_names})")
    num_proc = max(1, min(num_proc, len(corpus)))
    tokenized = corpus.map(_encode_batch, batched=True, remove_columns=corpus.column_names,
                           num_proc=num_proc if num_proc > 1 else None, desc="tokenizing",
                           fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "eos": eos})
    num_tokens = int(tokenized.select_columns("len").with_format("numpy")[:]["len"].sum())
    tokens = np.memmap(out_dir / TOKENS_FILE, dtype=dtype, mode="w+", shape=(num_tokens,))
    pos, largest = 0, 0
    with tqdm(total=num_tokens, unit="tok", unit_scale=True, desc="writing tokens") as bar:
        for batch in tokenized.with_format("numpy").iter(batch_size=1024):
            # A ragged batch is an object array of 1-D arrays, an even one a 2-D array: both
            # concatenate to the batch's ids in order.
            ids = np.concatenate(list(batch["ids"]))
            tokens[pos:pos + len(ids)] = ids  # ids < vocab_size, so the cast to dtype is exact
            pos += len(ids)
            largest = max(largest, int(ids.max()))
            bar.update(len(ids))
    tokens.flush()
    del tokens
    assert pos == num_tokens
    return num_tokens, largest


def prepare_token_shards(dataset: str, tokenizer: str, cache_dir: str | os.PathLike, *,
                         dataset_config: str | None = None, text_column: str = "text",
                         split: str = "train", num_proc: int = DEFAULT_NUM_PROC,
                         val_fraction: float = DEFAULT_VAL_FRACTION, vocab_size: int | None = None) -> Path:
    """Tokenize `dataset` with `tokenizer` into `cache_dir` once; return the cache folder (for
    TokenWindowDataset). Reuses the folder when it already exists.

    dataset: a hub name ("HuggingFaceFW/fineweb-edu"), or a local .txt/.jsonl/.json/.parquet file
        (optionally .gz/.bz2/.xz/.zst), or a folder of such files (one kind, read in sorted order).
    tokenizer: a hub name or local folder for `transformers.AutoTokenizer.from_pretrained`.
    dataset_config / split: the hub dataset's config name and split (local files: split names it).
    text_column: the column holding the documents' text.
    num_proc: tokenizer processes (`datasets.map`), capped at the number of documents.
    val_fraction: the corpus' last fraction of tokens is the validation split.
    vocab_size: the model's; a tokenizer with more ids is refused before any tokenizing.
    Bad paths and names raise ValueError, one line naming the flag (--dataset, --tokenizer).
    Works offline (HF_HUB_OFFLINE=1) with local paths. Single process: under torch.distributed use
    prepare_token_shards_distributed.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction {val_fraction} must be in [0, 1)")
    files = _local_files(dataset)
    tok = load_tokenizer(tokenizer)
    eos, tok_vocab = _eos_id(tok, tokenizer), len(tok)  # len counts added tokens, .vocab_size not
    if vocab_size is not None and vocab_size < tok_vocab:
        raise ValueError(f"--vocab_size {vocab_size} is smaller than the tokenizer's vocabulary {tok_vocab} "
                         f"({tokenizer})")
    cache_dir = Path(cache_dir)
    final = cache_dir / _cache_name(dataset, dataset_config, split, text_column, files, tokenizer,
                                    tok, eos, val_fraction)
    if (final / INDEX_FILE).exists():
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would survive the rename and hide the cache from other users.
    tmp = cache_dir / f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        dtype = token_dtype(tok_vocab)
        corpus = _load_corpus(dataset, dataset_config, split, files)
        num_tokens, max_token_id = _tokenize_and_write(corpus, tok, text_column, eos, num_proc, tmp, dtype)
        boundary = num_tokens - round(val_fraction * num_tokens)
        index = {
            "version": _FORMAT_VERSION, "num_tokens": num_tokens, "dtype": dtype.name,
            "vocab_size": tok_vocab, "max_token_id": max_token_id, "eos_token_id": eos, "tokenizer": tokenizer,
            "num_documents": len(corpus), "val_fraction": val_fraction,
            "source": {"dataset": dataset, "config": dataset_config, "split": split,
                       "text_column": text_column, "files": files and [str(f) for f in files]},
            "splits": {"train": [0, boundary], "val": [boundary, num_tokens]},
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        try:
            tmp.rename(final)
        except OSError:
            # Another process (a second node sharing the file system) finished the same cache first.
            if not (final / INDEX_FILE).exists():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prepare_token_shards_distributed(*args, **kwargs) -> Path:
    """prepare_token_shards under torch.distributed: local rank 0 of every node tokenizes, the other
    ranks wait at a barrier (default group) and then read the finished cache. Collective: every rank
    calls it with the same arguments. Without torch.distributed initialised it is
    prepare_token_shards. The barrier runs under the process group's timeout: pre-tokenize large
    corpora with `tinytron-tokenize` before launching."""
    if not (dist.is_available() and dist.is_initialized()):
        return prepare_token_shards(*args, **kwargs)
    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if leader:
        path = prepare_token_shards(*args, **kwargs)
    dist.barrier()
    if not leader:
        path = prepare_token_shards(*args, **kwargs)  # a cache hit now
    return path

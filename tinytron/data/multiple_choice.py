"""Multiple-choice task files (HellaSwag's layout) and their tokenization as lm-evaluation-harness
does it, so accuracies computed from them equal lm-eval's.

A task file is JSON Lines, one item per line:

    {"context": "ROMEO: But soft, what light", "endings": ["through yonder window breaks?", ...], "label": 0}

`context` (HellaSwag's own files call it `ctx`, also accepted) is the text the model conditions on,
`endings` two or more candidate continuations, `label` the index of the right one (an int or a
digit string, as in HellaSwag's hub copy). Other fields are ignored. The task's name is the file
name without `.jsonl`.
"""

import json
import os
from dataclasses import dataclass

# lm-eval's default target_delimiter: the request for ending e is (context, " " + e).
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Item:
    context: str
    endings: tuple[str, ...]
    label: int


def task_name(path: str) -> str:
    """The task's name: the file name without its extension."""
    return os.path.splitext(os.path.basename(path))[0]


def _parse(line: str, where: str) -> Item:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: an item is a JSON object")
    context = doc.get("context", doc.get("ctx"))
    endings, label = doc.get("endings"), doc.get("label")
    if not isinstance(context, str):
        raise ValueError(f"{where}: needs a string \"context\"")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        raise ValueError(f"{where}: \"endings\" must be a list of at least 2 non-empty strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ValueError(f"{where}: \"label\" must be an index into \"endings\" (0..{len(endings) - 1}), "
                         f"got {label!r}")
    return Item(context, tuple(endings), label)


def read_task(path: str) -> list[Item]:
    """The items of one task file; ValueError (one line naming file and line) when it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            items = [_parse(line, f"{path} line {n}") for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def read_tasks(paths: str) -> dict[str, list[Item]]:
    """Comma-separated task files -> {task name: items}, in the order given."""
    tasks = {}
    for path in filter(None, (p.strip() for p in paths.split(","))):
        name = task_name(path)
        if name in tasks:
            raise ValueError(f"{path}: a second task named {name} (task names are file names)")
        tasks[name] = read_task(path)
    if not tasks:
        raise ValueError(f"{paths!r} names no task file")
    return tasks


def _encode(tokenizer, text: str) -> list[int]:
    """lm-eval's HFLM.tok_encode: the tokenizer's own special tokens, except when the text already
    starts with the prefix token."""
    prefix_id = prefix_token_id(tokenizer)
    prefix = tokenizer.decode(prefix_id) if prefix_id is not None else ""
    kwargs = {"add_special_tokens": False} if prefix and text.startswith(prefix) else {}
    return tokenizer.encode(text, **kwargs)


def prefix_token_id(tokenizer) -> int | None:
    """What an empty context conditions on: BOS, else EOS (lm-eval's prefix_token_id)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_request(tokenizer, context: str, ending: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of ending `ending`, exactly as lm-eval builds its
    loglikelihood request (context, " " + ending): trailing whitespace of the context moves to the
    continuation, the whole string is encoded and split after the context's own encoding (so BPE
    merges across the boundary are the whole string's); an empty context becomes the prefix token."""
    continuation = TARGET_DELIMITER + ending
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if prefix is None or not cont:
            raise ValueError("an empty context needs a tokenizer with a BOS or EOS token and a non-empty ending")
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = _encode(tokenizer, context + continuation), _encode(tokenizer, context)
    if not ctx or len(whole) <= len(ctx):
        raise ValueError(f"context {context[:40]!r} or ending {ending[:40]!r} encodes to no tokens")
    return ctx, whole[len(ctx):]

"""Write docs/configuration.md: every training flag with its default, its bound and its help, read
from the parser that `pretrain_*.py` use (generated from the config dataclasses).

    python -m tinytron.commands.config_page > docs/configuration.md

tests/test_docs.py runs that command and fails when the page in the repository differs.
"""

import argparse
import dataclasses
import re

from tinytron.model.config import ModelConfig
from tinytron.training.arguments import build_parser
from tinytron.training.config import SECTIONS

COMMAND = "python -m tinytron.commands.config_page > docs/configuration.md"

HEADER = f"""# Configuration

Every flag of `pretrain_debug.py` and `pretrain_example.py` (and of a `Trainer` subclass launched with
`tinytron.training.run`, see [extending.md](extending.md)), one per field of the frozen dataclasses in
`tinytron/training/config.py` and `tinytron/model/config.py`: the CLI is generated from them, so its
defaults are the code's. `pretrain_debug.py` turns `--use_mock_data` on. Boolean flags come in pairs:
`--x` / `--no-x`. Flags must be spelled out (no prefix matching); a value outside its bound, or one
that contradicts another flag (e.g. `--seq_len` above `--block_size`, `--total_batch_size` not a
multiple of `--batch_size` x `--seq_len` x the data-parallel size), stops the run before any work
(see [troubleshooting.md](troubleshooting.md)). The console scripts' own flags: `tinytron-<name> --help`.

This page is generated; after changing a flag, regenerate it:

<!-- run: regenerate -->
```bash
{COMMAND}
```
"""


def _model_bound(name: str) -> str:
    """The range ModelConfig.validate enforces for a numeric model field, as its own error message
    states it ("must be positive" -> "> 0"): read by giving the field 0, then -1."""
    for probe in (0, -1):
        try:
            ModelConfig(**{name: probe}).validate()
        except ValueError as e:
            message = str(e)
            if message.startswith(f"--{name} ") and " must be " in message:
                text = re.sub(r"(--\w+) \S+\]", r"\1]", message.split(" must be ", 1)[1].removeprefix("in "))
                return "> 0" if text == "positive" else text
    return ""


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    if action.dest == "block_size":
        return f"larger of {ModelConfig.block_size} and `--seq_len`"
    value = action.default
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return '""' if value == "" else str(value)


def markdown() -> str:
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    out = [HEADER.rstrip("\n")]
    for section, cls in SECTIONS.items():
        out += [f"\n## {section}\n", "| flag | default | bound | help |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            action = actions[f.name]
            flag = f"`--{f.name}` / `--no-{f.name}`" if isinstance(action, argparse.BooleanOptionalAction) \
                else f"`--{f.name}`"
            if action.choices:
                bound = "one of " + ", ".join(map(str, action.choices))
            elif cls is ModelConfig and not isinstance(f.default, bool):
                bound = _model_bound(f.name)
            else:
                bound = f.metadata.get("bound", "")
            out.append(f"| {flag} | {_cell(_default(action))} | {_cell(bound)} | {_cell(action.help or '')} |")
    return "\n".join(out) + "\n"


def main() -> None:
    print(markdown(), end="")


if __name__ == "__main__":
    main()

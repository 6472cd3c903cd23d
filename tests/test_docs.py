"""The documentation's commands work as written (the convention: tests/docs.py).

- Every shell block of README.md and docs/*.md is marked `run: NAME` or `not run: needs ...`, and
  every `run:` block is taken by a test: a literal ("page", "NAME") in some tests/*.py.
- The cheap blocks run here as written, from a scratch folder that looks like the repository:
  `python ...` by bash with this interpreter's bin first on PATH; a `tinytron-*` command through
  the entry point pyproject.toml installs under that name, in this process (a process of its own
  would pay ~4 s of imports per block). Their output is checked. Export, evaluation, sampling and
  plotting run on a checkpoint the `example_run` fixture makes.
- The blocks that train run in the tests that already train that way (tests/test_trainer.py takes
  them with doc_command, adding its --log_dir and a shorter --max_steps), or here where the block
  itself says a small --max_steps.
- docs/configuration.md is what its command generates; CI runs README's install and test blocks;
  relative links and their #anchors resolve; no page points outside the repository.
"""

import glob
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs import MARKER, REPO, doc_block, doc_pages, fenced_blocks, shell_blocks
from tests.test_commands import SCRIPTS
from tests.utils import launch_env, read_log, tiny_config

TOKENIZER = REPO / "data" / "tinyshakespeare" / "tokenizer"
# ("page", "NAME") pairs, also as a test names them (doc_block("page", "NAME"), a table row).
TAKEN = re.compile(r"""["'](README\.md|docs/[\w.-]+\.md)["'],\s*["']([\w.-]+)["']""")


def _pages():
    return [pytest.param(page, id=str(page.relative_to(REPO))) for page in doc_pages()]


@pytest.mark.parametrize("page", _pages())
def test_every_shell_block_is_marked(page):
    for marker, _, line in shell_blocks(page):
        assert marker is not None and MARKER.match(marker), \
            f"{page.name}:{line}: a shell block needs <!-- run: NAME --> or <!-- not run: needs ... --> above it"


def test_every_run_block_is_taken_by_a_test():
    wanted = {(str(page.relative_to(REPO)), MARKER.match(marker)["name"])
              for page in doc_pages() for _, marker, _, _ in fenced_blocks(page)
              if marker and MARKER.match(marker) and MARKER.match(marker)["name"]}
    taken = {pair for path in (REPO / "tests").glob("*.py") for pair in TAKEN.findall(path.read_text())}
    assert wanted - taken == set(), "blocks marked run: that no test takes"
    assert taken - wanted == set(), "tests take blocks that no page marks"


def test_ci_runs_readme_install_and_tests():
    """.ci/run is README's install block, test command and floor block, line for line."""
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    readme = doc_block("README.md", "install") + doc_block("README.md", "test") + doc_block("README.md", "floor")
    assert ci == readme.splitlines()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", _pages())
def test_links_resolve(page):
    text = page.read_text()
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+:", target):   # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            headings = [_slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), flags=re.MULTILINE)]
            assert anchor in headings, f"{page.name}: link to {target}: no such heading"


# ------------------------------------------------------------------ the cheap blocks, as written

@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A working folder that looks like the repository's root: data/, scripts/, tests/ and the entry
    scripts linked, logs/, data_cache/ and docs/ its own."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("data", "scripts", "tests", "pretrain_debug.py", "pretrain_example.py"):
        (root / name).symlink_to(REPO / name)
    (root / "docs").mkdir()
    return root


@pytest.fixture(scope="module")
def example_run(scratch):
    """logs/example_cpu_<hash>, as scripts/example_cpu/pretrain.sh leaves it, in small: a model on
    Tiny Shakespeare's tokenizer (vocabulary 4096), 2 steps, a checkpoint, the run's --tokenizer."""
    from tinytron.training import Trainer
    trainer = Trainer(tiny_config(scratch / "logs", "--exp_name", "example_cpu", "--vocab_size", "4096",
                                  "--block_size", "256", "--tokenizer", str(TOKENIZER), "--max_steps", "2",
                                  "--warmup_steps", "1", "--val_every_steps", "1"))
    trainer.train()
    return Path(trainer.run_dir)


def _shell(scratch, page: str, name: str) -> subprocess.CompletedProcess:
    """The block run by bash in `scratch`, as a user whose venv is active runs it: this interpreter's
    bin first on PATH (`python`, `tinytron-*`); OMP_NUM_THREADS=1 as torchrun sets it."""
    env = {**launch_env(os.path.dirname(sys.executable)), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", doc_block(page, name)], cwd=scratch, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{page} {name}: {r.stderr[-3000:]}"
    return r


def _console(scratch, monkeypatch, capsys, page: str, name: str) -> str:
    """A block that is one tinytron-* command, run in this process (each command's own process would
    pay ~4 s of imports): the entry point pyproject.toml installs under the block's first word,
    called with the block's arguments as bash would pass them from `scratch` (globs expanded), with
    the environment of an offline machine. -> what it printed."""
    words = shlex.split(doc_block(page, name).replace("\\\n", " "), comments=True)
    assert words[0] in SCRIPTS, f"{page} {name}: {words[0]} is not a console script of pyproject.toml"
    monkeypatch.chdir(scratch)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(scratch / "hf"))
    args = [match for word in words[1:] for match in (sorted(glob.glob(word)) if "*" in word else [word])]
    module, fn = SCRIPTS[words[0]].split(":")
    capsys.readouterr()
    try:
        getattr(importlib.import_module(module), fn)(args)
    except SystemExit as e:
        assert e.code in (None, 0), f"{page} {name}: exit {e.code}: {capsys.readouterr().err[-3000:]}"
    return capsys.readouterr().out


def test_configuration_page_is_current(scratch, monkeypatch, capsys):
    """docs/configuration.md is what its own command writes from the parser: a flag added, renamed
    or given another default or help fails here until the page is regenerated."""
    from tinytron.commands.config_page import COMMAND, main
    assert doc_block("docs/configuration.md", "regenerate") == COMMAND + "\n"
    main()
    assert capsys.readouterr().out == (REPO / "docs" / "configuration.md").read_text(), \
        f"docs/configuration.md is stale: {COMMAND}"


def test_one_process_block_trains(scratch):
    r = _shell(scratch, "docs/parallelism.md", "one-process")
    (run,) = (scratch / "logs").glob("tinytron_*")
    losses = read_log(str(run))
    assert sorted(losses) == list(range(20)) and losses[19] < losses[0] - 1, r.stdout[-2000:]


def test_tokenize_block(scratch, monkeypatch, capsys):
    """The whole corpus is one document: the tokenizer's 344,104 tokens (data/README.md) + EOS."""
    out = _console(scratch, monkeypatch, capsys, "docs/data.md", "tokenize")
    assert re.fullmatch(r"data_cache/input\.txt-tokenizer-\w+: 344,105 tokens\n", out), out


def test_plan_blocks_print_what_the_page_shows(scratch, monkeypatch, capsys):
    memory = (REPO / "docs" / "memory.md").read_text()
    shown = _console(scratch, monkeypatch, capsys, "docs/memory.md", "plan-7b")
    assert shown in memory, "docs/memory.md shows another output of its 7B plan:\n" + shown
    fsdp = _console(scratch, monkeypatch, capsys, "docs/memory.md", "plan-fsdp")
    total, batch = re.search(r"this run .*: ([\d.]+) GiB of 72.0 usable per rank: fits\n"
                             r"largest --batch_size that fits: (\d+);", fsdp).groups()
    row = re.search(r"^\| 70B \| 64 x 80 GiB \| dp 64 x sep 1 \|.*\| ([\d.]+) \| (\d+) \|$", memory, re.MULTILINE)
    assert (f"{float(total):.1f}", batch) == row.groups(), fsdp


def test_sample_eval_export_plot_blocks(scratch, example_run, monkeypatch, capsys):
    """On the example run's checkpoint, README's sample, then evaluation.md's eval and export and
    training.md's plot, as written (`logs/example_cpu_*` is the one run)."""
    sample = _console(scratch, monkeypatch, capsys, "README.md", "sample")
    assert sample.startswith("ROMEO:") and len(sample.strip()) > len("ROMEO:"), sample
    scores = _console(scratch, monkeypatch, capsys, "docs/evaluation.md", "eval")
    assert re.fullmatch(r"shakespeare_mc: acc [\d.]+ acc_norm [\d.]+ \(20 items.*\)\n", scores), scores
    exported = _console(scratch, monkeypatch, capsys, "docs/evaluation.md", "export")
    assert exported.startswith(f"[tinytron] exported step 2 of {example_run.relative_to(scratch)} as "), exported
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(scratch / "exported"))
    _console(scratch, monkeypatch, capsys, "docs/training.md", "plot")
    assert (scratch / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

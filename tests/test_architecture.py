"""The package's shape (docs/architecture.md): imports point one way, the model knows no
parallelism, and no module is longer than a reader can hold.

Imports are read from the source with ast (every `import`, also those inside functions: a lazy
import is still a dependency), so the test sees what a reader sees.
"""

import ast
import os
import subprocess
import sys
from contextlib import closing

import pytest

from tests.dist_helper import run_distributed
from tests.utils import tiny_config
from tinytron.training import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "tinytron")

# Which top-level subpackages each may import (besides itself). The one direction of docs/architecture.md:
# commands -> training -> model, distributed, data, utils, interop.
ALLOWED = {
    "model": set(),
    "utils": {"model"},
    "data": set(),
    "distributed": {"model"},
    "interop": {"model"},
    "training": {"model", "distributed", "data", "utils", "interop"},
    "commands": {"training", "model", "distributed", "data", "utils", "interop"},
}


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def _imports(path: str, module: str) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                package = parts if path.endswith("__init__.py") else parts[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _subpackage(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "tinytron" else None


def test_imports_point_one_way():
    wrong = []
    for module, path in _modules().items():
        own = _subpackage(module)
        if own is None or own not in ALLOWED:
            continue
        for name in _imports(path, module):
            other = _subpackage(name)
            if other and other != own and other in ALLOWED and other not in ALLOWED[own]:
                wrong.append(f"{module} imports {name}")
    assert not wrong, wrong


def test_the_model_imports_nothing_of_torch_distributed():
    wrong = [f"{m} imports {n}" for m, p in _modules().items() if _subpackage(m) == "model"
             for n in _imports(p, m) if n.startswith("torch.distributed")]
    assert not wrong, wrong


@pytest.mark.parametrize("package, never", [("model", ("distributed", "training")), ("interop", ("training",))])
def test_importing_a_package_loads_nothing_above_it(package, never):
    """At run time too (a fresh interpreter): the model can go into a notebook without Tinytron's
    parallelism or trainer, and the HF converters without the trainer."""
    code = (f"import sys, tinytron.{package}; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('tinytron.')}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert package in loaded and not any(f"'{name}'" in loaded for name in never), loaded


def test_no_import_cycle():
    """Between modules of the package (a cycle through lazy imports counts too)."""
    modules = _modules()
    graph = {m: {n for n in _imports(p, m) if n in modules and n != m} for m, p in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle a reader has to follow.
    for m in graph:
        graph[m] = {n for n in graph[m] if not (m.startswith(n + ".") and modules[n].endswith("__init__.py"))}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := sum(1 for _ in open(p))) > 400}
    assert not long, long


def _files_of_one_step(log_dir: str, flags: tuple[str, ...]) -> list[str]:
    """The package's source files whose functions run in this process during one Trainer.train_step
    (after a first step, so lazy set-up is not counted)."""
    trainer = Trainer(tiny_config(log_dir, *flags))
    files = set()

    def on_call(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            files.add(os.path.relpath(frame.f_code.co_filename, REPO))

    with closing(trainer._train_loader()) as batches:
        trainer.train_step(batches)
        sys.setprofile(on_call)
        try:
            trainer.train_step(batches)
        finally:
            sys.setprofile(None)
    return sorted(files)


def test_one_step_passes_through_at_most_ten_files(tmp_path):
    """A dense step under sequence parallelism (sep 2, ZeRO-1, the default --num_workers 2, so the
    data is read in the DataLoader's worker processes), as docs/architecture.md lists it."""
    files = run_distributed(_files_of_one_step, 2, str(tmp_path), ("--sep_size", "2", "--num_workers", "2"))[0]
    assert "tinytron/distributed/sequence_parallel/ulysses.py" in files, files   # the step was traced
    assert len(files) <= 10, files


def test_ruff_is_clean():
    """The lint configuration of pyproject.toml (ruff, line length 120) holds on the whole tree."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

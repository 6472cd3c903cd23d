"""The command lines: every console script of pyproject.toml imports (in a fresh interpreter, where
an import cycle shows) and answers --help. (The direction of imports: tests/test_architecture.py.)"""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# [project.scripts] of pyproject.toml: {console script: "module:function"}
SCRIPTS = dict(re.findall(r'^(tinytron-\w+) = "([\w.:]+)"$',
                          (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0],
                          flags=re.MULTILINE))


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_console_scripts_import():
    assert set(SCRIPTS) == {"tinytron-tokenize", "tinytron-plan", "tinytron-plot", "tinytron-export",
                            "tinytron-generate", "tinytron-eval", "tinytron-torchrun"}
    code = "; ".join(["import importlib"] + [
        f"assert callable(getattr(importlib.import_module({module!r}), {fn!r}))"
        for module, fn in (entry.split(":") for entry in SCRIPTS.values())])
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_command_help(script, capsys):
    module, fn = SCRIPTS[script].split(":")
    try:   # torchrun's main (tinytron-torchrun's) returns after --help: its @record takes the SystemExit
        getattr(importlib.import_module(module), fn)(["--help"])
        code = 0
    except SystemExit as e:
        code = e.code
    assert code == 0 and capsys.readouterr().out.startswith("usage:")


def test_python_m_runs_a_command():
    r = _python("-m", "tinytron.commands.plan", "--help")
    assert r.returncode == 0 and "--gpu_memory_gib" in r.stdout, r.stderr

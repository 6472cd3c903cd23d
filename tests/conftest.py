"""Suite-wide set-up: the package's bytecode, written once before the tests start, and the order
in which pytest-xdist hands out the test files."""

import compileall
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_sessionstart(session) -> None:
    """The suite starts a few hundred interpreters (torchrun's workers, launchers, scripts), each
    importing tinytron and tests/. Where PYTHONDONTWRITEBYTECODE is set (as on CI machines), Python
    reads .pyc files but never writes them, and each interpreter would compile the sources again
    (~0.2 s each); compileall writes them once, as a first import without the variable would."""
    for package in ("tinytron", "tests"):
        compileall.compile_dir(os.path.join(REPO, package), quiet=1)


# pyproject's addopts run the suite on 2 pytest-xdist workers, one whole file at a time (a file's
# module fixtures, minute-long multi-process jobs, run once). The files with the longest jobs go
# first, so the short ones fill in at the end and both workers finish together (measured on 2
# cores: a file's tests, in seconds, in this order, down to ~35 s; the rest keep pytest's order).
SLOWEST_FIRST = ("test_parallel_training.py", "test_fsdp.py", "test_preemption.py", "test_trainer.py",
                 "test_hangs.py", "test_faults.py", "test_perf_features.py", "test_lineage.py", "test_fsdp_muon.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))   # stable: in-file order kept

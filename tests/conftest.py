"""Suite-wide set-up: the package's bytecode, written once before the tests start."""

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

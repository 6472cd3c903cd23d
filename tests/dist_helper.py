"""Run a function in N processes on the gloo backend (CPU) and collect what each returns; run an
entry script in a process of its own without starting an interpreter."""

import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The ranks are forked from one server process that has imported torch and tinytron once (a fresh
# interpreter importing them costs ~3 CPU-seconds per rank: minutes over the suite's worlds on 2
# cores). The server never runs a test, so every world still starts from a clean process: nothing
# one world's ranks do (patches, seeds, process groups, compile caches) reaches another's.
_PRELOAD = ["tests.utils", "tinytron.training", "torch.distributed.fsdp", "torch._dynamo"]
multiprocessing.set_forkserver_preload(_PRELOAD)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (fixed ports collide with other jobs on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_a_fresh_interpreter() -> None:
    """A process forked from the server inherits its start method (forkserver): its DataLoader
    workers would then start a forkserver of their own, a new interpreter importing the preloads
    (~3 CPU-seconds per rank). Take the default of a fresh interpreter, as torchrun's workers do
    (the first of get_all_start_methods: fork on Linux before Python 3.14)."""
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)


def _worker(rank, world_size, port, out_dir, environ, cwd, fn, args):
    # A forked rank has the server's environment, folder and stdout/stderr, from when it started:
    # take the caller's, as a spawned rank would (its output: files the caller prints).
    _as_a_fresh_interpreter()
    for fd, stream in ((1, "out"), (2, "err")):
        with open(os.path.join(out_dir, f"rank{rank}.{stream}"), "w") as f:
            os.dup2(f.fileno(), fd)
    os.environ.clear()
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.chdir(cwd)
    torch.set_num_threads(1)  # two cores shared by several ranks
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        from tinytron.distributed.parallel_state import destroy_parallel_state
        destroy_parallel_state()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> list:
    """Call fn(*args) on every rank of a fresh gloo world of `world_size` processes (torch.distributed
    initialised, env vars RANK/WORLD_SIZE/... set, the caller's environment and folder); return the
    per-rank results, rank order. fn must be a module-level function (it is pickled by name); a
    failure in any rank raises."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_worker, args=(world_size, free_port(), out_dir, dict(os.environ), os.getcwd(), fn,
                                              args), nprocs=world_size, join=True, start_method="forkserver")
        finally:
            for r in range(world_size):
                for name, stream in (("out", sys.stdout), ("err", sys.stderr)):
                    if os.path.exists(path := os.path.join(out_dir, f"rank{r}.{name}")):
                        with open(path) as f:
                            stream.write(f.read())
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


def _script(path, argv, environ, cwd, out_dir):
    _as_a_fresh_interpreter()
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        with open(os.path.join(out_dir, stream), "w") as f:
            os.dup2(f.fileno(), fd)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    if path == "-m":     # python -m module args
        sys.argv = list(argv)
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    elif path == "-c":   # python -c code args
        sys.argv = ["-c", *argv[1:]]
        exec(compile(argv[0], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [path, *argv]
        runpy.run_path(path, run_name="__main__")


def run_script(path: str, *argv: str, cwd: str, timeout: float = 120,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """`python path *argv` (also `python -m module ...` and `python -c code ...`: path "-m" or "-c")
    in `cwd` with `env` (default os.environ), in a process forked from the server above (torch and
    tinytron already imported: no interpreter start-up, ~3 s less per run): its exit code (minus
    the signal that killed it), stdout, stderr. For what the script does with its flags (errors,
    exit codes, training); what the start of a real interpreter adds (import-time output) is seen
    only by the tests that run the real command."""
    with tempfile.TemporaryDirectory() as out_dir:
        proc = multiprocessing.get_context("forkserver").Process(
            target=_script, args=(path, argv, dict(os.environ if env is None else env), cwd, out_dir))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([path, *argv], timeout)
        with open(os.path.join(out_dir, "stdout")) as out, open(os.path.join(out_dir, "stderr")) as err:
            return subprocess.CompletedProcess([sys.executable, path, *argv], proc.exitcode, out.read(), err.read())

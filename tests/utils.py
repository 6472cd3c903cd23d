"""Shared helpers for the tests: tiny model and trainer configs, tensor comparison, log readers,
torchrun's processes."""

import dataclasses
import math
import os
import sys

import torch
import torch.utils._pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from tinytron.model import ModelConfig
from tinytron.training.arguments import build_parser, config_from_args

# A 2-layer GQA model (4 query / 2 kv heads, 32 wide) for model-level tests.
TINY_MODEL = ModelConfig(block_size=32, vocab_size=97, num_layer=2, num_attention_heads=4,
                         num_key_value_heads=2, hidden_size=32, intermediate_size=64)

TINY_FLAGS = [
    "--device", "cpu", "--precision", "fp32", "--use_mock_data", "--num_workers", "0",
    "--num_layer", "2", "--hidden_size", "32", "--num_attention_heads", "4", "--num_key_value_heads", "2",
    "--intermediate_size", "64", "--vocab_size", "64", "--block_size", "16",
    "--seq_len", "16", "--batch_size", "2", "--total_batch_size", "128",
    "--max_steps", "8", "--warmup_steps", "2", "--max_lr", "1e-2", "--min_lr", "1e-3",
    "--mock_data_num_samples", "256", "--val_every_steps", "4", "--save_every_steps", "4",
]


def tiny_config(log_dir: str, *flags: str):
    """Config of a 2-layer model on mock data; later flags override earlier ones."""
    return config_from_args(build_parser().parse_args(TINY_FLAGS + ["--log_dir", str(log_dir), *flags]))


def tiny_model_config(**changes) -> ModelConfig:
    """TINY_MODEL with `changes` (ModelConfig fields)."""
    return dataclasses.replace(TINY_MODEL, **changes)


def rel(actual: torch.Tensor, expected: torch.Tensor, ord: float = 2) -> float:
    """Relative error ||actual - expected|| / ||expected||, in float64: ord 2 (Frobenius; the
    default) or math.inf (the largest element's error over the largest element)."""
    diff = torch.linalg.vector_norm(actual.double() - expected.double(), ord)
    return (diff / torch.linalg.vector_norm(expected.double(), ord).clamp_min(1e-30)).item()


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: rel with ord=inf."""
    return rel(actual, expected, math.inf)


def read_log(run_dir: str, kind: str = "train") -> dict[int, float]:
    """{step: loss} of log.txt lines `<step> <kind> <loss>`; asserts each step appears once."""
    out = {}
    with open(os.path.join(run_dir, "log.txt")) as f:
        for line in f:
            step, k, value = line.split()[:3]
            if k == kind:
                assert int(step) not in out, f"step {step} logged twice"
                out[int(step)] = float(value)
    return out


def launch_env(*first_on_path) -> dict:
    """os.environ for tests that run the launch scripts with THIS interpreter: the tests may run as
    `.venv/bin/python -m pytest` without an activated venv, and with a .venv at the repository's
    root scripts/launch.sh would take that one, where a run of the suite under another venv (the
    torch floor's) must launch its own: TINYTRON_PYTHON names it. PATH is `first_on_path` (a test's
    stand-ins, such as `scontrol`), then the caller's PATH."""
    path = (*map(str, first_on_path), os.environ.get("PATH", ""))
    return {**os.environ, "PATH": os.pathsep.join(path), "TINYTRON_PYTHON": sys.executable}


def _live_parents() -> dict[int, int]:
    """{pid: parent pid} of the live processes, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except OSError:  # exited meanwhile
                continue
            if state != "Z":
                parents[int(entry)] = int(ppid)
    return parents


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (torchrun's workers)."""
    return [child for child, parent in _live_parents().items() if parent == pid]


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants: a job's launcher, torchrun, the workers (in sessions of
    their own) and their DataLoader workers."""
    parents = _live_parents()
    tree = [root] if root in parents else []
    for pid in tree:  # grows while it is walked: breadth-first
        tree += [child for child, parent in parents.items() if parent == pid]
    return tree


class PeakMemory(TorchDispatchMode):
    """The peak bytes of the tensor storages alive at once while the mode is on, seen op by op:
    what a caching allocator's `max_memory_allocated` counts on CUDA, measured on CPU (where torch
    keeps no such statistic). A storage made before the mode is counted once an op returns a view
    of it (a param's or grad's shard): to measure what a region allocates, `hold` the tensors that
    exist before it and subtract `now` from the peak. Each op's outputs are counted after the
    storages freed before it are dropped; buffers a kernel allocates and frees inside itself are
    not seen."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0   # {storage key: (weak ref, bytes)}

    def hold(self, tensors) -> None:
        for t in tensors:
            self._add(t)

    def _add(self, t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata not in self.live:
                self.live[ref.cdata] = (ref, storage.nbytes())
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= size
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            self._add(t)
        return out

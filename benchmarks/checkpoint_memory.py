"""Peak resident memory of each rank while it saves and loads a checkpoint (gloo, CPU).

A GPT of ~20M parameters with ZeRO-1 AdamW over the world (4 ranks): the fp32 AdamW state (8
bytes per parameter, a quarter of it on each rank) is what a save must not gather. Phase "save":
every rank takes one training step (so the state exists), then its peak RSS (VmHWM, reset by
writing 5 to /proc/self/clear_refs) is read around `save_checkpoint`. Phase "load", in fresh
processes: around `load_checkpoint` into a new model and an optimizer without state. "Extra" is
the peak minus the RSS just before; it includes the state a load creates (the rank's own shard).
For a save it should stay below the rank's own optimizer shard plus one bucket (the
DistributedOptimizer's default 40 MiB): nothing else may be materialised.

    python -m benchmarks.checkpoint_memory [--world 4]

Only API common to every Tinytron version is used (GPT, DistributedOptimizer, save_checkpoint,
load_checkpoint), so `PYTHONPATH=<older checkout> python benchmarks/checkpoint_memory.py`
measures that version.
"""

import argparse
import gc
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from tests.dist_helper import run_distributed
from tinytron.distributed import parallel_state as ps
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.model import GPT, ModelConfig
from tinytron.training import checkpoint as ckpt

try:   # where save_checkpoint lives since it fails in one line (older versions: checkpoint.py)
    from tinytron.training.checkpoint_save import save_checkpoint
except ImportError:
    save_checkpoint = ckpt.save_checkpoint

CONFIG = ModelConfig(vocab_size=8192, num_layer=5, num_attention_heads=8, num_key_value_heads=2,
                     hidden_size=512, intermediate_size=1536, block_size=64)
BUCKET_MIB = 40.0   # DistributedOptimizer's default bucket_size_mb
MIB = 2**20


def _status(field: str) -> int:
    """A Vm* field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _measure(fn) -> dict:
    """RSS before, peak RSS during (VmHWM after a reset) and RSS after fn(), in bytes, and its
    wall time in seconds."""
    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # VmHWM := VmRSS
    before, t0 = _status("VmRSS"), time.perf_counter()
    fn()
    return dict(before=before, peak=_status("VmHWM"), after=_status("VmRSS"), seconds=time.perf_counter() - t0)


def _build():
    ps.initialize_parallel_state(1)
    torch.manual_seed(0)
    model = GPT(CONFIG)
    # Keywords every version takes; no model given, so no overlap hooks (older versions have none).
    zero = DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), process_group=dist.group.WORLD,
                                param_names=model.named_parameters())
    return model, zero


def _shard_bytes(zero) -> int:
    return sum(v.nbytes for st in zero.optimizer.state.values() for v in st.values() if torch.is_tensor(v))


def _save(root: str) -> dict:
    model, zero = _build()
    tokens = torch.randint(CONFIG.vocab_size, (1, CONFIG.block_size + 1))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    zero.reduce_gradients()
    zero.step()
    meta = {"step": 1, "world_size": dist.get_world_size()}
    out = _measure(lambda: save_checkpoint(root, 1, model, zero, meta))
    return dict(out, shard=_shard_bytes(zero), params=sum(p.numel() for p in model.parameters()))


def _load(root: str) -> dict:
    model, zero = _build()
    out = _measure(lambda: ckpt.load_checkpoint(ckpt.step_dir(root, 1), model, zero))
    return dict(out, shard=_shard_bytes(zero))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = {"save": run_distributed(_save, args.world, root),
                   "load": run_distributed(_load, args.world, root)}
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    params = results["save"][0]["params"]
    print(f"tinytron from {os.path.dirname(os.path.dirname(ckpt.__file__))}; world {args.world} (gloo); "
          f"{params / 1e6:.1f}M params; AdamW state {8 * params / MIB:.0f} MiB in all; "
          f"checkpoint {size / MIB:.0f} MiB; bucket {BUCKET_MIB:.0f} MiB; torch {torch.__version__}")
    print("\n| phase | rank | RSS before (MiB) | peak (MiB) | extra = peak - before (MiB) | "
          "own optimizer shard (MiB) | shard + bucket (MiB) | seconds |\n|---|---|---|---|---|---|---|---|")
    for phase, ranks in results.items():
        for rank, r in enumerate(ranks):
            print(f"| {phase} | {rank} | {r['before'] / MIB:.0f} | {r['peak'] / MIB:.0f} | "
                  f"{(r['peak'] - r['before']) / MIB:.0f} | {r['shard'] / MIB:.1f} | "
                  f"{r['shard'] / MIB + BUCKET_MIB:.1f} | {r['seconds']:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

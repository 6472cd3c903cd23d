"""Cost of one optimizer step's data indices: the Feistel sampler vs the full permutation it replaced.

    python -m benchmarks.sampler [--global_batch 512] [--append docs/benchmarks.md]

Time: median over steps spread across the first epoch (each a fresh call, as in training). Memory:
tracemalloc's peak over one call (numpy reports its buffers to it), i.e. the bytes the call
allocates. The blend row mixes three corpora of N/2, N/3 and N/6 sequences by 0.5/0.3/0.2.
"""

import argparse
import os
import statistics
import time
import tracemalloc

import numpy as np
import torch

from benchmarks.common import markdown_table, report
from tinytron.data.blend import Blend
from tinytron.data.sampler import GlobalBatchSampler


def full_permutation_indices(num_samples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The previous sampler: materialise permutation(N) of the epoch, slice the step's G indices."""
    epoch, s = divmod(step, num_samples // global_batch)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)[s * global_batch:(s + 1) * global_batch]


def measure(fn, steps: list[int]) -> tuple[float, int]:
    """(median microseconds per call, peak bytes allocated by one call)."""
    fn(steps[0])  # warm-up
    times = []
    for step in steps:
        t0 = time.perf_counter()
        fn(step)
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn(steps[-1])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return 1e6 * statistics.median(times), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global_batch", type=int, default=512, help="sequences per optimizer step (G)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per row (3 for the full permutation)")
    p.add_argument("--append", default=None)
    args = p.parse_args()
    G, rows = args.global_batch, []
    for n in (10**6, 10**9, 10**12):
        steps = np.linspace(0, n // G - 1, args.steps).astype(np.int64).tolist()
        sampler = GlobalBatchSampler(n, G, G, 0, 1, seed=42)
        us, peak = measure(sampler.indices_of_step, steps)
        rows.append(["Feistel (this sampler)", f"{n:.0e}", f"{us:,.0f}", f"{peak:,}"])
        sizes = [n // 2, n // 3, n // 6]
        blend = Blend(sizes, [0.5, 0.3, 0.2])
        blended = GlobalBatchSampler(sum(sizes), G, G, 0, 1, seed=42, blend=blend)
        us, peak = measure(blended.indices_of_step, steps)
        rows.append(["blend of 3 corpora", f"{n:.0e}", f"{us:,.0f}", f"{peak:,}"])
    for n in (10**6, 10**7):
        steps = np.linspace(0, n // G - 1, 3).astype(np.int64).tolist()
        us, peak = measure(lambda s, n=n: full_permutation_indices(n, G, 42, s), steps)
        rows.append(["full permutation (before)", f"{n:.0e}", f"{us:,.0f}", f"{peak:,}"])
    body = (f"Global batch G = {G} sequences; one call = the indices of one optimizer step; "
            f"1-minute load average {os.getloadavg()[0]:.1f} (other processes share the cores).\n\n"
            + markdown_table(["order", "N (sequences)", "µs per step", "bytes allocated per step"], rows))
    report("Sampler cost per optimizer step", torch.device("cpu"), "benchmarks.sampler", body, args.append)


if __name__ == "__main__":
    main()

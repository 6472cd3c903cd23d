"""Peak memory of a training step: the chunked linear + cross-entropy loss (model/gpt.py, what the
Trainer's training forward uses) against full-vocabulary logits + F.cross_entropy (CPU).

Each variant runs in a fresh process (so neither inherits the other's freed pages): a small GPT
(vocab 50304, 2 layers of hidden 64) takes one warm-up step (forward, backward; the parameter
gradients then exist), then its peak resident memory (VmHWM, reset by writing 5 to
/proc/self/clear_refs) is read around a second step. "Extra" is the peak minus the RSS just
before. glibc serves tensors this large with mmap and returns them on free, so RSS follows the
live tensors. One full fp32 logits tensor is batch x seq_len x vocab x 4 bytes.

    python -m benchmarks.loss_memory [--batch 4] [--seq_len 1024] [--dtype fp32|bf16]
"""

import argparse
import subprocess
import sys

import torch

from benchmarks.checkpoint_memory import MIB, _status
from tinytron.model import GPT, ModelConfig
from tinytron.model.gpt import CHUNK_TOKENS, cross_entropy_sum

VARIANTS = {"full logits": "full", "chunked loss": "chunked"}


def _step(model: GPT, idx: torch.Tensor, variant: str, dtype) -> None:
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        if variant == "full":
            loss = cross_entropy_sum(model(idx[:, :-1], return_aux=True).logits, idx[:, 1:])
        else:
            loss = model(idx[:, :-1], targets=idx[:, 1:], return_aux=True).loss_sum
    loss.backward()


def measure(variant: str, batch: int, seq_len: int, dtype: str) -> None:
    """In this process: prints 'before peak' in bytes of the second step."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50304, num_layer=2, num_attention_heads=4, num_key_value_heads=2,
                         hidden_size=64, intermediate_size=128, block_size=seq_len)
    model = GPT(config).train()
    idx = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
    autocast = torch.bfloat16 if dtype == "bf16" else None
    _step(model, idx, variant, autocast)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # VmHWM := VmRSS
    before = _status("VmRSS")
    _step(model, idx, variant, autocast)
    print(before, _status("VmHWM"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--variant", choices=sorted(VARIANTS.values()), help=argparse.SUPPRESS)  # the child
    args = p.parse_args()
    if args.variant:
        measure(args.variant, args.batch, args.seq_len, args.dtype)
        return
    logits = args.batch * args.seq_len * 50304 * 4
    print(f"vocab 50304, {args.batch} x {args.seq_len} tokens, hidden 64, {args.dtype}, loss chunks of "
          f"{CHUNK_TOKENS} tokens; one full fp32 logits tensor: {logits / MIB:.0f} MiB; torch {torch.__version__}")
    print("\n| loss | RSS before (MiB) | peak (MiB) | extra = peak - before (MiB) | extra / fp32 logits |\n"
          "|---|---|---|---|---|")
    extra = {}
    for name, variant in VARIANTS.items():
        out = subprocess.run([sys.executable, "-m", "benchmarks.loss_memory", "--variant", variant,
                              "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--dtype", args.dtype],
                             check=True, capture_output=True, text=True).stdout
        before, peak = map(int, out.split()[-2:])
        extra[name] = peak - before
        print(f"| {name} | {before / MIB:.0f} | {peak / MIB:.0f} | {extra[name] / MIB:.0f} | "
              f"{extra[name] / logits:.2f} |")
    drop = extra["full logits"] - extra["chunked loss"]
    print(f"\ndrop: {drop / MIB:.0f} MiB = {drop / logits:.2f} full fp32 logits tensors")


if __name__ == "__main__":
    main()

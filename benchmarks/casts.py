"""Dtype casts and copies of one training step, by source, next to the step's matmul bytes: an
op-stream count (no timing), on CPU in seconds.

    python -m benchmarks.casts                        # the 0.25B preset, 4 x 4096 tokens, bf16
    python -m benchmarks.casts --preset cpu --batch 2 # another preset or shape, --micro_steps, --dtype fp32

One step as the Trainer runs it (training/trainer.py `train_step`, mirrored in `train_step` below):
zero_grad; per micro-batch (--micro_steps, default 1) the forward under
`torch.autocast(dtype=bf16, cache_enabled=False)` with the targets (the chunked head + loss), the
loss divided by the token count, its backward inside `micro_step`; then reduce_gradients,
clip_grad_norm(1.0) and the optimizer step, AdamW (fused, the Trainer's on CUDA; same param groups)
wrapped in the ZeRO-1 DistributedOptimizer (one process: no communication, the flat buffers and
their views as in training).

How it counts. The model, batch and optimizer are fake tensors (torch FakeTensorMode on the CPU
device: shapes, dtypes and strides, no data), so the full 0.25B micro-batch runs in seconds; CPU
autocast's rules apply (matmuls and attention in bf16; the casts it inserts are ordinary ops).
A TorchDispatchMode sees every aten op below autograd and autocast, forward and backward: each
`_to_copy` / `copy_` that changes the dtype is a cast; `_to_copy`, `copy_`, `clone`, `cat`,
`stack` and the other materialising ops in `COPY_OPS` are copies. Bytes = bytes read + bytes
written (every tensor input, and the output). Matmul bytes: the same for mm / addmm / bmm;
attention kernels (SDPA, forward and backward) are a separate line.

Attribution (the source of each cast or copy): the Python stack where the op was issued, or for an
op of the backward pass, the stack where its autograd node was created in forward (anomaly mode
keeps it as the node's "traceback_", without the NaN checks): the innermost frame inside tinytron,
torch.optim or nn.Linear's forward names the source (`SOURCES`: RoPE's functions -> RoPE,
CausalAttention / Attention -> attention layout, SwiGLU's -> SwiGLU, RMSNorm -> norms, nn.Linear
-> linear inputs (autocast's casts of a block's fp32 normalised input and, in backward, of its
gradient), Block.forward -> residual stream (the fp32 residual's gradient cast for the bf16 layer
outputs), the chunked head's functions -> head or loss, the zero1 optimizer and torch.optim ->
optimizer), with one exception: a cast of a parameter (forward) or of a parameter's gradient (a
backward node feeding its AccumulateGrad) is "block weights", or "head" for the head weight. In
the head's functions, ops on [n, vocab] tensors (logits, their gradient) and on the per-chunk
losses are "loss"; the rest (the matmul operands and the hidden-state and weight gradients) is
"head". Function extents are read from the source files with `ast`, so editing the model moves no
op to another source unless a function is renamed.

What differs on CUDA: CUDA autocast's op lists (both put the matmuls and SDPA in bf16, the softmax
and loss in fp32 as this model does explicitly); SDPA's backend (flash/cuDNN take the same
[B, H, T, D] strided views as the CPU flash kernel counted here, no copy either way).
"""

import argparse
import ast
import contextlib
import dataclasses
import functools
import os
import re
import traceback
import warnings
from collections import defaultdict

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import tinytron
from benchmarks.common import PRESETS, markdown_table, report
from tinytron.distributed.sequence_parallel.ulysses import sequence_chunk
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.model import GPT
from tinytron.model.gpt import IGNORE_INDEX

aten = torch.ops.aten
CAST_OR_COPY = {aten._to_copy.default, aten.copy_.default}
COPY_OPS = {aten.clone.default, aten.cat.default, aten.stack.default, aten.repeat_interleave.self_int,
            aten.repeat.default, aten.slice_backward.default, aten.select_backward.default,
            aten.index_select.default, aten.flip.default, aten.roll.default, aten.slice_scatter.default,
            aten.select_scatter.default, aten.expand_copy.default}
MATMUL_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
ATTENTION_PREFIX = "aten._scaled_dot_product"

# innermost tinytron function (qualified name) -> source; see _frame_source for the others
SOURCES = {
    "apply_rope": "RoPE", "_rotate": "RoPE", "_Rope.forward": "RoPE", "_Rope.backward": "RoPE",
    "RotaryEmbedding.forward": "RoPE",
    "CausalAttention.forward": "attention layout", "Attention.forward": "attention layout",
    "MLP.forward": "SwiGLU", "_SwiGLU.forward": "SwiGLU", "_SwiGLU.backward": "SwiGLU",
    "RMSNorm.forward": "norms", "Block.forward": "residual stream",
    "_chunk_loss_and_grads": "head", "_LinearCrossEntropySum.forward": "head",
    "_LinearCrossEntropySum.backward": "head", "linear_cross_entropy_sum": "head", "LMHead.forward": "head",
}
ORDER = ["RoPE", "attention layout", "SwiGLU", "norms", "linear inputs", "block weights", "residual stream", "head",
         "loss", "optimizer", "other"]
TINYTRON_ROOT, OPTIM_ROOT = (os.path.join(os.path.dirname(m.__file__), "") for m in (tinytron, torch.optim))
LINEAR_FILE = os.path.abspath(torch.nn.modules.linear.__file__)
FRAME = re.compile(r'File "(.+)", line (\d+), in ')


@functools.cache
def _functions(filename: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function in a source file."""
    with open(filename) as f:
        tree = ast.parse(f.read())
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if isinstance(child, ast.FunctionDef):
                    found.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")

    visit(tree, "")
    return found


def _frame_source(filename: str, lineno: int) -> str | None:
    """The source of a frame: "linear inputs" in nn.Linear's forward (autocast's casts of its
    input), "optimizer" in torch.optim and the zero1 optimizer, the attention layout in
    document_mask.py, else its function's entry in SOURCES ("other" if none) in tinytron; None
    elsewhere."""
    path = os.path.abspath(filename)
    if path == LINEAR_FILE:
        return "linear inputs"
    if path.startswith(OPTIM_ROOT) or path.startswith(os.path.join(TINYTRON_ROOT, "distributed", "zero1", "")):
        return "optimizer"
    if not path.startswith(TINYTRON_ROOT):
        return None
    if path.endswith("document_mask.py"):
        return "attention layout"
    inner = [(start, qual) for start, end, qual in _functions(path) if start <= lineno <= end]
    return SOURCES.get(max(inner)[1], "other") if inner else "other"


def _python_frames() -> list[tuple[str, int]]:
    return [(f.filename, f.lineno) for f in traceback.extract_stack()]


def _forward_frames(node) -> list[tuple[str, int]]:
    """Where the autograd node was created in forward (anomaly mode's traceback), outermost first."""
    lines = node.metadata.get("traceback_") or []
    return [(m.group(1), int(m.group(2))) for line in lines for m in [FRAME.search(line)] if m]


def _source(frames: list[tuple[str, int]]) -> str | None:
    """The source named by the innermost frame that names one (`_frame_source`); None if none does."""
    for filename, lineno in reversed(frames):
        source = _frame_source(filename, lineno)
        if source is not None:
            return source
    return None


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CastCounter(TorchDispatchMode):
    """Counts the casts and copies of the ops run under it, by source (see the module docstring),
    and the bytes of the matmuls and attention kernels. Enter it under anomaly mode (the backward
    ops' sources come from their nodes' forward tracebacks)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.params = {id(p): name for name, p in model.named_parameters()}
        self.head_weight = id(model.lm_head.weight)
        self.vocab = model.config.vocab_size
        self.stats = defaultdict(lambda: {"casts": 0, "cast_bytes": 0, "copies": 0, "copy_bytes": 0})
        self.detail = defaultdict(lambda: [0, 0])   # (source, op, dtypes, shape) -> [count, bytes]
        self.matmul_bytes = self.attention_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in MATMUL_OPS:
            self.matmul_bytes += _bytes(_tensors((args, kwargs))) + _bytes(_tensors(out))
        elif str(func).startswith(ATTENTION_PREFIX):
            self.attention_bytes += _bytes(_tensors((args, kwargs))) + _bytes(_tensors(out))
        elif func in CAST_OR_COPY or func in COPY_OPS:
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        inputs = _tensors((args[1:], kwargs) if func is aten.copy_.default else (args, kwargs))
        outputs = _tensors(out)
        is_cast = func in CAST_OR_COPY and inputs[0].dtype != outputs[0].dtype
        node = torch._C._current_autograd_node()
        source = self._param_source(inputs[0], node) if is_cast else None
        if source is None:
            source = _source(_python_frames())
        if source is None and node is not None:
            source = _source(_forward_frames(node))
        source = source or "other"
        if source == "head" and any(t.dim() == 0 or t.shape[-1] == self.vocab for t in inputs + outputs):
            source = "loss"   # the logits, their gradient, the per-chunk losses
        moved = _bytes(inputs) + _bytes(outputs)
        entry = self.stats[source]
        entry["casts" if is_cast else "copies"] += 1
        entry["cast_bytes" if is_cast else "copy_bytes"] += moved
        dtypes = f"{inputs[0].dtype}->{outputs[0].dtype}".replace("torch.", "") if is_cast else str(outputs[0].dtype)
        detail = self.detail[(source, str(func).split(".")[1], dtypes, tuple(outputs[0].shape),
                              "backward" if node is not None else "forward")]
        detail[0] += 1
        detail[1] += moved

    def _param_source(self, source_tensor, node) -> str | None:
        """"head" / "block weights" for a cast of a parameter (forward) or of the gradient going to
        one (backward: a ToCopyBackward node whose next function accumulates a parameter's grad)."""
        param = id(source_tensor) if id(source_tensor) in self.params else None
        if param is None and node is not None and type(node).__name__ == "ToCopyBackward0":
            variable = getattr(node.next_functions[0][0], "variable", None)
            param = id(variable) if variable is not None and id(variable) in self.params else None
        if param is None:
            return None
        return "head" if param == self.head_weight else "block weights"


def build(config, micro_steps: int, batch: int, seq_len: int):
    """Under the active FakeTensorMode: the GPT (seed 0, training mode), the Trainer's optimizer
    (AdamW, fused, weight decay on matrices but the embedding, in DistributedOptimizer) and the
    micro-batches [batch, seq_len + 1]."""
    torch.manual_seed(0)
    model = GPT(config).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    optimizer = DistributedOptimizer(adamw, model)
    batches = [torch.randint(config.vocab_size, (batch, seq_len + 1)) for _ in range(micro_steps)]
    return model, optimizer, batches


def train_step(model, optimizer, batches, autocast_dtype) -> None:
    """Trainer.train_step's tensor work (its host syncs left out: fake tensors have no values)."""
    optimizer.zero_grad()
    acc = torch.zeros(2)
    for micro, batch in enumerate(batches):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        count = (targets != IGNORE_INDEX).sum()
        inputs, targets, positions = sequence_chunk(inputs, targets, 0, 1)
        with (torch.autocast("cpu", dtype=autocast_dtype, cache_enabled=False) if autocast_dtype
              else contextlib.nullcontext()):
            out = model(inputs, targets=targets, position_ids=positions, return_aux=True)
        lm = out.loss_sum / count.clamp(min=1)
        with optimizer.micro_step(last=micro == len(batches) - 1):
            ((lm + out.aux_loss) / len(batches)).backward()
        acc += torch.stack((lm.detach(), out.aux_loss.detach()))
    optimizer.reduce_gradients()
    optimizer.clip_grad_norm(1.0)
    optimizer.step()


def count_step(config, micro_steps: int, batch: int, seq_len: int, autocast_dtype) -> CastCounter:
    """One step counted, after one uncounted step (AdamW's state exists, as in steady training)."""
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # anomaly mode's "enabled" warning
        model, optimizer, batches = build(config, micro_steps, batch, seq_len)
        train_step(model, optimizer, batches, autocast_dtype)
        counter = CastCounter(model)
        with torch.autograd.set_detect_anomaly(True, check_nan=False), counter:
            train_step(model, optimizer, batches, autocast_dtype)
    return counter


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(counter: CastCounter) -> str:
    rows, total = [], {"casts": 0, "cast_bytes": 0, "copies": 0, "copy_bytes": 0}
    for source in ORDER:
        s = counter.stats.get(source, total.fromkeys(total, 0))
        rows.append([source, s["casts"], gib(s["cast_bytes"]), s["copies"], gib(s["copy_bytes"]),
                     gib(s["cast_bytes"] + s["copy_bytes"])])
        for k in total:
            total[k] += s[k]
    all_bytes = total["cast_bytes"] + total["copy_bytes"]
    rows.append(["**all**", total["casts"], gib(total["cast_bytes"]), total["copies"], gib(total["copy_bytes"]),
                 f"**{gib(all_bytes)}**"])
    rows.append(["matmuls (mm, addmm, bmm)", "", "", "", "", gib(counter.matmul_bytes)])
    rows.append(["attention kernels (SDPA fwd + bwd)", "", "", "", "", gib(counter.attention_bytes)])
    return markdown_table(["source", "casts", "cast GiB", "copies", "copy GiB", "GiB moved"], rows)


def detail(counter: CastCounter, top: int) -> str:
    rows = sorted(counter.detail.items(), key=lambda kv: -kv[1][1])[:top]
    return markdown_table(["source", "op", "dtype", "output shape", "pass", "count", "GiB moved"],
                          [[*key[:3], "x".join(map(str, key[3])), key[4], n, gib(b)] for key, (n, b) in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="0.25b")
    p.add_argument("--batch", type=int, help="sequences per micro-batch (default: the preset's)")
    p.add_argument("--seq_len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--micro_steps", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype (fp32: none)")
    p.add_argument("--detail", type=int, default=12, metavar="N", help="list the N op kinds moving most bytes")
    p.add_argument("--append", metavar="PATH", help="append the result section to this markdown file")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    batch, seq_len = args.batch or preset.batch, args.seq_len or preset.seq_len
    config = dataclasses.replace(preset.config, block_size=seq_len)
    counter = count_step(config, args.micro_steps, batch, seq_len, torch.bfloat16 if args.dtype == "bf16" else None)
    c = config
    body = (f"Model: preset {args.preset}, {c.num_layer} layers, hidden {c.hidden_size}, {c.num_attention_heads} "
            f"heads / {c.num_key_value_heads} kv heads, intermediate {c.intermediate_size}, vocab {c.vocab_size}"
            f"{', tied head' if c.tied_lm_head else ''}; {args.micro_steps} micro-batch(es) of {batch} x {seq_len} "
            f"tokens; {args.dtype}. Op-stream count on fake CPU tensors (no timing): casts and copies of one "
            f"training step by source, bytes read + written, next to the matmuls' bytes:\n\n" + table(counter)
            + (f"\n\nThe {args.detail} op kinds moving most bytes:\n\n" + detail(counter, args.detail)
               if args.detail else ""))
    report(f"Casts and copies of a training step (preset {args.preset}, {args.dtype})", torch.device("cpu"),
           "benchmarks.casts", body, args.append)


if __name__ == "__main__":
    main()

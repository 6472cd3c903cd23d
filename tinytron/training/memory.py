"""Will it fit? Per-rank GPU memory of a run, from its config, without allocating the model:
the library of `tinytron-plan` (tinytron/commands/plan.py).

`plan` reports, for one rank: parameters, gradients and optimizer state (AdamW; with --optimizer
muon, AdamW + Muon, each Muon matrix owned by one rank under ZeRO-1 and --fsdp) (ZeRO-1 on and off, and with
--fsdp FSDP2's shards and its buffers in flight: `fsdp_state_bytes`; MoE experts split over the
expert-parallel = SEP group), the bf16 weight copies autocast keeps for backward, and
the activations of one micro-batch for each --activation_checkpointing mode, at --sep_size 1 and at
the given one; then the total of the run's own mode and the largest --batch_size that fits.

Parameters, gradients and optimizer state are exact: the model is built on the meta device (no
memory), its parameters go through the same bucket layout as `FlatBuffer` (padding included) and the
same shard rule as ZeRO-1. Activations are what autograd saves for backward, per token, op by op
(the formulas below; within 0.5% of the bytes measured on CPU with saved-tensor hooks in
tests/test_plan.py, 3% under expert parallelism). They assume the flash/efficient SDPA kernels (O(T)
memory: output and log-sum-exp saved, no T x T matrix) and, for MoE, balanced routing (k assignments
per token on every rank). Peak also counts the largest transient: one chunk of the loss's logits
in forward (no [tokens, V] logits are ever held whole), or the recomputed block(s) of activation
checkpointing in backward, whichever is larger (they never coexist), and on CUDA cuBLAS's
workspaces. With all of it, the planned peak covers the peak of live tensors measured op by op
on CPU (tests/test_plan.py) and `torch.cuda.max_memory_allocated` (tests/test_cuda.py), within 5%.
Not modelled: the CUDA context and NCCL buffers (~1-2 GiB, outside torch's allocator), allocator
fragmentation, torch.compile workspaces: the fit uses `--usable_fraction` (0.9) of the GPU.
"""

import dataclasses
import inspect
import types

import torch

from tinytron.distributed.fsdp.muon import matrices as fsdp_matrices
from tinytron.distributed.fsdp.muon import split_sizes
from tinytron.distributed.sequence_parallel.ulysses import kv_heads_to_send
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.distributed.zero1.grad_buffer import bucket_layout, shard_of
from tinytron.distributed.zero1.whole_matrices import owner_layout
from tinytron.model import GPT
from tinytron.model.gpt import CHUNK_TOKENS
from tinytron.training.checkpoint_async import owned
from tinytron.training.config import Config, validate_config
from tinytron.training.trainer import Trainer

GiB = 2**30
MODES = ("none", "selective", "full")


def _buffer_order(cfg: Config, trainer_cls=Trainer) -> tuple[list[torch.nn.Parameter], dict]:
    """The parameters of GPT(cfg.model), built on the meta device (no memory), that the
    trainer's `_init_optimizer` lists, in flat-buffer order (DistributedOptimizer packs them in
    reverse model order), and those in "whole_matrices" groups (Muon's): the keys of a dict, in
    the groups' order."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    fake = types.SimpleNamespace(model=model, config=cfg, device=torch.device("meta"))
    optimizer = trainer_cls._init_optimizer(fake)
    listed = {p for g in optimizer.param_groups for p in g["params"]}
    whole = dict.fromkeys(p for g in optimizer.param_groups if g.get("whole_matrices") for p in g["params"])
    return [p for p in reversed(list(model.parameters())) if p in listed], whole


def state_bytes(cfg: Config, world_size: int, zero1: bool, trainer_cls=Trainer) -> list[dict]:
    """Exact bytes of parameters, gradients and optimizer state on each global rank (a list).

    Dense params live in flat buffers over the world, expert params (each rank's 1/ep of the
    experts) in buffers over its DP group (dp rank = rank // sep); each buffer is cut into buckets
    padded to a multiple of its group size. AdamW keeps exp_avg and exp_avg_sq (param dtype) per
    element a rank steps, plus one 4-byte `step` per stepped tensor (a shard piece under ZeRO-1,
    a whole param without). Muon's matrices (--optimizer muon) have buffers of their own, laid out
    by whole_matrices.owner_layout under ZeRO-1 (unpadded, uneven shards of whole matrices): one
    momentum buffer (param dtype) per element of the matrices a rank owns (all without ZeRO-1)."""
    sep = cfg.parallel.sep_size
    ep = sep if cfg.model.use_moe else 1
    order, whole = _buffer_order(cfg, trainer_cls)
    bucket_bytes = inspect.signature(DistributedOptimizer).parameters["bucket_size_mb"].default * 2**20
    out = [{"params": 0, "grads": 0, "optimizer": 0} for _ in range(world_size)]
    for is_expert, size in ((False, world_size), (True, world_size // sep)):
        for is_whole in (False, True):
            members = [p for p in order if getattr(p, "is_expert", False) == is_expert and (p in whole) == is_whole]
            if not members:
                continue
            numels = [p.numel() // (ep if is_expert else 1) for p in members]
            item = members[0].element_size()
            layout = owner_layout if is_whole and zero1 else bucket_layout
            offsets, buckets, bucket_members, *segments = layout(numels, max(1, int(bucket_bytes) // item), size)
            for rank, rank_bytes in enumerate(out):
                rank_bytes["params"] += buckets[-1][1] * item
                rank_bytes["grads"] += buckets[-1][1] * item
                stepped, pieces = sum(numels), len(numels)
                if zero1 and size > 1:
                    stepped = pieces = 0
                    group_rank = rank // sep if is_expert else rank
                    for b, (bucket, idx) in enumerate(zip(buckets, bucket_members)):
                        lo, hi = segments[0][b][group_rank] if segments else shard_of(bucket, size, group_rank)
                        for i in idx:
                            overlap = min(offsets[i] + numels[i], hi) - max(offsets[i], lo)
                            if overlap > 0:
                                stepped, pieces = stepped + overlap, pieces + 1
                rank_bytes["optimizer"] += stepped * item if is_whole else 2 * stepped * item + 4 * pieces
    return out


def fsdp_state_bytes(cfg: Config, world_size: int, trainer_cls=Trainer) -> list[dict]:
    """Exact bytes of parameters, gradients and optimizer state on each global rank under --fsdp, and
    the FSDP2 buffers in flight ("in_flight", an estimate).

    Every param is sharded on dim 0 over its group (dense: the world; experts, this SEP rank's
    1/ep of them: the DP group, dp rank = rank // sep), torch.chunk's split: c = ceil(rows / N)
    rows per rank. FSDP2 pads every rank's parameter and gradient shard to c rows; AdamW's
    exp_avg and exp_avg_sq (fp32) hold the rank's real rows only (fewer or none on the last
    ranks), plus one 4-byte `step` per parameter. Muon's matrices (--optimizer muon): one
    momentum buffer per element of the whole matrices a rank owns (distributed/fsdp/muon.py).
    In flight (fp32, or bf16 for the blocks under --precision bf16): the root (embedding, final
    norm, head) stays gathered through forward and backward with its fp32 grads; two blocks'
    params (the one running and the prefetched next) and one block's unsharded grads plus their
    fp32 reduce-scatter input; with gradient accumulation (grad_accum > 1) every unsharded grad
    (fp32) is kept between micro-steps, since only the last one reduce-scatters."""
    sep = cfg.parallel.sep_size
    ep = sep if cfg.model.use_moe else 1
    out = [{"params": 0, "grads": 0, "optimizer": 0} for _ in range(world_size)]
    order, whole = _buffer_order(cfg, trainer_cls)
    for p in order:
        is_expert = getattr(p, "is_expert", False)
        size = world_size // sep if is_expert else world_size
        rows = p.shape[0] // (ep if is_expert else 1)
        row, c = p[0].numel(), -(-rows // size)
        for rank, rank_bytes in enumerate(out):
            r = rank // sep if is_expert else rank
            rank_bytes["params"] += c * row * p.element_size()
            rank_bytes["grads"] += c * row * p.element_size()
            if p not in whole:
                rank_bytes["optimizer"] += 2 * max(0, min(c, rows - r * c)) * row * p.element_size() + 4
    for rank, buffers in enumerate(fsdp_muon_buffer_bytes(cfg, world_size, trainer_cls)):
        out[rank]["optimizer"] += buffers.pop("momentum")
    m, a = cfg.model, 2 if cfg.training.precision == "bf16" else 4
    C, D, H, Kv = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_key_value_heads
    mlp = (m.num_experts // ep) * 3 * C * m.moe_intermediate_size + C * m.num_experts if m.use_moe \
        else 3 * C * m.intermediate_size
    block = C * (H + 2 * Kv) * D + H * D * C + mlp + 2 * C
    root = (1 if m.tied_lm_head else 2) * m.vocab_size * C + C
    t = cfg.training
    accum = t.total_batch_size > t.batch_size * t.seq_len * world_size // sep
    total = root + m.num_layer * block
    in_flight = 8 * root + 2 * a * block + (a + 4) * block + (4 * total if accum else 0)
    for rank_bytes in out:
        rank_bytes["in_flight"] = in_flight
    return out


def fsdp_muon_buffer_bytes(cfg: Config, world_size: int, trainer_cls=Trainer) -> list[dict]:
    """Per global rank under --fsdp --optimizer muon: the momentum of the matrices it owns and the
    transient buffers of one step (distributed/fsdp/muon.py), exact: "send" / "recv" (the
    gather's grad and param rows), "whole" (the owned matrices' whole grads and params), then
    "back_send" / "back_recv" (the updated rows returned). All zero without Muon."""
    sep, whole = cfg.parallel.sep_size, _buffer_order(cfg, trainer_cls)[1]
    ep = sep if cfg.model.use_moe else 1
    out = [dict.fromkeys(("momentum", "send", "recv", "whole", "back_send", "back_recv"), 0)
           for _ in range(world_size)]
    for is_expert in (False, True):
        params = [p for p in whole if getattr(p, "is_expert", False) == is_expert]
        if not params:
            continue
        item = params[0].element_size()
        shapes = [(p.shape[0] // (ep if is_expert else 1), *p.shape[1:]) for p in params]
        ms = fsdp_matrices(shapes, world_size // sep if is_expert else world_size)
        for rank, b in enumerate(out):
            me = rank // sep if is_expert else rank
            to_each, from_each = split_sizes(ms, me)
            owned = sum(m.height * m.row for m in ms if m.owner == me)
            b["momentum"] += owned * item
            b["whole"] += 2 * owned * item
            b["send"] += 2 * sum(from_each) * item      # grad and param rows to each owner
            b["recv"] += 2 * sum(to_each) * item        # ... of my matrices, from each rank
            b["back_send"] += sum(to_each) * item       # updated rows back to each rank
            b["back_recv"] += sum(from_each) * item
    return out


def muon_step_bytes(cfg: Config, trainer_cls=Trainer) -> int:
    """The transient of one Muon matrix update (torch.optim.Muon, the largest matrix [m, n],
    m <= n): the fp32 Nesterov update (4mn), the bf16 iterate and the next one (2 x 2mn) and two
    bf16 [m, m] Gram products (2 x 2m^2). 0 without --optimizer muon."""
    _, whole = _buffer_order(cfg, trainer_cls)
    shapes = [p.shape[-2:] for p in whole]
    return max((8 * a * b + 4 * min(a, b) ** 2 for a, b in shapes), default=0)


def weight_copy_bytes(cfg: Config, sep_size: int, mode: str) -> int:
    """bf16 copies of the matmul weights that autocast makes in forward and autograd keeps for
    backward (the router stays fp32; experts are cast explicitly); none under fp32, and none for
    the blocks that activation checkpointing recomputes. The head's copy is not kept: the chunked
    loss (model/gpt.py) computes the head's gradients in forward."""
    if cfg.training.precision != "bf16":
        return 0
    m = cfg.model
    C, D, H, Kv = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_key_value_heads
    attn = C * (H + 2 * Kv) * D + H * D * C
    mlp = (m.num_experts // sep_size) * 3 * C * m.moe_intermediate_size if m.use_moe else 3 * C * m.intermediate_size
    per_layer = {"none": attn + mlp, "selective": attn, "full": 0}[mode]
    return 2 * m.num_layer * per_layer


def activation_bytes(cfg: Config, batch_size: int, sep_size: int, mode: str) -> dict:
    """Bytes of one micro-batch of `batch_size` sequences on one rank (T/sep tokens each):
    {"saved": what autograd keeps from forward to backward, "transient": the largest extra at
    once: one chunk of the loss in forward, or the recomputed block of checkpointing in backward}.

    Per token, a = 2 (bf16 autocast) or 4 (fp32) bytes per element; the residual stream, RMSNorm
    and loss are fp32:
      RMSNorm        8C + 4       its fp32 input and normalised x, and 1/rms
      qkv_proj in    aC           the (autocast) input of the fused projection
      attention      sep 1: a(H + 2Kv)D (qkv output, kept whole by the v view) + aHD + aKvD
                     (q and k after RoPE); sep > 1: aHD + 2aKv'D (q, k, v after the all-to-all,
                     Kv' = kv heads sent) + aHD (output before the all-to-all back)
                     + aHD (output = o_proj input) + 4H (log-sum-exp)
      MLP            aC + 4aI     input; gate|up output (2I), silu(gate), their product
      MoE            4C + 4E + 12k (router input, probs, top-k indices and weights)
                     + 16k (token order) + k(2aC + 4aI) (sorted tokens, expert SwiGLU and
                     output per slot) + 4kC (expert outputs in fp32 for the weighted sum)
                     [+ 4E + 4 with z-loss]
      final          8C + 4 + aC (final norm; the loss's gradient w.r.t. its input, in the
                     matmuls' dtype until backward)
    plus the int64 token ids, 8(T + 1) per sequence, and their flattened copy for the embedding,
    8 T/sep; per micro-batch RoPE's cos/sin, 8 T/sep D, and the loss's fp32 gradient of the head
    weight, 4VC. No [tokens, V] logits are saved: the loss (model/gpt.py) runs over chunks of at
    most CHUNK_TOKENS tokens, each holding its logits (a, then their gradient), their fp32
    log-softmax and, under bf16, an fp32 copy of the logits: (a + 4 + (4 if a = 2)) V per token of
    a chunk (the micro-batch's tokens when fewer), the loss's fp32 input, 4C per token, and under
    bf16 the bf16 copies of the head weight and of that input, 2VC + 2C per token: a transient of
    forward.
    selective keeps only the MLP input (4C) of each MLP; full keeps only each block's input (4C).
    """
    m, T = cfg.model, cfg.training.seq_len
    a = 2 if cfg.training.precision == "bf16" else 4
    C, D, H, Kv, V, k = (m.hidden_size, m.head_dim, m.num_attention_heads, m.num_key_value_heads,
                         m.vocab_size, m.num_experts_per_tok)
    norm = 8 * C + 4
    if sep_size == 1:
        attn = a * C + a * (H + 2 * Kv) * D + a * H * D + a * Kv * D + a * H * D + 4 * H
    else:
        attn = a * C + a * H * D + 2 * a * kv_heads_to_send(Kv, sep_size) * D + 2 * a * H * D + 4 * H
    if m.use_moe:
        I, E = m.moe_intermediate_size, m.num_experts
        mlp = 4 * C + 4 * E + 12 * k + 16 * k + k * (2 * a * C + 4 * a * I) + 4 * k * C
        mlp += 4 * E + 4 if m.moe_z_loss_coeff else 0
    else:
        mlp = a * C + 4 * a * m.intermediate_size
    layer = {"none": 2 * norm + attn + mlp, "selective": norm + attn + 4 * C, "full": 4 * C}[mode]
    tokens = batch_size * (T // sep_size)
    saved = (tokens * (m.num_layer * layer + norm + a * C + 8)
             + batch_size * (T + 1) * 8 + 8 * (T // sep_size) * D + 4 * V * C)
    recompute = {"none": 0, "selective": norm + mlp, "full": 2 * norm + attn + mlp}[mode]
    # The loss chunk lives at the end of forward, the recomputed block(s) in backward: never both.
    # The chunk holds its logits, their fp32 copy and log-softmax; the loss's input (fp32, 4C per token)
    # lives through it, and under bf16 the head's operands' bf16 copies (2VC, 2C per token).
    loss_chunk = (min(tokens, CHUNK_TOKENS) * V * (a + 4 + (4 if a == 2 else 0)) + tokens * 4 * C
                  + (2 * V * C + tokens * 2 * C if a == 2 else 0))
    # At the last chunk's softmax, the gradients `saved` counts are not complete yet: the last
    # chunk's hidden-state gradient is still to come, and with one chunk the head's (4VC) too.
    last = tokens - CHUNK_TOKENS * ((tokens - 1) // CHUNK_TOKENS)
    loss_chunk -= a * C * last + (4 * V * C if tokens <= CHUNK_TOKENS else 0)
    # A recomputed block lives with the gradients of its output and input (fp32, 4C per token each).
    # (The Trainer's autocast keeps no cast cache, which would hold every layer's bf16 weight copy
    # until forward ends, checkpointed layers' too.)
    backward = tokens * (recompute + 8 * C) if recompute else 0
    return {"saved": saved, "transient": max(backward, loss_chunk)}


def _largest_batch(usable: float, fixed: int, per_seq: int) -> int:
    return max(0, int((usable - fixed) // per_seq))


# CUDA's own buffers in torch's allocator (so counted by max_memory_allocated): cuBLAS and cuBLASLt
# keep a workspace per (thread, stream), forward on the main thread and backward on autograd's
# device thread, 32 MiB each on Hopper; cuDNN's attention takes its own. Measured on one H200 (torch
# 2.11, processes of their own): 230 MiB beyond the formulas, the same for every model and
# recomputation mode measured (tests/test_cuda.py, docs/benchmarks.md); planned: 288 MiB.
CUDA_WORKSPACE_BYTES = 288 * 2**20
# The step's small tensors the formulas do not itemise (losses, token counts, the grad norm, the
# step's statistics, the optimizer's step counters): about 1 KiB measured; 64 KiB covers them.
SMALL_TENSORS_BYTES = 2**16


def _breakdown(cfg: Config, world_size: int, trainer_cls=Trainer, device: str = "cuda") -> dict:
    """Everything `plan` prints, as numbers: {"states": {(sep, engine): state bytes}, "engines",
    "engine" (the run's: True/False = ZeRO-1 on/off, or "fsdp"), "step_transient" (Muon),
    (sep, mode): {"act", "copies", "total", "fixed", "per_seq"}} for sep in {1, the run's}."""
    t, sep, zero1 = cfg.training, cfg.parallel.sep_size, cfg.optim.use_distributed_optimizer
    seps = sorted({1, sep})
    # Ranks differ only by padding and shard boundaries: report the largest.
    states = {(s, z): max(state_bytes(_with_sep(cfg, s), world_size, z, trainer_cls), key=lambda b: b["optimizer"])
              for s in seps for z in (True, False)}
    fsdp = cfg.parallel.fsdp and world_size > 1   # (the Trainer's rule: one process shards nothing)
    if fsdp:   # the column "FSDP" and the key "fsdp"
        for s in seps:
            states[s, "fsdp"] = max(fsdp_state_bytes(_with_sep(cfg, s), world_size, trainer_cls),
                                    key=lambda b: b["optimizer"] + b["params"])
    transient = muon_step_bytes(cfg, trainer_cls)   # Muon: one matrix's update at a time
    if fsdp:   # and the gather's buffers (muon.py), all live at its end: the largest rank's
        buffers = fsdp_muon_buffer_bytes(cfg, world_size, trainer_cls)
        transient += max(b["send"] + b["recv"] + b["whole"] for b in buffers)
    out = {"states": states, "seps": seps, "engines": (True, False, "fsdp") if fsdp else (True, False),
           "engine": "fsdp" if fsdp else zero1, "fsdp": fsdp, "step_transient": transient}
    workspace = (CUDA_WORKSPACE_BYTES if device == "cuda" else 0) + SMALL_TENSORS_BYTES
    for s in seps:
        for mode in MODES:
            act = activation_bytes(cfg, t.batch_size, s, mode)
            one, two = (sum(activation_bytes(cfg, b, s, mode).values()) for b in (1, 2))
            per_seq = two - one   # linear in the batch: the rest is per micro-batch (RoPE, loss)
            copies = weight_copy_bytes(cfg, s, "full" if fsdp else mode)   # FSDP: blocks gathered in bf16
            fixed = sum(states[s, out["engine"]].values()) + copies + one - per_seq + out["step_transient"] + workspace
            out[s, mode] = {"act": act, "copies": copies, "fixed": fixed, "per_seq": per_seq,
                            "total": fixed - one + per_seq + sum(act.values())}
    return out


def staging_bytes(cfg: Config, world_size: int, trainer_cls=Trainer) -> list[int]:
    """Host memory --async_save copies the state into at each save, on each global rank (training/
    checkpoint_async.py): its optimizer state and, of each entry of the model's state dict (a tied
    head counts again), its FSDP shard's real rows (--fsdp), its experts (expert parallelism), or,
    for a tensor every rank holds whole, all of it on the one rank that writes it (`owned`)."""
    fsdp, sep = cfg.parallel.fsdp and world_size > 1, cfg.parallel.sep_size
    ep = sep if cfg.model.use_moe else 1
    states = (fsdp_state_bytes(cfg, world_size, trainer_cls) if fsdp else
              state_bytes(cfg, world_size, cfg.optim.use_distributed_optimizer, trainer_cls))
    with torch.device("meta"):
        model = GPT(cfg.model)
    params, tensors = dict(model.named_parameters(remove_duplicate=False)), model.state_dict()
    split = {k for k in tensors if k in params and (fsdp or (ep > 1 and getattr(params[k], "is_expert", False)))}
    plain = {k: t.nbytes for k, t in tensors.items() if k not in split}
    out = []
    for rank in range(world_size):
        mine = sum(plain[k] for k in owned(plain, world_size, rank))
        for k in split:
            p, is_expert = params[k], getattr(params[k], "is_expert", False)
            rows = p.shape[0] // (ep if is_expert else 1)
            if fsdp:   # torch.chunk's rule over the group, as fsdp_state_bytes
                c, r = -(-rows // (world_size // sep if is_expert else world_size)), rank // sep if is_expert else rank
                rows = max(0, min(c, rows - r * c))
            mine += rows * p[0].numel() * p.element_size()
        out.append(mine + states[rank]["optimizer"])
    return out


def peak_bytes(cfg: Config, world_size: int, trainer_cls=Trainer, device: str = "cuda") -> int:
    """The planned peak of one rank of this run (its --sep_size and --activation_checkpointing):
    the total `plan` reports under "this run" (device "cuda"; "cpu": without cuBLAS's workspaces)."""
    run = cfg.parallel.sep_size, cfg.training.activation_checkpointing
    return _breakdown(cfg, world_size, trainer_cls, device)[run]["total"]


def plan(cfg: Config, world_size: int, gpu_memory_gib: float, usable_fraction: float = 0.9,
         trainer_cls=Trainer) -> str:
    """The report `tinytron-plan` prints (raises ConfigError on bad flags)."""
    grad_accum = validate_config(cfg, world_size)
    t, sep, zero1 = cfg.training, cfg.parallel.sep_size, cfg.optim.use_distributed_optimizer
    dp = world_size // sep
    usable = usable_fraction * gpu_memory_gib * GiB
    b = _breakdown(cfg, world_size, trainer_cls)
    seps, states, fsdp, muon = b["seps"], b["states"], b["fsdp"], cfg.optim.optimizer == "muon"
    lines = [f"world {world_size} = dp {dp} x sep {sep}; micro-batch {t.batch_size} x {t.seq_len} tokens, "
             f"grad accumulation {grad_accum}; {t.precision}; GPU {gpu_memory_gib:g} GiB, "
             f"{usable_fraction:.0%} usable = {usable / GiB:.1f} GiB", "",
             f"{'per-rank state (GiB)':<27}" + "".join(f"{f'sep {s}: ZeRO-1 on':>18} {'off':>7}"
                                                      + (f"{'FSDP':>8}" if fsdp else "") for s in seps)]
    rows = (("params", "parameters (fp32)"), ("grads", "gradients (fp32)"),
            ("optimizer", "AdamW m, v + Muon momentum" if muon else "AdamW state (fp32 m, v)"))
    for key, label in rows + ((("in_flight", "FSDP2 buffers in flight"),) if fsdp else ()):
        lines.append(f"  {label:<25}" + "".join(
            "".join(f"{states[s, z].get(key, 0) / GiB:>{w}.3f}" for z, w in zip(b["engines"], (18, 8, 8)))
            for s in seps))
    if muon:
        lines.append(f"  {'Muon step transient':<25}{b['step_transient'] / GiB:>18.3f}  (the largest matrix's update"
                     + (", + FSDP's whole-matrix gather)" if fsdp else ")"))
    if cfg.checkpoint.async_save:   # a copy of what this rank writes to the checkpoint, in host memory
        lines.append(f"  {'--async_save staging':<25}{max(staging_bytes(cfg, world_size, trainer_cls)) / GiB:>18.3f}"
                     "  (host memory, not GPU: the optimizer state and the parameters the rank writes)")
    lines += ["", f"activations per micro-batch of {t.batch_size} sequences (GiB), and the largest "
              f"--batch_size that fits ({'FSDP' if fsdp else 'ZeRO-1 ' + ('on' if zero1 else 'off')})",
              "  sep  checkpointing     saved           transient  bf16 weight copies  largest --batch_size"]
    for s in seps:
        for mode in MODES:
            row, act = b[s, mode], b[s, mode]["act"]
            lines.append(f"  {s:<4} {mode:<15} {act['saved'] / GiB:>7.3f} {act['transient'] / GiB:>19.3f} "
                         f"{row['copies'] / GiB:>19.3f} {_largest_batch(usable, row['fixed'], row['per_seq']):>21}")
    mode = t.activation_checkpointing
    total, fixed, per_seq = (b[sep, mode][k] for k in ("total", "fixed", "per_seq"))
    fit = _largest_batch(usable, fixed, per_seq)
    seqs_per_rank = t.total_batch_size // (t.seq_len * dp)
    valid = [n for n in range(1, min(fit, seqs_per_rank) + 1) if seqs_per_rank % n == 0]
    lines += ["", f"this run (--activation_checkpointing {mode}, --sep_size {sep}): "
              f"{total / GiB:.2f} GiB of {usable / GiB:.1f} usable per rank: "
              + ("fits" if total <= usable else "DOES NOT FIT"),
              f"largest --batch_size that fits: {fit}; the largest dividing the {seqs_per_rank} sequences "
              f"per DP rank and step: {valid[-1] if valid else 'none'}"]
    return "\n".join(lines)


def _with_sep(cfg: Config, sep: int) -> Config:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sep_size=sep))

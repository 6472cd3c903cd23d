"""FLOPs per token of this architecture, a FLOP counter that measures the same quantity on a real
forward + backward (to check the formula), model FLOPs utilisation (MFU), and the step profiler."""

import dataclasses
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from tinytron.model import GPT
from tinytron.model.config import ModelConfig

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by device-name substring, most specific first.
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
    ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("B200", 2250e12),
)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per token at sequence length `seq_len`.

    Forward per token: 2 FLOPs per weight of every matmul (q, k, v, o with GQA widths; the MLP, or
    the router and the top-k experts of an MoE layer; the lm head), plus attention, QK^T and AV,
    2 * 2 * H * D FLOPs per (query, key) pair. With `causal` query t sees t + 1 keys, (T + 1) / 2
    on average, which is what a causal kernel computes; with causal=False every query sees all T
    keys (the convention of PaLM's 6N + 12 L H D T, nanoGPT's estimate, and of
    torch's FlopCounterMode, which counts SDPA as full attention). Backward is 2 x forward for
    every matmul (input and weight gradients); recomputation (activation checkpointing, the flash
    kernels' QK^T in backward) is hardware work, not model FLOPs, and is not counted. Norms,
    softmax, RoPE and elementwise work are not counted (convention of PaLM/Megatron MFU).
    Measured equal to `model_flop_counter` on our GPT (tests/test_profile.py).
    """
    c, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn_weights = c * (h + 2 * kv) * d + h * d * c
    if cfg.use_moe:
        mlp_weights = c * cfg.num_experts + cfg.num_experts_per_tok * 3 * c * cfg.moe_intermediate_size
    else:
        mlp_weights = 3 * c * cfg.intermediate_size
    keys_per_query = (seq_len + 1) / 2 if causal else seq_len
    per_layer = 2 * (attn_weights + mlp_weights) + 4 * h * d * keys_per_query
    forward = cfg.num_layer * per_layer + 2 * c * cfg.vocab_size
    return 3.0 * forward


# ------------------------------------------------------------------------- FLOP counter

def _sdpa_flops(query, key, value) -> int:
    """Full (non-causal) QK^T and AV for shapes query [B, H, Tq, D], key [B, Hkv, Tk, D], value
    [B, Hkv, Tk, Dv]: 2 * B * H * Tq * Tk * (D + Dv). Every query head attends, so a GQA key/value
    head shared by H / Hkv query heads counts once per query head (torch 2.11's own
    `sdpa_flop_count` asserts equal head counts and fails on the CUDA kernels' `enable_gqa` inputs)."""
    b, h, tq, d = query
    tk, dv = key[-2], value[-1]
    return 2 * b * h * tq * tk * (d + dv)


def _attention_forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The four matmuls of the attention backward (dV, dP, dQ, dK) = 2 x forward. torch's formula
    adds a fifth, the flash kernels' recomputation of QK^T: hardware work, not model FLOPs."""
    return 2 * _sdpa_flops(query, key, value)


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """aten._grouped_mm (the MoE experts on CUDA; its backward uses it too): 2 FLOPs per
    multiply-add, the dimension split into groups by `offs` counted once in total:
    [M, K] x [G, K, N] (rows grouped) and [K, M] x [M, N] (contraction grouped: the weight
    gradient) -> 2MKN; [G, M, K] x [K, N] (columns grouped) -> 2MKN; [G, M, K] x [G, K, N] -> 2GMKN."""
    if len(a) == 2 and len(b) == 3:
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 2:
        return 2 * a[1] * a[2] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]


def model_flop_counter() -> FlopCounterMode:
    """`torch.utils.flop_counter.FlopCounterMode` counting model FLOPs as `flops_per_token(...,
    causal=False)` defines them. torch's own formulas count mm / addmm / bmm and the CUDA SDPA
    forward (full attention: it ignores is_causal); this adds what it does not count or counts
    differently:
      * the CPU flash-attention kernels (forward and backward), which it skips (0 FLOPs);
      * GQA inputs (fewer key/value heads than query heads), on which torch 2.11's formula fails;
      * attention backward as 2 x forward, without the flash recomputation of QK^T;
      * aten._grouped_mm (the grouped-GEMM MoE path).
    Use: `with model_flop_counter() as fc: ...; fc.get_total_flops()`."""
    aten = torch.ops.aten
    backward_ops = [aten._scaled_dot_product_flash_attention_for_cpu_backward,
                    aten._scaled_dot_product_flash_attention_backward,
                    aten._scaled_dot_product_efficient_attention_backward,
                    aten._scaled_dot_product_cudnn_attention_backward]
    forward_ops = [aten._scaled_dot_product_flash_attention_for_cpu,
                   aten._scaled_dot_product_flash_attention,
                   aten._scaled_dot_product_efficient_attention,
                   aten._scaled_dot_product_cudnn_attention]
    mapping = {op: _attention_backward_flops for op in backward_ops}
    mapping.update({op: _attention_forward_flops for op in forward_ops})
    if hasattr(aten, "_grouped_mm"):
        mapping[aten._grouped_mm] = _grouped_mm_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def counted_flops_per_token(config: ModelConfig, seq_len: int, batch: int, counter: FlopCounterMode,
                            device: str = "cpu") -> float:
    """FLOPs `counter` sees in one forward + backward (loss: mean token cross-entropy + MoE aux) of
    GPT(config) at block_size `seq_len` on `batch` random sequences of `seq_len` tokens, per token:
    what checks `flops_per_token` (tests/test_profile.py, benchmarks/mfu.py). device "meta" counts
    shapes only, without computing."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(dataclasses.replace(config, block_size=seq_len))
        data = torch.randint(config.vocab_size, (batch, seq_len + 1))
    with counter:
        _, loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
    return counter.get_total_flops() / (batch * seq_len)


# -------------------------------------------------------------------------------------- MFU

def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None when unknown (CPU, unlisted GPU): MFU is then reported n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_second_per_device: float, flops_per_tok: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_second_per_device * flops_per_tok / peak


# -------------------------------------------------------------------------------- profiler

class StepProfiler:
    """torch.profiler over optimizer steps [first, last] of a loop, its Chrome trace written to
    `trace_path`; inactive when `enabled` is False. `before_stop` runs just before the profiler
    stops (e.g. wait for collectives still in flight, so none records into a closed trace).

        with StepProfiler(enabled, (first, last), path) as profiler:
            while ...:
                with profiler.step(step):
                    ...  # the step
    Leaving the outer `with` inside the range (the run ended early) still writes the trace."""

    def __init__(self, enabled: bool, steps: tuple[int, int], trace_path: str, before_stop=None):
        self.enabled, self.steps, self.trace_path, self.before_stop = enabled, steps, trace_path, before_stop
        self._profiler = None

    def __enter__(self):
        return self

    @contextmanager
    def step(self, step: int):
        if self.enabled and step == self.steps[0]:
            self._profiler = torch.profiler.profile()
            self._profiler.__enter__()
        yield
        if self._profiler is not None and step == self.steps[1]:
            self._stop()

    def _stop(self) -> None:
        if self.before_stop is not None:
            self.before_stop()
        self._profiler.__exit__(None, None, None)
        self._profiler.export_chrome_trace(self.trace_path)
        self._profiler = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._profiler is None:
            return
        if exc_type is None:
            self._stop()
        else:  # an error: no waiting on collectives, no trace
            self._profiler.__exit__(exc_type, exc, tb)

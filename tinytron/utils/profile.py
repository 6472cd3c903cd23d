"""FLOPs per token of this architecture and model FLOPs utilisation (MFU)."""

import torch

from tinytron.model.config import ModelConfig

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by device-name substring, most specific first.
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
    ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("B200", 2250e12),
)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per token at sequence length `seq_len`.

    Forward per token: 2 FLOPs per weight of every matmul (q, k, v, o with GQA widths; the MLP, or
    the router and the top-k experts of an MoE layer; the lm head), plus causal attention: query t
    sees t+1 keys, so QK^T and AV cost 2 * 2 * H * D * (T+1)/2 per token on average. Norms,
    softmax, RoPE and elementwise work are not counted (convention of PaLM/Megatron MFU).
    """
    c, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn_weights = c * (h + 2 * kv) * d + h * d * c
    if cfg.use_moe:
        mlp_weights = c * cfg.num_experts + cfg.num_experts_per_tok * 3 * c * cfg.moe_intermediate_size
    else:
        mlp_weights = 3 * c * cfg.intermediate_size
    per_layer = 2 * (attn_weights + mlp_weights) + 2 * h * d * (seq_len + 1)
    forward = cfg.num_layer * per_layer + 2 * c * cfg.vocab_size
    return 3.0 * forward


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None when unknown (CPU, unlisted GPU): MFU is then reported n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_second_per_device: float, flops_per_tok: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_second_per_device * flops_per_tok / peak

"""Model bookkeeping derived from the config alone (no model needs to be built)."""

from tinytron.model.config import ModelConfig


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameters of `GPT(config)`, counted analytically.

    Returns {"total": every parameter once (a tied head shares the embedding),
             "active": those one token uses: with MoE only its top-k experts (plus the router)}.
    Equals sum(p.numel() for p in GPT(config).parameters()) for "total" (tested).
    """
    C, D = config.hidden_size, config.head_dim
    attn = C * (config.num_attention_heads + 2 * config.num_key_value_heads) * D  # fused q, k, v
    attn += config.num_attention_heads * D * C                                   # o_proj
    norms = 2 * C                                                                # attn + mlp norm
    if config.use_moe:
        expert = 3 * C * config.moe_intermediate_size      # gate, up, down
        router = C * config.num_experts
        mlp_total = router + config.num_experts * expert
        mlp_active = router + config.num_experts_per_tok * expert
    else:
        mlp_total = mlp_active = 3 * C * config.intermediate_size
    embed = config.vocab_size * C
    head = 0 if config.tied_lm_head else config.vocab_size * C
    outside_layers = embed + head + C                                            # + final norm
    layer = attn + norms
    return {"total": outside_layers + config.num_layer * (layer + mlp_total),
            "active": outside_layers + config.num_layer * (layer + mlp_active)}

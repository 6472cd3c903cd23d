"""Hugging Face `transformers` interop: export a Tinytron model, import one, init from one.

Dense models map to `LlamaForCausalLM`, MoE models to `MixtralForCausalLM`: both are our
architecture exactly (pre-norm RMSNorm, half-split RoPE, bias-free GQA attention, SwiGLU). Mixtral's
router (softmax over all experts, top-k, renormalise) gives the same experts and weights as ours
(softmax over the k selected logits), and it has no shared experts and no QK-norm (Qwen3-MoE has
QK-norm, so it cannot express our model). Dropout and the router z-loss only act in training and
are not exported (Mixtral has no z-loss).

Load balancing: transformers' Mixtral adds `router_aux_loss_coef * k * E * sum_i fbar_i * Pbar_i`,
fbar / Pbar the mean over ALL layers and all tokens of the batch of our f / P (see MoE), where we
add `alpha * E * sum_i f_i * P_i` per layer and per sequence. `aux_coef_to_hf` sets
router_aux_loss_coef = alpha * L / k: the two are then equal for one layer and one sequence per
batch, equal for every model under uniform routing, and give each layer's router the same
gradient whenever the layers' loads are equal; otherwise transformers pushes each layer towards
the all-layer mean load fbar instead of its own f (docs/evaluation.md, "Load balancing in transformers").

Name and layout mapping, per layer i (ours -> HF `model.layers.{i}.`):
    attn_norm.weight           -> input_layernorm.weight
    attn.qkv_proj.weight       -> self_attn.{q,k,v}_proj.weight     rows [H*D | Hkv*D | Hkv*D]
    attn.o_proj.weight         -> self_attn.o_proj.weight
    mlp_norm.weight            -> post_attention_layernorm.weight
    mlp.gate_up_proj.weight    -> mlp.{gate,up}_proj.weight          rows [I | I]       (dense)
    mlp.down_proj.weight       -> mlp.down_proj.weight                                  (dense)
    mlp.router.weight          -> mlp.gate.weight                    [E, C]              (MoE)
    mlp.gate_up_proj [E,C,2I]  -> mlp.experts.gate_up_proj [E,2I,C]  transposed          (MoE)
    mlp.down_proj    [E,I,C]   -> mlp.experts.down_proj    [E,C,I]   transposed          (MoE)
plus embed.weight -> model.embed_tokens.weight, norm.weight -> model.norm.weight and, untied only,
lm_head.weight -> lm_head.weight. These are the names of the HF modules in memory; `save_pretrained`
may write another on-disk layout (Mixtral: one w1/w2/w3 tensor per expert), which `read_hf_weights`
reads back.

Every function raises ValueError with a one-line message for what cannot be converted.
"""

import json
import os

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights

from tinytron.model import GPT, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mixtral")


# ---------------------------------------------------------------------------------------- config

def to_hf_config(config: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> PretrainedConfig:
    """ModelConfig -> LlamaConfig (dense) or MixtralConfig (MoE) describing the same network."""
    config.validate()
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layer, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tied_lm_head, initializer_range=config.init_std,
        attention_dropout=0.0, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id)
    if not config.use_moe:
        return LlamaConfig(intermediate_size=config.intermediate_size, attention_bias=False,
                           mlp_bias=False, **common)
    return MixtralConfig(intermediate_size=config.moe_intermediate_size,
                         num_local_experts=config.num_experts,
                         num_experts_per_tok=config.num_experts_per_tok,
                         router_aux_loss_coef=aux_coef_to_hf(config), router_jitter_noise=0.0,
                         sliding_window=None, **common)


def aux_coef_to_hf(config: ModelConfig) -> float:
    """Mixtral's router_aux_loss_coef with our load-balancing strength: alpha * L / k (module doc)."""
    return config.moe_aux_loss_coeff * config.num_layer / config.num_experts_per_tok


def from_hf_config(hf_config: PretrainedConfig, source: str = "config.json") -> ModelConfig:
    """A Llama or Mixtral config -> ModelConfig; refuses what our model cannot express."""
    c = hf_config
    kind = c.model_type
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {kind!r} is not supported (only {', '.join(SUPPORTED_MODEL_TYPES)})")
    if c.hidden_act != "silu":
        raise ValueError(f"{source}: hidden_act {c.hidden_act!r} is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(c, flag, False):
            raise ValueError(f"{source}: {flag}=true is not supported (our linears have no bias)")
    if getattr(c, "sliding_window", None) is not None:
        raise ValueError(f"{source}: sliding_window {c.sliding_window} is not supported (full causal attention only)")
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    if heads % kv_heads:
        raise ValueError(f"{source}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    if c.hidden_size % heads:
        raise ValueError(f"{source}: num_attention_heads {heads} does not divide hidden_size {c.hidden_size}")
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim != c.hidden_size // heads:
        raise ValueError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads "
                         f"({c.hidden_size // heads}) is not supported")
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope scaling {rope['rope_type']!r} is not supported (only default RoPE)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
    moe = kind == "mixtral"
    fields = dict(
        block_size=c.max_position_embeddings, vocab_size=c.vocab_size, num_layer=c.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, tied_lm_head=bool(c.tie_word_embeddings),
        rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=c.rms_norm_eps,
        init_std=c.initializer_range, use_moe=moe)
    if moe:
        fields.update(num_experts=c.num_local_experts, num_experts_per_tok=c.num_experts_per_tok,
                      moe_intermediate_size=c.intermediate_size,
                      moe_router_softmax_before_topk=True,  # Mixtral's formulation
                      moe_aux_loss_coeff=c.router_aux_loss_coef * c.num_experts_per_tok / c.num_hidden_layers)
    config = ModelConfig(**fields)
    try:
        config.validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return config


def read_hf_config(hf_dir: str) -> ModelConfig:
    """<hf_dir>/config.json -> ModelConfig."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{hf_dir} is not a Hugging Face model folder: no config.json")
    try:
        hf_config = AutoConfig.from_pretrained(hf_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; report one line
        raise ValueError(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return from_hf_config(hf_config, path)


# --------------------------------------------------------------------------------------- weights

def _name_map(config: ModelConfig) -> tuple[dict, dict, dict]:
    """(renamed, fused, transposed) for `config`:
    renamed:    our name -> HF name, same tensor;
    fused:      our name -> [(HF name, rows)], our tensor is the HF tensors concatenated on dim 0;
    transposed: our name -> HF name, the expert stacks, whose last two dims are swapped."""
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    renamed = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tied_lm_head:
        renamed["lm_head.weight"] = "lm_head.weight"
    fused, transposed = {}, {}
    for i in range(config.num_layer):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        renamed[o + "attn_norm.weight"] = h + "input_layernorm.weight"
        renamed[o + "attn.o_proj.weight"] = h + "self_attn.o_proj.weight"
        renamed[o + "mlp_norm.weight"] = h + "post_attention_layernorm.weight"
        fused[o + "attn.qkv_proj.weight"] = [(h + "self_attn.q_proj.weight", H * D),
                                             (h + "self_attn.k_proj.weight", Hkv * D),
                                             (h + "self_attn.v_proj.weight", Hkv * D)]
        if config.use_moe:
            renamed[o + "mlp.router.weight"] = h + "mlp.gate.weight"
            transposed[o + "mlp.gate_up_proj"] = h + "mlp.experts.gate_up_proj"
            transposed[o + "mlp.down_proj"] = h + "mlp.experts.down_proj"
        else:
            I = config.intermediate_size
            fused[o + "mlp.gate_up_proj.weight"] = [(h + "mlp.gate_proj.weight", I),
                                                    (h + "mlp.up_proj.weight", I)]
            renamed[o + "mlp.down_proj.weight"] = h + "mlp.down_proj.weight"
    return renamed, fused, transposed


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict (all experts) -> the HF module state dict (in-memory names), contiguous
    tensors in the same dtype. A tied head is left out (HF ties it to the embedding itself)."""
    renamed, fused, transposed = _name_map(config)
    out = {hf: state[ours] for ours, hf in renamed.items()}
    for ours, parts in fused.items():
        for (hf, _), t in zip(parts, state[ours].split([rows for _, rows in parts])):
            out[hf] = t.contiguous()
    for ours, hf in transposed.items():
        out[hf] = state[ours].transpose(1, 2).contiguous()
    return out


def _meta_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict of GPT(config), shapes only (no memory, no init)."""
    with torch.device("meta"):
        return GPT(config).state_dict()


def _check_state(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Our state dict holds exactly GPT(config)'s tensors, with their shapes."""
    expected = _meta_state(config)
    if set(state) != set(expected):
        raise ValueError(f"state dict is not GPT(config)'s: missing {sorted(set(expected) - set(state))[:3]}, "
                         f"unexpected {sorted(set(state) - set(expected))[:3]}")
    for name, t in expected.items():
        if state[name].shape != t.shape:
            raise ValueError(f"state dict tensor {name} has shape {tuple(state[name].shape)}, "
                             f"the config implies {tuple(t.shape)}")


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: ModelConfig,
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF module state dict -> our state dict, dtypes kept. Checks that
    every tensor `config` needs is there with the right shape, and that nothing else is (an
    unexpected tensor means a feature we would silently drop). A tied head's lm_head.weight is the
    embedding tensor itself."""
    expected = {k: v.shape for k, v in to_hf_state_dict(_meta_state(config), config).items()}
    for name, shape in expected.items():
        if name not in hf_state:
            raise ValueError(f"{source}: missing tensor {name}")
        if hf_state[name].shape != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(hf_state[name].shape)}, "
                             f"the config implies {tuple(shape)}")
    # Old checkpoints store the RoPE frequencies; a tied model may store its head too.
    ignorable = {"lm_head.weight"} if config.tied_lm_head else set()
    unexpected = sorted(k for k in set(hf_state) - set(expected) - ignorable
                        if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all): "
                         "a feature Tinytron's model does not have")
    renamed, fused, transposed = _name_map(config)
    state = {ours: hf_state[hf] for ours, hf in renamed.items()}
    for ours, parts in fused.items():
        state[ours] = torch.cat([hf_state[hf] for hf, _ in parts])
    for ours, hf in transposed.items():
        state[ours] = hf_state[hf].transpose(1, 2).contiguous()
    if config.tied_lm_head:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def _fuse_mixtral_experts(state: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """In place: Mixtral's on-disk layout (block_sparse_moe.gate, experts.{e}.w1/w2/w3 = gate, down,
    up, each [out, in]) -> the in-memory one (mlp.gate, mlp.experts.gate_up_proj [E, 2I, C],
    mlp.experts.down_proj [E, C, I])."""
    for i in range(config.num_layer):
        old, new = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        if old + "gate.weight" not in state:
            continue

        def pop(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"{source}: missing tensor {name}")
            return state.pop(name)

        state[new + "gate.weight"] = pop(old + "gate.weight")
        experts = [(pop(f"{old}experts.{e}.w1.weight"), pop(f"{old}experts.{e}.w3.weight"),
                    pop(f"{old}experts.{e}.w2.weight")) for e in range(config.num_experts)]
        shapes = {(w1.shape, w3.shape, w2.shape) for w1, w3, w2 in experts}
        if len(shapes) != 1:
            raise ValueError(f"{source}: layer {i} has experts of different shapes {sorted(shapes)}")
        state[new + "experts.gate_up_proj"] = torch.stack([torch.cat([w1, w3]) for w1, w3, _ in experts])
        state[new + "experts.down_proj"] = torch.stack([w2 for _, _, w2 in experts])


def read_hf_weights(hf_dir: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Tensors of <hf_dir>/model.safetensors (or its shards) under their in-memory HF names, fp32."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise ValueError(f"{index} names a missing shard {name}")
        state.update(load_file(path))
    if config.use_moe:
        _fuse_mixtral_experts(state, config, hf_dir)
    return {k: v.float() for k, v in state.items()}


# ------------------------------------------------------------------------------ export / import

def to_hf_model(model_or_state: nn.Module | dict[str, torch.Tensor], config: ModelConfig,
                dtype: torch.dtype = torch.float32, tokenizer=None) -> PreTrainedModel:
    """A transformers CausalLM (on CPU, in `dtype`, eval mode) holding our weights. `model_or_state`
    is a GPT or its FULL state dict (under expert parallelism pass
    `checkpoint.full_model_state_dict(model)`). Token ids (bos / eos / pad = eos when the tokenizer
    has none) come from `tokenizer` when given, else they stay unset."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    ids = {}
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    _check_state(state, config)
    hf_state = to_hf_state_dict({k: v.detach().to("cpu", dtype) for k, v in state.items()}, config)
    with no_init_weights():  # every weight is overwritten below: skip the random init
        hf_model = AutoModelForCausalLM.from_config(to_hf_config(config, **ids), dtype=dtype)
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    tied_head = ["lm_head.weight"] if config.tied_lm_head else []
    if sorted(missing) != tied_head or unexpected:  # our name map and transformers disagree
        raise ValueError(f"transformers {type(hf_model).__name__} expects other tensors: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf_model.tie_weights()
    return hf_model.eval()


def export_hf(model_or_state: nn.Module | dict[str, torch.Tensor], config: ModelConfig, out_dir: str,
              dtype: torch.dtype = torch.float32, tokenizer=None, max_shard_size: str = "2GB") -> str:
    """Write a transformers model folder: config.json, model.safetensors (sharded with an index past
    `max_shard_size`), generation_config.json and, when `tokenizer` (a transformers tokenizer) is
    given, the tokenizer files. Every file gets the mode a new file gets (0666 less the umask).
    Returns out_dir."""
    hf_model = to_hf_model(model_or_state, config, dtype, tokenizer)
    hf_model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    # safetensors writes each file as a temporary file of mode 0600, renamed into place: readable
    # by its owner only, unlike every other file of the folder (and of a model one shares).
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(out_dir):
        if name.endswith(".safetensors"):
            os.chmod(os.path.join(out_dir, name), 0o666 & ~umask)
    return out_dir


def load_hf(hf_dir: str) -> tuple[GPT, ModelConfig]:
    """A Llama / Mixtral folder -> (GPT in fp32 on CPU, eval mode, its ModelConfig)."""
    config = read_hf_config(hf_dir)
    state = from_hf_state_dict(read_hf_weights(hf_dir, config), config, hf_dir)
    model = GPT(config)
    model.load_state_dict(state)
    return model.eval(), config


# Fields that change the function the weights compute; the others (block_size, dropout, init,
# loss coefficients) may differ between the HF folder and the model being initialised.
_ARCH_FIELDS = ("vocab_size", "num_layer", "num_attention_heads", "num_key_value_heads",
                "hidden_size", "tied_lm_head", "rope_theta", "norm_eps", "use_moe")
_DENSE_FIELDS = ("intermediate_size",)
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


def read_hf_state(hf_dir: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of a Llama / Mixtral folder as a full state dict of GPT(config) (fp32, all
    experts), for `--init_from_hf` (tinytron.training.weights.init_from_hf copies it into a model).
    The architecture in config.json must equal `config`'s."""
    theirs = read_hf_config(hf_dir)
    for name in _ARCH_FIELDS + (_MOE_FIELDS if config.use_moe else _DENSE_FIELDS):
        if getattr(theirs, name) != getattr(config, name):
            raise ValueError(f"--init_from_hf {hf_dir}: --{name} {getattr(config, name)} differs from "
                             f"config.json ({getattr(theirs, name)})")
    return from_hf_state_dict(read_hf_weights(hf_dir, config), config, hf_dir)


def is_hf_dir(path: str) -> bool:
    """A transformers model folder (a Tinytron run folder also has a config.json: ours has no
    "model_type")."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False

"""Model hyper-parameters. Lives in `model` so the model can be used without the training stack."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    block_size: int = 1024          # maximum sequence length the model is used with
    vocab_size: int = 50304         # GPT-2's 50257 rounded up to a multiple of 128
    num_layer: int = 12
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    hidden_size: int = 1024
    intermediate_size: int = 4096
    dropout: float = 0.0
    tied_lm_head: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Mixture of Experts (every layer's MLP becomes an MoE layer when use_moe is set).
    use_moe: bool = False
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 768
    moe_router_softmax_before_topk: bool = False
    moe_aux_loss_coeff: float = 0.01
    moe_z_loss_coeff: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ValueError with a one-line, flag-named message for an inconsistent config."""
        # The MoE fields are checked on dense models too: a bad value is a typo whichever model it is for.
        for name in ("vocab_size", "num_layer", "num_attention_heads", "num_key_value_heads", "hidden_size",
                     "intermediate_size", "block_size", "rope_theta", "norm_eps", "init_std", "num_experts",
                     "moe_intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} {getattr(self, name)} must be positive")
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)} must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout {self.dropout} must be in [0, 1)")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"--num_experts_per_tok {self.num_experts_per_tok} must be in "
                             f"[1, --num_experts {self.num_experts}]")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"--hidden_size {self.hidden_size} is not divisible by "
                             f"--num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"--num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"--num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} (--hidden_size / --num_attention_heads) "
                             "must be even for RoPE")

"""Model hyperparameters: one dataclass, validated on construction, with named presets."""

import dataclasses
import difflib
import math
from dataclasses import dataclass

ATTN_IMPLS = ("auto", "flash", "sdpa", "math")


@dataclass
class ModelConfig:
    """Shape of a MiniMind-style decoder-only transformer.

    The defaults are MiniMind2-small; prefer `ModelConfig.from_preset(name)`.
    """

    vocab_size: int = 6400
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    # None derives the usual SwiGLU width: 8/3 of hidden keeps the FFN parameter count equal
    # to a 4x GELU MLP; rounding up to 64 keeps the matmuls tile-friendly.
    intermediate_size: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Qwen3's q/k norm: an RMSNorm over head_dim on each head's queries and keys, before RoPE.
    qk_norm: bool = False
    # Qwen2's biases on the q, k and v projections (none on o_proj or the FFN); zero at initialisation.
    qkv_bias: bool = False
    dropout: float = 0.0
    # Mixture of experts replaces every block's FFN when use_moe is set.
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 2
    num_shared_experts: int = 1
    moe_aux_loss_coef: float = 0.1
    attn_impl: str = "auto"
    init_std: float = 0.02

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of channels")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, rms_norm_eps and init_std must be positive")
        if self.use_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                                 f"[1, num_experts={self.num_experts}]")
            if self.num_shared_experts < 0 or self.moe_aux_loss_coef < 0:
                raise ValueError("num_shared_experts and moe_aux_loss_coef must be non-negative")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "ModelConfig") -> "ModelConfig":
        """The config of these fields; errors start with source (the file they were read from)."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected an object of ModelConfig fields, got {type(values).__name__}")
        known = [field.name for field in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"{source}: unknown key '{key}'{hint}; valid keys: {', '.join(known)}")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


_MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
            moe_aux_loss_coef=0.1)

PRESETS: dict[str, dict] = {
    # Small enough to run every training stage in minutes on two CPU cores.
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256),
    # MiniMind2-small, ~26M parameters.
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, max_seq_len=512),
    # MiniMind2, ~104M parameters.
    "base": dict(hidden_size=768, num_layers=16, num_heads=8, num_kv_heads=2, max_seq_len=512),
    # MiniMind-3 (jingyaogong/minimind, 2026), ~64M parameters: Qwen3-style; FFN ceil(pi * hidden / 64) * 64.
    "minimind3": dict(hidden_size=768, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=2432,
                      rms_norm_eps=1e-6, qk_norm=True, max_seq_len=768),
}
PRESETS["moe"] = {**PRESETS["small"], **_MOE}
PRESETS["tiny-moe"] = {**PRESETS["tiny"], **_MOE}

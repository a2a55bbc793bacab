"""Model configuration and size presets (presets are data, looked up by name).

Field names follow Hugging Face ``LlamaConfig`` so export writes them unchanged into ``config.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder.

    vocab_size: rows of the embedding; set from the tokenizer at run time unless given explicitly.
    hidden_size: model width d.
    intermediate_size: SwiGLU inner width (Llama uses ~8/3·d rounded to a multiple of 256).
    num_hidden_layers: number of decoder blocks.
    num_attention_heads: query heads; head_dim = hidden_size // num_attention_heads.
    num_key_value_heads: key/value heads (grouped-query attention when < num_attention_heads).
    max_position_embeddings: longest sequence the rotary tables are meant for.
    rope_theta: rotary base frequency.
    rms_norm_eps: epsilon inside RMSNorm.
    tie_word_embeddings: share the input embedding with ``lm_head``.
    initializer_range: std of the normal init for linear and embedding weights.
    """

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


# Parameter counts in the comments are for vocab_size=32000 (``num_params(get_preset(name))``);
# the run config sets vocab_size from the tokenizer, which moves the embedding part only.
PRESETS: dict[str, dict] = {
    # 0.09M non-embedding (2.1M in all at vocab 32k): unit tests.
    "debug": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True),
    # 2.95M non-embedding (+2.1M tied embedding at vocab 8k; 11.1M at 32k): the CPU demo.
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True),
    # 109.5M (84.9M non-embedding)
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=True),
    # 341.1M (308.3M non-embedding)
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True),
    # 672.1M (622.9M non-embedding)
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    # 1.04B (973M non-embedding; Llama-3.2-1B shape)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
               rope_theta=500000.0, tie_word_embeddings=True),
    # 2.92B (2.82B non-embedding; Llama-3.2-3B shape)
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=4096,
               rope_theta=500000.0, tie_word_embeddings=True),
    # 6.74B (6.48B non-embedding; Llama-2-7B shape)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    # 13.0B (12.7B non-embedding; Llama-2-13B shape)
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    # 69.0B (68.5B non-embedding; Llama-2-70B shape, grouped-query attention with 8 kv heads)
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def num_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Exact parameter count of ``LlamaForCausalLM(cfg)`` (checked against the module in tests)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    kv = cfg.num_key_value_heads * hd
    attn = d * d * 2 + d * kv * 2  # q, o; k, v (no biases)
    mlp = 3 * d * f
    norms = 2 * d
    per_layer = attn + mlp + norms
    body = cfg.num_hidden_layers * per_layer + d  # + final norm
    if non_embedding:
        return body
    emb = cfg.vocab_size * d
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return body + emb + head


def flops_per_token(cfg: ModelConfig, seq_len: int, recompute: bool = False) -> float:
    """Training FLOPs per token (forward + backward), counting matmuls only.

    Dense matmuls: 6 · (non-embedding matmul params + lm_head params) per token — 2 for the forward
    multiply-add, 4 for the two backward matmuls. Attention scores and values: 6 · 2 · L · T · d per
    token counted *without* the causal half (the PaLM/Megatron convention, so MFU figures compare
    with theirs). Activation recomputation adds one more forward (2 instead of 0 extra) when
    ``recompute`` is set; MFU conventionally excludes it (that is "HFU"), and callers say which.
    """
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    kv = cfg.num_key_value_heads * hd
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    matmul_params = cfg.num_hidden_layers * per_layer + cfg.vocab_size * d  # lm_head
    attn = 2 * cfg.num_hidden_layers * seq_len * d  # QK^T and AV, multiply-add per token
    mult = 8 if recompute else 6
    return mult * matmul_params + mult * attn

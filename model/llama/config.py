"""Llama's shape and size presets (presets are data, looked up by name).

Field names follow Hugging Face ``LlamaConfig`` so export writes them unchanged into ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..common.config import ModelConfig


@dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    """A Llama-family decoder (Llama 2/3, Mistral without sliding windows): the shared fields of
    ``ModelConfig``, head_dim = hidden_size / num_attention_heads, no biases, SwiGLU, RMSNorm."""

    family: ClassVar[str] = "llama"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        super().__post_init__()


# Parameter counts in the comments are for vocab_size=32000 (``num_params``); the run config sets
# vocab_size from the tokenizer, which moves the embedding part only.
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

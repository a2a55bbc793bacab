"""Qwen3 (dense)'s shape and size presets. Field names follow Hugging Face ``Qwen3Config``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..common.config import ModelConfig


@dataclass(frozen=True)
class Qwen3Config(ModelConfig):
    """A Qwen3 dense decoder: Llama's layout plus an RMSNorm over each query and key head (qk-norm) before
    the rotary embedding, and an explicit ``head_dim`` (Qwen3-0.6B: 16 heads of 128 on a width of 1024).
    Defaults are Qwen3's: rotary base 1e6, RMSNorm epsilon 1e-6; tied embeddings up to 4B, untied above.

    head_dim: width of one attention head (q_proj has num_attention_heads × head_dim outputs).
    """

    family: ClassVar[str] = "qwen3"

    vocab_size: int = 151936
    max_position_embeddings: int = 40960
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    head_dim: int = 128


# Shapes of the released Qwen3 dense models (their config.json files) and CPU-sized ones for tests and
# demos. Counts at vocab 151,936 (the released tokenizer's) are in the comments; as for every family, the
# run config sets vocab_size from the tokenizer unless given.
PRESETS: dict[str, dict] = {
    # 0.12M non-embedding: unit tests (head_dim 32 x 4 heads = 128 != hidden 64, as in the real shapes)
    "qwen3-debug": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True),
    # 3.4M non-embedding: CPU runs
    "qwen3-tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True),
    # 0.60B (0.44B non-embedding): Qwen3-0.6B
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # 1.72B (1.41B non-embedding): Qwen3-1.7B
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # 4.02B (3.63B non-embedding): Qwen3-4B
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # 8.19B (6.95B non-embedding): Qwen3-8B, untied
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}

"""``ModelConfig``: the fields every decoder family shares, named as in Hugging Face ``config.json``.

A family's config class (``model/<family>/config.py``) is a frozen dataclass derived from this one: it
adds its own fields and defaults and says how ``head_dim`` is found. ``to_dict`` includes the family's
name, so a dict written into a checkpoint or an import directory says which class reads it back
(``model.registry.config_from_dict``; a dict without it is Llama's, as every dict written before
families existed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer.

    vocab_size: rows of the embedding; set from the tokenizer at run time unless given explicitly.
    hidden_size: model width d.
    intermediate_size: SwiGLU inner width.
    num_hidden_layers: number of decoder blocks.
    num_attention_heads: query heads.
    num_key_value_heads: key/value heads (grouped-query attention when < num_attention_heads).
    max_position_embeddings: longest sequence the rotary tables are meant for.
    rope_theta: rotary base frequency.
    rms_norm_eps: epsilon inside RMSNorm.
    tie_word_embeddings: share the input embedding with ``lm_head``.
    initializer_range: std of the normal init for linear and embedding weights.
    """

    family: ClassVar[str] = ""

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

    @property
    def head_dim(self) -> int:
        """Width of one attention head (families with an explicit ``head_dim`` field override this)."""
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        """{"family": ..., every field}: what checkpoints and import directories record."""
        return {"family": self.family, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        family = d.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"a {family!r} model config cannot be read as {cls.family!r}")
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown {cls.family} model config keys: {', '.join(unknown)} (valid: "
                             f"{', '.join(cls.field_names())})")
        return cls(**d)

"""The model's shape for a run: a preset, explicit shape fields, or a Hugging Face checkpoint to continue
from (``model.init_from_hf``), with the vocabulary sized from the tokenizer."""

from __future__ import annotations

from model import ModelConfig, get_preset

from .config import ConfigError, RunConfig


def resolve_model_config(cfg: RunConfig, tokenizer_vocab: int,
                         init_from: tuple[ModelConfig, dict] | None = None) -> tuple[ModelConfig, dict | None]:
    """(model config, initial weights or None). ``init_from``: the (config, weights) read from
    ``model.init_from_hf`` (``trainer.hf.importer.load_hf_weights``). Shape errors are ConfigErrors naming
    the ``model.*`` key."""
    m = cfg.model
    shape = {k: getattr(m, k) for k in ModelConfig.__dataclass_fields__ if getattr(m, k, None) is not None}
    if m.init_from_hf:
        if shape:
            raise ConfigError("model: init_from_hf takes the shape from the checkpoint; drop the shape fields "
                              f"({', '.join(sorted(shape))})")
        assert init_from is not None, "read model.init_from_hf first"
        mcfg, state = init_from
        if mcfg.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.init_from_hf vocab {mcfg.vocab_size} < tokenizer vocab {tokenizer_vocab} (the "
                              "tokenizer's ids, added tokens included, must fit the model's embedding)")
        return mcfg, state
    shape.setdefault("vocab_size", tokenizer_vocab)
    if shape["vocab_size"] < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size {shape['vocab_size']} < tokenizer vocab {tokenizer_vocab}")
    try:
        return (get_preset(m.preset, **shape) if m.preset else ModelConfig(**shape)), None
    except (TypeError, ValueError) as e:  # unknown preset, a missing field, heads not dividing the width
        raise ConfigError(f"model: {e}") from None

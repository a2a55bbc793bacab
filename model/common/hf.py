"""What a family's Hugging Face adapter is (``HFAdapter``), and checks of ``config.json`` that several
families share. Pure dictionaries: ``transformers`` is imported only by the methods that return its
classes, so the model package imports without it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import ModelConfig


def _same(name: str) -> str | None:
    return name


@dataclass(frozen=True)
class HFAdapter:
    """How a family maps onto a ``transformers`` architecture.

    architectures: the ``config.json`` ``architectures`` entries this family imports; the first is the one
        export writes and the ``transformers`` class verification loads.
    model_types: the ``config.json`` ``model_type`` values it imports (the first is export's).
    config_class: the ``transformers`` configuration class export builds ``config.json`` with.
    to_hf_config: lmforge config -> the architecture's ``config.json`` fields (special ids and dtype are
        added by export).
    from_hf_config: a ``config.json`` dict and where it came from -> lmforge config; ValueError naming the key
        and why for anything this family's module cannot represent.
    to_hf_name / from_hf_name: parameter names both ways (identity where the module keeps HF's names;
        from_hf_name returns None for tensors to skip, such as old exports' rotary ``inv_freq``).
    to_hf_tensors: (lmforge name, shape) -> [(HF name, HF shape, slice)] where one lmforge tensor is several
        on disk (Qwen3-MoE's stacked experts: ``slice`` = (index, first row, end row) of the stacked tensor;
        None = the whole tensor under ``to_hf_name``). None: one tensor each.
    from_hf_stacked: an on-disk name that is a slice of a stacked lmforge tensor -> (lmforge name, index,
        which part), else None (the inverse of ``to_hf_tensors``, for import). None: no stacked tensors.
    """

    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    config_class: str
    to_hf_config: Callable[[ModelConfig], dict]
    from_hf_config: Callable[[dict, str], ModelConfig]
    to_hf_name: Callable[[str], str] = _same
    from_hf_name: Callable[[str], str | None] = _same
    to_hf_tensors: Callable | None = None
    from_hf_stacked: Callable | None = None

    def hf_tensors(self, name: str, shape) -> list[tuple[str, tuple, object]]:
        """[(HF name, HF shape, slice or None)] of one lmforge tensor (``to_hf_tensors``)."""
        if self.to_hf_tensors is None:
            return [(self.to_hf_name(name), tuple(shape), None)]
        return self.to_hf_tensors(name, shape)

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    def transformers_model_class(self):
        import transformers

        return getattr(transformers, self.architecture)

    def transformers_config_class(self):
        import transformers

        return getattr(transformers, self.config_class)


def skip_rotary_buffers(name: str) -> str | None:
    """``from_hf_name`` for modules named as in HF: old exports carried the derived ``inv_freq``."""
    return None if name.endswith("rotary_emb.inv_freq") else name


def rope_theta(d: dict, where: str, default: float = 10000.0) -> float:
    """The rotary base of a config.json (transformers 4's top-level ``rope_theta`` or 5's
    ``rope_parameters``); ValueError for any scaled rotary type (only the default one is implemented)."""
    rope_params = d.get("rope_parameters") or {}
    for spec in (rope_params, d.get("rope_scaling") or {}):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"{where}: rope scaling {kind!r} is not supported (only the default rotary)")
    return float(d.get("rope_theta", rope_params.get("rope_theta", default)))


def refuse(d: dict, where: str, *, true_keys: tuple[str, ...] = (), act: str = "silu") -> None:
    """ValueError if any of ``true_keys`` is set true, or ``hidden_act`` is not ``act``."""
    for key in true_keys:
        if d.get(key):
            raise ValueError(f"{where}: {key}={d[key]!r} is not supported")
    if d.get("hidden_act", act) != act:
        raise ValueError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (need {act!r})")


def require(d: dict, key: str, where: str):
    if key not in d:
        raise ValueError(f"{where}: missing required key {key!r}")
    return d[key]


def decoder_hf_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` fields of ``ModelConfig``'s shared fields, as Llama-style architectures name them
    (SwiGLU: ``hidden_act`` "silu"); a family adds its own."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
    )


def decoder_fields_from_hf(d: dict, where: str, max_position_embeddings: int = 2048) -> dict:
    """``ModelConfig``'s shared fields read from a ``config.json`` dict (the architecture's defaults where a
    key is absent); ValueError naming a missing required key, a scaled rotary or another activation."""
    refuse(d, where)
    heads = require(d, "num_attention_heads", where)
    return dict(
        vocab_size=require(d, "vocab_size", where), hidden_size=require(d, "hidden_size", where),
        intermediate_size=require(d, "intermediate_size", where),
        num_hidden_layers=require(d, "num_hidden_layers", where), num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        max_position_embeddings=d.get("max_position_embeddings", max_position_embeddings),
        rope_theta=rope_theta(d, where), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=float(d.get("initializer_range", 0.02)),
    )

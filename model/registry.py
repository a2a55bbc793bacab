"""The model families, and everything the rest of lmforge asks about a model.

A family is one package ``model/<name>/`` whose ``__init__.py`` defines ``FAMILY = Family(...)``: its config
class and size presets, its ``nn.Module``, its tensor-parallel plan and its Hugging Face adapter. The
registry finds every such package by itself (a new folder is all it takes: docs/adding-a-model-family.md),
so the trainer, checkpoint readers, export, import, verification and the parameter and FLOP counts ask here
and never name a family.

Preset names are unique across families, so a preset says its family (``model: {preset: qwen3-0.6b}``); a
run config or a checkpoint that names neither family nor a family's preset means Llama, as every config
and checkpoint written before families existed.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from dataclasses import dataclass, fields

import torch
from torch import nn

from .common.config import ModelConfig
from .common.hf import HFAdapter

DEFAULT_FAMILY = "llama"
# How tensor parallelism treats a module (Hugging Face's tp_plan styles, by other names): "column" splits a
# linear layer's outputs, "row" its inputs (partial outputs summed by an all-reduce), "replicated" keeps it
# whole on every rank, and "replicated_with_grad_allreduce" keeps it whole but sums its gradient over the
# tensor-parallel ranks, for weights applied to sharded activations (Qwen3's per-head q/k norms see only
# this rank's heads).
TP_STYLES = ("column", "row", "replicated", "replicated_with_grad_allreduce")


def plan_regex(pattern: str) -> str:
    """A ``tp_plan`` pattern as a regular expression over module names: ``*`` is one name component (a layer
    index), everything else literal."""
    return re.escape(pattern).replace(r"\*", r"[^.]+")


@dataclass(frozen=True)
class Family:
    """name: the ``model.family`` value. config_class: a frozen dataclass derived from ``ModelConfig``.
    model_class: the ``nn.Module`` built as ``model_class(config)`` (a ``model.common.CausalLM``).
    presets: preset name -> config fields (names unique across families). tp_plan: module-name pattern
    (``*`` = any layer index) -> one of ``TP_STYLES``, for every ``nn.Linear`` and ``nn.Embedding`` of the
    module (other modules with weights, the norms, are "replicated" unless listed). hf: the Hugging Face
    adapter, or None for a family with no ``transformers`` counterpart (no import or export then)."""

    name: str
    config_class: type[ModelConfig]
    model_class: type[nn.Module]
    presets: dict[str, dict]
    tp_plan: dict[str, str]
    hf: HFAdapter | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.config_class.family != self.name:
            raise ValueError(f"family {self.name!r}: {self.config_class.__name__}.family is "
                             f"{self.config_class.family!r}")
        bad = {k: v for k, v in self.tp_plan.items() if v not in TP_STYLES}
        if bad:
            raise ValueError(f"family {self.name!r}: tp_plan styles must be one of {TP_STYLES}: {bad}")

    def field_names(self) -> list[str]:
        return [f.name for f in fields(self.config_class)]

    def config(self, preset: str | None = None, **overrides) -> ModelConfig:
        """A config from a preset (or the class defaults) and field overrides; ValueError naming an unknown
        preset or field."""
        base = {}
        if preset is not None:
            if preset not in self.presets:
                raise ValueError(f"unknown {self.name} preset {preset!r}; choose one of {', '.join(self.presets)}")
            base = self.presets[preset]
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown {self.name} config field(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(self.field_names())}")
        return self.config_class(**{**base, **overrides})

    def build(self, cfg: ModelConfig) -> nn.Module:
        return self.model_class(cfg)


@functools.cache
def families() -> dict[str, Family]:
    """Every family package under ``model/`` (those whose ``__init__`` defines ``FAMILY``), by name."""
    found: dict[str, Family] = {}
    presets: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(_package_path()), key=lambda i: i.name):
        if not info.ispkg or info.name == "common" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        fam = getattr(module, "FAMILY", None)
        if not isinstance(fam, Family):
            continue
        if fam.name in found:
            raise ValueError(f"model family {fam.name!r} is defined twice")
        for p in fam.presets:
            if p in presets:
                raise ValueError(f"preset {p!r} is defined by families {presets[p]!r} and {fam.name!r}")
            presets[p] = fam.name
        found[fam.name] = fam
    # The default family first, the rest by name.
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != DEFAULT_FAMILY, kv[0])))


def _package_path() -> list[str]:
    return list(importlib.import_module(__package__).__path__)


def get_family(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise ValueError(f"unknown model family {name!r}; lmforge has: {', '.join(fams)}")
    return fams[name]


def family_of(cfg: ModelConfig) -> Family:
    return get_family(cfg.family)


def all_presets() -> dict[str, Family]:
    """Preset name -> its family, over every family."""
    return {p: fam for fam in families().values() for p in fam.presets}


def resolve_family(family: str | None, preset: str | None) -> Family:
    """The family a (family, preset) pair means: the named one (which must own the preset), else the
    preset's, else the default (Llama). ValueError naming the unknown family or preset."""
    if family is not None:
        fam = get_family(family)
        if preset is not None and preset not in fam.presets:
            owner = all_presets().get(preset)
            raise ValueError(f"preset {preset!r} is not a {fam.name} preset"
                             + (f" (it is {owner.name}'s)" if owner else "")
                             + f"; {fam.name} presets: {', '.join(fam.presets)}")
        return fam
    if preset is not None:
        owners = all_presets()
        if preset not in owners:
            raise ValueError(f"unknown model preset {preset!r}; presets: "
                             + "; ".join(f"{f.name}: {', '.join(f.presets)}" for f in families().values()))
        return owners[preset]
    return get_family(DEFAULT_FAMILY)


def build_config(family: str | None = None, preset: str | None = None, **overrides) -> ModelConfig:
    return resolve_family(family, preset).config(preset, **overrides)


def get_preset(name: str, **overrides) -> ModelConfig:
    """The config of preset ``name`` (any family) with field overrides."""
    return build_config(None, name, **overrides)


def config_from_dict(d: dict) -> ModelConfig:
    """A config from ``ModelConfig.to_dict()`` output (a checkpoint's ``model_config``, an import's
    ``lmforge_init.json``); a dict without ``family`` is Llama's."""
    return get_family(d.get("family", DEFAULT_FAMILY)).config_class.from_dict(d)


def build_model(cfg: ModelConfig) -> nn.Module:
    return family_of(cfg).build(cfg)


@functools.lru_cache(maxsize=64)
def _meta_model(cfg: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return build_model(cfg)


def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every state-dict name of the model with its full shape, built on the meta device (no memory): what
    a checkpoint or an export of this config must hold."""
    return {k: v.shape for k, v in _meta_model(cfg).state_dict().items()}


def _active_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose weights a token multiplies by only in part, or that are not ``nn.Linear`` (a family's
    experts and router): each says how many of its weights one token uses (``active_params_per_token``)."""
    return [m for m in model.modules() if hasattr(m, "active_params_per_token")]


def num_params(cfg: ModelConfig, non_embedding: bool = False, active: bool = False) -> int:
    """Parameters of the model (a tied head counted once); ``non_embedding``: without the input embedding
    and an untied output head; ``active``: those one token uses (a Mixture of Experts' k of E experts)."""
    model = _meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    if active:
        for m in _active_modules(model):
            total += m.active_params_per_token() - sum(p.numel() for p in m.parameters(recurse=False))
    if non_embedding:
        total -= model.model.embed_tokens.weight.numel()
        if not cfg.tie_word_embeddings:
            total -= model.lm_head.weight.numel()
    return total


def dense_flops_per_token(cfg: ModelConfig, recompute: bool = False) -> float:
    """Training FLOPs per token of the weight matmuls alone: 6 · (weights of every ``nn.Linear``, the output
    head included, and the active weights of a family's non-Linear matmul modules: a Mixture of Experts'
    router and its k experts); 8 instead of 6 with ``recompute``. ``flops_per_token`` without attention."""
    model = _meta_model(cfg)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    matmul += sum(m.active_params_per_token() for m in _active_modules(model))
    return (8 if recompute else 6) * matmul


def flops_per_token(cfg: ModelConfig, seq_len: int, recompute: bool = False) -> float:
    """Training FLOPs per token (forward + backward), counting matmuls only, of the weights a token uses
    (a Mixture of Experts' router and its k experts: MFU counts active FLOPs): the **PaLM convention**, the
    figure that compares with published MFU.

    Dense matmuls: 6 · (weights of every ``nn.Linear``, the output head included, and the active weights
    of a family's non-Linear matmul modules) per token: 2 for the forward multiply-add, 4 for the two
    backward matmuls (``dense_flops_per_token``). Attention scores and values: 6 · 2 · L · T · H·D per token
    (H query heads of width D), counted *without* the causal half and over the whole row whatever the
    document masking (the PaLM/Megatron convention, so MFU figures compare with theirs; ``attention_flops``
    counts what causal, per-document attention computes).
    Activation recomputation adds one more forward (8 instead of 6) when ``recompute`` is set; MFU
    conventionally excludes it (that is "HFU"), and callers say which.
    """
    attn = 2 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    mult = 8 if recompute else 6
    return dense_flops_per_token(cfg, recompute) + mult * attn


def attention_flops(cfg: ModelConfig, span_sq_sum: float, tokens: float, causal: bool = True,
                    recompute: bool = False) -> float:
    """Training FLOPs of attention scores and values over ``tokens`` tokens whose attention spans (the
    documents of each packed row under document masking, else each whole row) have lengths l_i with
    ``span_sq_sum`` = Σ l_i² (and Σ l_i = ``tokens``).

    Each (query, key) pair a head attends costs 2·D FLOPs for the score q·k and 2·D for its share of the
    weighted sum of values, forward; the backward costs twice the forward (×3 in all, ×4 with
    ``recompute``): 12 · L · H · D per pair (16 with recomputation). ``causal``: the pairs of the lower
    triangle, diagonal included, l_i(l_i + 1)/2 per span per head: the **causal_doc** convention, the work
    a kernel that skips masked pairs does (flash attention and per-span SDPA; flex block masks to block
    granularity; a dense mask computes every pair of the row and discards the masked ones).
    ``causal=False``: l_i² pairs per span, which for one span of T per row is ``flops_per_token``'s
    attention term · T.

    ``dense_flops_per_token(cfg) · tokens + attention_flops(cfg, Σl², tokens)`` is the model's training
    FLOPs as causal, per-document attention computes them (``causal_doc_flops``).
    """
    pairs = (span_sq_sum + tokens) / 2 if causal else span_sq_sum
    per_pair = (8 if recompute else 6) * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    return per_pair * pairs


def causal_doc_flops(cfg: ModelConfig, span_sq_sum: float, tokens: float, recompute: bool = False) -> float:
    """Training FLOPs of ``tokens`` tokens in the causal_doc convention: the weight matmuls plus attention
    counted as causal, per-document attention computes it (``attention_flops``); ``flops_per_token`` ·
    ``tokens`` is the same work in the PaLM convention, never less."""
    return dense_flops_per_token(cfg, recompute) * tokens + attention_flops(cfg, span_sq_sum, tokens, True, recompute)


def hf_family(config_json: dict, where: str) -> Family:
    """The family a Hugging Face ``config.json`` belongs to, by its ``architectures`` entry (else its
    ``model_type``); ValueError naming what was found and what lmforge imports."""
    archs = config_json.get("architectures") or []
    mt = config_json.get("model_type")
    with_hf = [f for f in families().values() if f.hf is not None]
    for fam in with_hf:
        if any(a in fam.hf.architectures for a in archs) or (not archs and mt in fam.hf.model_types):
            return fam
    supported = "; ".join(f"{', '.join(f.hf.architectures)} ({f.name})" for f in with_hf)
    found = f"architectures {archs}" if archs else f"model_type {mt!r}"
    raise ValueError(f"{where}: {found} is not supported; lmforge imports {supported}")

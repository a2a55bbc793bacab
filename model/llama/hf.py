"""Llama <-> Hugging Face ``LlamaForCausalLM`` (and ``MistralForCausalLM`` without sliding windows, which
is the same architecture): config.json both ways; parameter names are HF's already."""

from __future__ import annotations

from ..common.hf import HFAdapter, refuse, require, rope_theta, skip_rotary_buffers
from .config import LlamaConfig


def to_hf_config(cfg: LlamaConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range, attention_bias=False, mlp_bias=False,
    )


def from_hf_config(d: dict, where: str) -> LlamaConfig:
    if d.get("model_type") == "mistral" and d.get("sliding_window") is not None:
        raise ValueError(f"{where}: sliding_window={d['sliding_window']} attention is not supported")
    refuse(d, where, true_keys=("attention_bias", "mlp_bias"))
    heads = require(d, "num_attention_heads", where)
    hidden = require(d, "hidden_size", where)
    head_dim = d.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hidden} (lmforge's Llama "
                         "derives head_dim from hidden_size)")
    return LlamaConfig(
        vocab_size=require(d, "vocab_size", where), hidden_size=hidden,
        intermediate_size=require(d, "intermediate_size", where),
        num_hidden_layers=require(d, "num_hidden_layers", where), num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        max_position_embeddings=d.get("max_position_embeddings", 2048), rope_theta=rope_theta(d, where),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=float(d.get("initializer_range", 0.02)),
    )


ADAPTER = HFAdapter(architectures=("LlamaForCausalLM", "MistralForCausalLM"), model_types=("llama", "mistral"),
                    config_class="LlamaConfig", to_hf_config=to_hf_config, from_hf_config=from_hf_config,
                    from_hf_name=skip_rotary_buffers)

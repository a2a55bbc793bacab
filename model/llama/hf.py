"""Llama <-> Hugging Face ``LlamaForCausalLM`` (and ``MistralForCausalLM`` without sliding windows, which
is the same architecture): config.json both ways; parameter names are HF's already."""

from __future__ import annotations

from ..common.hf import HFAdapter, decoder_fields_from_hf, decoder_hf_config, refuse, skip_rotary_buffers
from .config import LlamaConfig


def to_hf_config(cfg: LlamaConfig) -> dict:
    return {**decoder_hf_config(cfg), "head_dim": cfg.head_dim, "attention_bias": False, "mlp_bias": False}


def from_hf_config(d: dict, where: str) -> LlamaConfig:
    if d.get("model_type") == "mistral" and d.get("sliding_window") is not None:
        raise ValueError(f"{where}: sliding_window={d['sliding_window']} attention is not supported")
    refuse(d, where, true_keys=("attention_bias", "mlp_bias"))
    fields = decoder_fields_from_hf(d, where)
    head_dim = d.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    if head_dim * fields["num_attention_heads"] != fields["hidden_size"]:
        raise ValueError(f"{where}: head_dim {head_dim} x {fields['num_attention_heads']} heads != hidden_size "
                         f"{fields['hidden_size']} (lmforge's Llama derives head_dim from hidden_size)")
    return LlamaConfig(**fields)


ADAPTER = HFAdapter(architectures=("LlamaForCausalLM", "MistralForCausalLM"), model_types=("llama", "mistral"),
                    config_class="LlamaConfig", to_hf_config=to_hf_config, from_hf_config=from_hf_config,
                    from_hf_name=skip_rotary_buffers)

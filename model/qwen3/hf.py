"""Qwen3 <-> Hugging Face ``Qwen3ForCausalLM``: config.json both ways; parameter names are HF's already."""

from __future__ import annotations

from ..common.hf import HFAdapter, decoder_fields_from_hf, decoder_hf_config, refuse, skip_rotary_buffers
from .config import Qwen3Config


def to_hf_config(cfg: Qwen3Config) -> dict:
    return {**decoder_hf_config(cfg), "head_dim": cfg.head_dim, "attention_bias": False, "use_sliding_window": False}


def from_hf_config(d: dict, where: str) -> Qwen3Config:
    refuse(d, where, true_keys=("attention_bias", "use_sliding_window"))
    fields = decoder_fields_from_hf(d, where, max_position_embeddings=32768)
    head_dim = d.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    return Qwen3Config(**fields, head_dim=head_dim)


ADAPTER = HFAdapter(architectures=("Qwen3ForCausalLM",), model_types=("qwen3",), config_class="Qwen3Config",
                    to_hf_config=to_hf_config, from_hf_config=from_hf_config, from_hf_name=skip_rotary_buffers)

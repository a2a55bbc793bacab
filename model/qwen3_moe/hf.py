"""Qwen3-MoE <-> Hugging Face ``Qwen3MoeForCausalLM``: config.json both ways, and the experts' weights.

On disk a Qwen3-MoE checkpoint names every expert's matrices (``mlp.experts.{e}.gate_proj.weight``,
``up_proj``, ``down_proj``: what the released models hold and what transformers 4 and 5 both load; 5 stacks
them into ``gate_up_proj``/``down_proj`` when loading). lmforge's module stacks them as transformers 5 does in
memory, so export splits each stacked tensor into its experts' (``to_hf_tensors``) and import stacks them
back (``from_hf_tensors``): the same numbers, bit for bit, under either set of names.
"""

from __future__ import annotations

import re

from ..common.hf import HFAdapter, decoder_fields_from_hf, decoder_hf_config, refuse, skip_rotary_buffers
from .config import Qwen3MoeConfig

_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def to_hf_config(cfg: Qwen3MoeConfig) -> dict:
    return {**decoder_hf_config(cfg), "head_dim": cfg.head_dim, "attention_bias": False, "use_sliding_window": False,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": cfg.decoder_sparse_step, "mlp_only_layers": list(cfg.mlp_only_layers),
            "router_aux_loss_coef": cfg.router_aux_loss_coef, "output_router_logits": False}


def from_hf_config(d: dict, where: str) -> Qwen3MoeConfig:
    refuse(d, where, true_keys=("attention_bias", "use_sliding_window"))
    fields = decoder_fields_from_hf(d, where, max_position_embeddings=32768)
    head_dim = d.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    return Qwen3MoeConfig(
        # transformers 5 writes num_local_experts (its attribute map's name for num_experts); 4 num_experts
        **fields, head_dim=head_dim, num_experts=int(d.get("num_experts", d.get("num_local_experts", 128))),
        num_experts_per_tok=int(d.get("num_experts_per_tok", 8)),
        moe_intermediate_size=int(d.get("moe_intermediate_size", 768)),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)), decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
        router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)))


def to_hf_tensors(name: str, shape) -> list[tuple[str, tuple, object]]:
    """lmforge name and shape -> [(HF name, HF shape, how to take it from the lmforge tensor)]: a stacked
    expert tensor becomes one (or, gate_up, two) tensors per expert; anything else is itself."""
    m = _STACKED.match(name)
    if not m:
        return [(name, tuple(shape), None)]
    prefix, kind = m.groups()
    E, rows, cols = shape
    if kind == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", (rows, cols), (e, 0, rows)) for e in range(E)]
    half = rows // 2
    return [item for e in range(E) for item in (
        (f"{prefix}.{e}.gate_proj.weight", (half, cols), (e, 0, half)),
        (f"{prefix}.{e}.up_proj.weight", (half, cols), (e, half, rows)))]


def from_hf_stacked(hf_name: str) -> tuple[str, int, str] | None:
    """An on-disk per-expert name -> (lmforge stacked name, expert, which matrix); None for other names."""
    m = _PER_EXPERT.match(hf_name)
    if not m:
        return None
    prefix, e, kind = m.groups()
    return (f"{prefix}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}", int(e), kind)


ADAPTER = HFAdapter(architectures=("Qwen3MoeForCausalLM",), model_types=("qwen3_moe",),
                    config_class="Qwen3MoeConfig", to_hf_config=to_hf_config, from_hf_config=from_hf_config,
                    from_hf_name=skip_rotary_buffers, to_hf_tensors=to_hf_tensors, from_hf_stacked=from_hf_stacked)

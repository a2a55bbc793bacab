"""lmforge model: a plain-PyTorch Llama-family decoder (no DeepSpeed, no torch.distributed)."""

from .config import PRESETS, ModelConfig, flops_per_token, get_preset, num_params
from .llama import IGNORE_INDEX, LlamaForCausalLM, document_attention_mask, document_spans

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "LlamaForCausalLM",
    "ModelConfig",
    "document_attention_mask",
    "document_spans",
    "flops_per_token",
    "get_preset",
    "num_params",
]

"""lmforge models: plain-PyTorch decoders (no DeepSpeed, no torch.distributed), one package per family.

=====================  =====================================================================================
``registry.py``        the families and what the rest of lmforge asks about a model: configs from a family,
                       preset and overrides, the module, parameter and FLOP counts, the family of a Hugging
                       Face ``config.json``
``common/``            the blocks every family shares: RMSNorm, rotary, the attention kernel with its
                       document-mask forms, SwiGLU, the chunked-loss head, ``ModelConfig``, ``CausalLM``
``llama/``             Llama 2/3 (and Mistral without sliding windows)
``qwen3/``             Qwen3 dense
=====================  =====================================================================================

Each family package holds its config class and presets (``config.py``), its module with Hugging Face's
names and its tensor-parallel plan (``model.py``) and its Hugging Face adapter (``hf.py``); adding one is a
new folder (docs/adding-a-model-family.md).
"""

import lmforge.common  # noqa: F401  (first: a missing dependency below is reported in one line)

from .common import IGNORE_INDEX, CausalLM, Docs, DocSpans, ModelConfig
from .registry import (
    DEFAULT_FAMILY,
    Family,
    all_presets,
    attention_flops,
    build_config,
    build_model,
    causal_doc_flops,
    config_from_dict,
    dense_flops_per_token,
    families,
    family_of,
    flops_per_token,
    get_family,
    get_preset,
    hf_family,
    num_params,
    parameter_shapes,
    resolve_family,
)

__all__ = [
    "DEFAULT_FAMILY", "IGNORE_INDEX", "CausalLM", "DocSpans", "Docs", "Family", "ModelConfig", "all_presets",
    "attention_flops", "build_config", "build_model", "causal_doc_flops", "config_from_dict",
    "dense_flops_per_token", "families", "family_of", "flops_per_token", "get_family",
    "get_preset", "hf_family", "num_params", "parameter_shapes", "resolve_family",
]

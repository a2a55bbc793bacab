"""The Llama family: Llama 2/3-shaped decoders (and Mistral without sliding windows).

``config.py`` the shape and size presets, ``model.py`` the module (HF names) and its tensor-parallel plan,
``hf.py`` the Hugging Face adapter. ``FAMILY`` is what the registry (``model/registry.py``) finds.
"""

from ..registry import Family
from .config import PRESETS, LlamaConfig
from .hf import ADAPTER
from .model import TP_PLAN, LlamaForCausalLM

FAMILY = Family(name="llama", config_class=LlamaConfig, model_class=LlamaForCausalLM, presets=PRESETS,
                tp_plan=TP_PLAN, hf=ADAPTER,
                description="Llama 2/3 shapes: GQA, SwiGLU, RMSNorm, rotary, tied or untied head")

__all__ = ["FAMILY", "PRESETS", "LlamaConfig", "LlamaForCausalLM"]

"""The Qwen3 dense family: Llama's layout plus per-head RMSNorm on queries and keys and an explicit head_dim.

``config.py`` the shape and presets (``qwen3-debug``, ``qwen3-tiny`` for CPUs; the released 0.6B, 1.7B, 4B
and 8B shapes), ``model.py`` the module (HF names) and its tensor-parallel plan, ``hf.py`` the Hugging Face
adapter. ``FAMILY`` is what the registry (``model/registry.py``) finds.
"""

from ..registry import Family
from .config import PRESETS, Qwen3Config
from .hf import ADAPTER
from .model import TP_PLAN, Qwen3ForCausalLM

FAMILY = Family(name="qwen3", config_class=Qwen3Config, model_class=Qwen3ForCausalLM, presets=PRESETS,
                tp_plan=TP_PLAN, hf=ADAPTER,
                description="Qwen3 dense: Llama's layout + qk-norm, explicit head_dim, rope theta 1e6")

__all__ = ["FAMILY", "PRESETS", "Qwen3Config", "Qwen3ForCausalLM"]

"""The Qwen3-MoE family: Qwen3's attention and, in its sparse layers, a top-k Mixture of Experts.

``config.py`` the shape and presets (``qwen3-moe-debug``, ``qwen3-moe-tiny`` for CPUs; an OLMoE-1B-7B-like
shape and Qwen3-30B-A3B), ``model.py`` the module (HF names; the reference experts, the router, the
auxiliary losses), ``hf.py`` the Hugging Face adapter (per-expert weights on disk). ``FAMILY`` is what the
registry (``model/registry.py``) finds.
"""

from ..registry import Family
from .config import PRESETS, Qwen3MoeConfig
from .hf import ADAPTER
from .model import TP_PLAN, Qwen3MoeForCausalLM

FAMILY = Family(name="qwen3_moe", config_class=Qwen3MoeConfig, model_class=Qwen3MoeForCausalLM, presets=PRESETS,
                tp_plan=TP_PLAN, hf=ADAPTER,
                description="Qwen3-MoE: Qwen3's attention + top-k softmax-routed SwiGLU experts, dropless")

__all__ = ["FAMILY", "PRESETS", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"]

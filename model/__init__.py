"""lmforge model: a plain-PyTorch Llama-family decoder (no DeepSpeed, no torch.distributed).

``config.py`` holds the shape (``ModelConfig``, HF ``LlamaConfig`` field names), the size presets and
the parameter and FLOP counts; ``llama.py`` the module, readable in one sitting.
"""

from .config import PRESETS, ModelConfig, flops_per_token, get_preset, num_params
from .llama import IGNORE_INDEX, DocSpans, LlamaForCausalLM, parameter_shapes

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "DocSpans",
    "LlamaForCausalLM",
    "ModelConfig",
    "flops_per_token",
    "get_preset",
    "num_params",
    "parameter_shapes",
]

"""Blocks every model family shares, written once: RMSNorm (``norm``), rotary embeddings (``rotary``), the
attention kernel with its document-mask forms (``attention``), the SwiGLU MLP (``mlp``), the chunked-loss
head (``loss``), the config base class (``config``) and the top-level ``CausalLM`` (``causal_lm``: the
output head, the loss, the initialisation, and the contract the trainer relies on)."""

from .attention import Docs, DocSpans, attend
from .causal_lm import CausalLM
from .config import ModelConfig
from .loss import IGNORE_INDEX, LMHead
from .mlp import SwiGLUMLP
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary

__all__ = ["IGNORE_INDEX", "CausalLM", "DocSpans", "Docs", "LMHead", "ModelConfig", "RMSNorm", "RotaryEmbedding",
           "SwiGLUMLP", "apply_rotary", "attend"]

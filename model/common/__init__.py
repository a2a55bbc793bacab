"""Blocks every model family shares, written once: RMSNorm (``norm``), rotary embeddings (``rotary``), the
attention kernel with its document-mask forms (``attention``), the SwiGLU MLP (``mlp``), the attention
module, pre-norm decoder layer and decoder stack with Hugging Face's names and their tensor-parallel plan
(``decoder``), the chunked-loss head (``loss``), the config base class (``config``) and the top-level
``CausalLM`` (``causal_lm``: the output head, the loss, the initialisation, and the contract the trainer
relies on)."""

from .attention import Docs, DocSpans, attend
from .causal_lm import CausalLM
from .config import ModelConfig
from .decoder import DECODER_TP_PLAN, Attention, Decoder, DecoderLayer
from .loss import IGNORE_INDEX, LMHead
from .mlp import SwiGLUMLP
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary

__all__ = ["DECODER_TP_PLAN", "IGNORE_INDEX", "Attention", "CausalLM", "Decoder", "DecoderLayer", "DocSpans", "Docs",
           "LMHead", "ModelConfig", "RMSNorm", "RotaryEmbedding", "SwiGLUMLP", "apply_rotary", "attend"]

"""A Llama-family decoder as a plain ``nn.Module``: no collectives, no DeepSpeed, no training policy.

Module and parameter names are those of Hugging Face ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.gate_proj``, ``model.norm``, ``lm_head``), so that
export is a copy and the tensor-parallel plan reads like transformers' own. It is the shared blocks of
``model/common`` put together: grouped-query attention with rotary embeddings, a SwiGLU MLP, pre-norm
layers with RMSNorm; the loss and the initialisation are ``CausalLM``'s.
"""

from __future__ import annotations

from ..common import DECODER_TP_PLAN, Attention, CausalLM, Decoder, DecoderLayer, RMSNorm, SwiGLUMLP
from .config import LlamaConfig


class LlamaForCausalLM(CausalLM):
    """``model`` (embed_tokens, layers of self_attn/mlp/input_layernorm/post_attention_layernorm, norm) +
    ``lm_head``."""

    def __init__(self, cfg: LlamaConfig):
        def norm():
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

        def layer():
            return DecoderLayer(Attention(cfg), SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size), norm(), norm())

        super().__init__(cfg, Decoder(cfg, layer, norm))


# Tensor parallelism (``model/common/decoder.py``): q/k/v and gate/up split by output columns, o/down by
# input rows; the embedding, the output head and every norm replicated. The trainer hands this plan to
# DeepSpeed's AutoTP and checks after ``deepspeed.initialize`` that it was done exactly so
# (``trainer/parallel/tp_plan.py``; tests/test_parallel_parity.py on 2 ranks).
TP_PLAN = dict(DECODER_TP_PLAN)

"""A Qwen3 dense decoder as a plain ``nn.Module``, with Hugging Face ``Qwen3ForCausalLM``'s module names.

It is Llama's layout (``model/llama/model.py``) with two differences, both in the attention: each query and
key head is RMS-normalised over its ``head_dim`` (``q_norm``, ``k_norm``, weights shared by the heads) before
the rotary embedding, and ``head_dim`` is a field of its own (q_proj: d -> H·D, which need not equal d). The
blocks are ``model/common``'s; the loss and the initialisation are ``CausalLM``'s.
"""

from __future__ import annotations

from ..common import DECODER_TP_PLAN, Attention, CausalLM, Decoder, DecoderLayer, RMSNorm, SwiGLUMLP
from .config import Qwen3Config


class Qwen3ForCausalLM(CausalLM):
    """``model`` (embed_tokens, layers of self_attn with q_norm/k_norm, mlp, input_layernorm,
    post_attention_layernorm, norm) + ``lm_head``."""

    def __init__(self, cfg: Qwen3Config):
        def norm():
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

        def layer():
            return DecoderLayer(Attention(cfg, qk_norm=True), SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size),
                                norm(), norm())

        super().__init__(cfg, Decoder(cfg, layer, norm))


# Tensor parallelism: the decoder's (``model/common/decoder.py``; the same as transformers' own
# ``Qwen3Config.base_model_tp_plan``), plus q_norm/k_norm. They act on one head at a time with weights shared
# by all heads: each rank keeps them whole and applies them to the heads it holds, so its gradient is a
# partial sum over its own heads and is summed over the tensor-parallel ranks (without that sum the ranks'
# copies drift apart from the first update on).
TP_PLAN = {
    **DECODER_TP_PLAN,
    "model.layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
    "model.layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
}

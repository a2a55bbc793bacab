"""A Qwen3 dense decoder as a plain ``nn.Module``, with Hugging Face ``Qwen3ForCausalLM``'s module names.

It is Llama's layout (``model/llama/model.py``) with two differences, both in the attention: each query
and key head is RMS-normalised over its ``head_dim`` (``q_norm``, ``k_norm``) before the rotary embedding,
and ``head_dim`` is a field of its own (q_proj: d -> H·D, which need not equal d). Blocks shared with other
families are in ``model/common``.

Shapes: B batch, T sequence, d hidden, H query heads, K kv heads, D head_dim, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common import CausalLM, Docs, RMSNorm, RotaryEmbedding, SwiGLUMLP, apply_rotary, attend
from .config import Qwen3Config


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)  # per head: the same weights for every head
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, docs: Docs = None) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism a rank holds a slice of the heads (model/common/attention.py).
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        y = self.attention(q, k, v, docs)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attention(self, q, k, v, docs: Docs = None) -> torch.Tensor:
        """The attention kernel alone (a trainer may replace it on an instance: sequence parallelism)."""
        return attend(q, k, v, docs)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, docs: Docs = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, docs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, input_ids, position_ids=None, docs: Docs = None) -> torch.Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, docs)
        return self.norm(x)


class Qwen3ForCausalLM(CausalLM):
    """``model`` (Qwen3Model) + ``lm_head``; forward, loss and initialisation: ``model/common/causal_lm.py``."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__(cfg, Qwen3Model(cfg))


# Tensor parallelism (DeepSpeed AutoTP): as Llama's (model/llama/model.py), and the same as transformers'
# own ``Qwen3Config.base_model_tp_plan``. q_norm/k_norm act on one head at a time with weights shared by all
# heads: each rank keeps them whole and applies them to the heads it holds, so its gradient is a partial sum
# over its own heads and is summed over the tensor-parallel ranks (without that sum the ranks' copies drift
# apart from the first update on).
TP_PLAN = {
    "model.embed_tokens": "replicated",
    "model.layers.*.self_attn.q_proj": "column",
    "model.layers.*.self_attn.k_proj": "column",
    "model.layers.*.self_attn.v_proj": "column",
    "model.layers.*.self_attn.o_proj": "row",
    "model.layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
    "model.layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
    "model.layers.*.mlp.gate_proj": "column",
    "model.layers.*.mlp.up_proj": "column",
    "model.layers.*.mlp.down_proj": "row",
    "lm_head": "replicated",
}

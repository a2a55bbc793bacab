"""A Llama-family decoder as a plain ``nn.Module``: no collectives, no DeepSpeed, no training policy.

Module and parameter names are those of Hugging Face ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.gate_proj``, ``model.norm``, ``lm_head``), so that
export is a copy and DeepSpeed AutoTP's sharding rules apply unchanged (``TP_PLAN`` states what they do).
The blocks shared with other families (RMSNorm, rotary, the attention kernel, SwiGLU, the loss head) are
in ``model/common``.

Shapes: B batch, T sequence, d hidden, H query heads, K kv heads, D head_dim, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common import CausalLM, Docs, RMSNorm, RotaryEmbedding, SwiGLUMLP, apply_rotary, attend
from .config import LlamaConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, docs: Docs = None) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism a rank holds a slice of the heads (model/common/attention.py).
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        y = self.attention(q, k, v, docs)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attention(self, q, k, v, docs: Docs = None) -> torch.Tensor:
        """The attention kernel alone; a trainer may replace it on an instance (sequence parallelism
        exchanges q/k/v around it)."""
        return attend(q, k, v, docs)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, docs: Docs = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, docs)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
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


class LlamaForCausalLM(CausalLM):
    """``model`` (LlamaModel) + ``lm_head``; forward, loss and initialisation: ``model/common/causal_lm.py``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg, LlamaModel(cfg))


# Tensor parallelism, by module name (``*`` = any layer index): q/k/v and gate/up are split by output
# columns (each rank holds whole heads and a slice of the MLP), o/down by input rows (their partial outputs
# are summed by an all-reduce); the embedding, the output head and every norm (whose inputs are whole on
# every rank) are replicated. The trainer hands this plan to DeepSpeed's AutoTP and checks after
# ``deepspeed.initialize`` that it was done exactly so (``trainer/parallel/tp_plan.py``;
# tests/test_parallel_parity.py on 2 ranks).
TP_PLAN = {
    "model.embed_tokens": "replicated",
    "model.layers.*.self_attn.q_proj": "column",
    "model.layers.*.self_attn.k_proj": "column",
    "model.layers.*.self_attn.v_proj": "column",
    "model.layers.*.self_attn.o_proj": "row",
    "model.layers.*.mlp.gate_proj": "column",
    "model.layers.*.mlp.up_proj": "column",
    "model.layers.*.mlp.down_proj": "row",
    "lm_head": "replicated",
}

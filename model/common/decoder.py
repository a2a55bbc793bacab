"""The decoder blocks every family here is built from, with Hugging Face's module names: grouped-query
self-attention with rotary embeddings (optionally RMS-normalising each query and key head, Qwen3's
qk-norm), the pre-norm decoder layer, and the decoder stack (``embed_tokens``, ``layers``, ``norm``).

A family composes them in its ``model.py`` (its attention variant, MLP and norm), or writes its own where
it differs; what the trainer relies on is only the layout ``causal_lm.py`` documents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import Docs, attend
from .config import ModelConfig
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary


class Attention(nn.Module):
    """q/k/v/o projections (no biases unless ``bias``), rotary embeddings, and the attention kernel.
    ``qk_norm``: an RMSNorm over each query and key head (weights shared by the heads) before the rotary
    embedding, as Qwen3 does."""

    def __init__(self, cfg: ModelConfig, qk_norm: bool = False, bias: bool = False):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qk_norm = qk_norm

    def forward(self, x, cos, sin, docs: Docs = None) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism a rank holds a slice of the heads (attention.py).
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        y = self.attention(q, k, v, docs)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attention(self, q, k, v, docs: Docs = None) -> torch.Tensor:
        """The attention kernel alone; a trainer may replace it on an instance (sequence parallelism
        exchanges q/k/v around it)."""
        return attend(q, k, v, docs)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm

    def forward(self, x, cos, sin, docs: Docs = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, docs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The embedding, ``num_hidden_layers`` layers made by ``layer()``, the final norm made by ``norm()``,
    and the rotary tables; returns the final hidden states."""

    def __init__(self, cfg: ModelConfig, layer: Callable[[], nn.Module], norm: Callable[[], nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer() for _ in range(cfg.num_hidden_layers))
        self.norm = norm()
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


# Tensor parallelism of the blocks above (``Family.tp_plan`` form): q/k/v and the MLP's gate/up are split by
# output columns (each rank holds whole heads and a slice of the MLP), o/down by input rows (their partial
# outputs summed by an all-reduce); the embedding and the output head are replicated, and so is every norm
# whose input is whole on every rank. A family whose module adds weights states them on top (Qwen3's
# per-head q/k norms).
DECODER_TP_PLAN = {
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

"""A Qwen3-MoE decoder as a plain ``nn.Module``, with Hugging Face ``Qwen3MoeForCausalLM``'s (transformers 5)
module and parameter names: Qwen3's attention (qk-norm, explicit head_dim) and, in each sparse layer,
``mlp.gate.weight`` (E, d) — the router — and ``mlp.experts.gate_up_proj`` (E, 2I, d) /
``mlp.experts.down_proj`` (E, d, I) — the experts' SwiGLU weights stacked (gate rows first). Dense layers
(``mlp_only_layers``, ``decoder_sparse_step``) keep Qwen3's SwiGLU (``mlp.gate_proj`` ...).

Routing (``TopKRouter``): softmax over the router logits in fp32, the top k, renormalised to sum to 1 when
``norm_topk_prob``: transformers' ``Qwen3MoeTopKRouter``. Dropless: every token reaches its k experts.

The experts here (``Experts.forward``) are the reference implementation: tokens sorted by expert, one
SwiGLU per expert over its contiguous slice, weighted and summed back in token order. It is what runs on one
device and on CPUs; expert parallelism replaces the block from outside (DeepSpeed AutoEP) and must match it.

Auxiliary losses (``CausalLM`` forward with labels adds them): the load-balancing loss of transformers'
``load_balancing_loss_func`` over all sparse layers at once (E · Σ_e f_e · P_e, f the share of top-k
assignments, P the mean router probability of expert e), times ``router_aux_loss_coef``; and the router
z-loss (mean over tokens of logsumexp(logits)², averaged over layers) times ``router_z_loss_coef``. The
values and each layer's expert load are kept (``moe_stats``) for the trainer to log.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common import DECODER_TP_PLAN, Attention, CausalLM, Decoder, DecoderLayer, RMSNorm, SwiGLUMLP
from .config import Qwen3MoeConfig


class TopKRouter(nn.Module):
    """``weight`` (E, d): logits = x·Wᵀ; returns (logits, top-k weights in x's dtype, top-k expert ids)."""

    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def active_params_per_token(self) -> int:
        """Every token is scored against every expert: all of the router's weights (FLOP counts)."""
        return self.weight.numel()

    def forward(self, x: torch.Tensor):
        logits = F.linear(x, self.weight)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, top_w.to(logits.dtype), top_i


class Experts(nn.Module):
    """E SwiGLU experts, weights stacked: ``gate_up_proj`` (E, 2I, d), ``down_proj`` (E, d, I)."""

    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        E, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, i))

    def active_params_per_token(self) -> int:
        """Expert weights one token multiplies by (k of the E experts): what its FLOPs count."""
        return self.top_k * (self.gate_up_proj[0].numel() + self.down_proj[0].numel())

    def forward(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """x (N, d), top_i / top_w (N, k) -> (N, d): Σ_j w_j · expert_{i_j}(x)."""
        k = top_i.shape[1]
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order within
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // k
        xs = x[token]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = F.linear(xs[start:start + n], self.gate_up_proj[e])
                gate, up = h.chunk(2, dim=-1)
                out[start:start + n] = F.linear(F.silu(gate) * up, self.down_proj[e])
                start += n
        out = out * top_w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, out)


class SparseMoeBlock(nn.Module):
    """``gate`` (the router) and ``experts``; keeps the last forward's router logits (``router_logits``, (N, E))
    for the model's auxiliary losses and load statistics. A block that replaces it from outside (DeepSpeed
    AutoEP, ``trainer/parallel/experts.py``) provides the same attribute."""

    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.gate = TopKRouter(cfg)
        self.experts = Experts(cfg)
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        logits, top_w, top_i = self.gate(flat)
        keep_router_logits(self, logits)
        return self.experts(flat, top_i, top_w).reshape(B, T, d)


def keep_router_logits(block: nn.Module, logits: torch.Tensor) -> None:
    """``block.router_logits = logits`` for the model's losses, except while autograd runs a backward pass:
    there the forward is activation checkpointing's recomputation, whose logits no loss reads, and keeping
    them would hold the recomputed layer's activations alive until the next step (measured: ~300 MiB for the
    CPU preset, ~15 GiB per GPU for 30b-a3b at 4096 tokens)."""
    if torch._C._current_graph_task_id() == -1:
        block.router_logits = logits


def load_balancing_loss(logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (no padding mask): over all layers' tokens at once,
    E · Σ_e (share of top-k assignments to e) · (mean router probability of e)."""
    probs = torch.cat([torch.softmax(g.float(), dim=-1) for g in logits])  # (L·N, E)
    top_i = torch.topk(probs, top_k, dim=-1).indices
    share = torch.zeros(num_experts, device=probs.device).index_add_(
        0, top_i.reshape(-1), torch.ones(top_i.numel(), device=probs.device)) / probs.shape[0]
    return num_experts * torch.sum(share * probs.mean(dim=0))


def router_z_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)², averaged over the layers."""
    return torch.stack([torch.logsumexp(g.float(), dim=-1).square().mean() for g in logits]).mean()


class Qwen3MoeForCausalLM(CausalLM):
    """``model`` (embed_tokens, layers of self_attn with q_norm/k_norm, mlp — a ``SparseMoeBlock`` or a
    dense SwiGLU —, input_layernorm, post_attention_layernorm, norm) + ``lm_head``."""

    def __init__(self, cfg: Qwen3MoeConfig):
        def norm():
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

        index = iter(range(cfg.num_hidden_layers))

        def layer():
            i = next(index)
            mlp = SparseMoeBlock(cfg) if cfg.is_sparse(i) else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)
            return DecoderLayer(Attention(cfg, qk_norm=True), mlp, norm(), norm())

        self.stats: dict[str, torch.Tensor] = {}
        super().__init__(cfg, Decoder(cfg, layer, norm))

    @torch.no_grad()
    def init_module_weights(self, name: str, module: nn.Module) -> None:
        super().init_module_weights(name, module)
        std = self.config.initializer_range
        if isinstance(module, TopKRouter):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            # down_proj adds to the residual stream: GPT-2's std / sqrt(2L), as for dense layers
            nn.init.normal_(module.down_proj, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    def moe_blocks(self) -> list[nn.Module]:
        """The sparse layers' MLPs: ``SparseMoeBlock``, or what replaced it (same ``router_logits``)."""
        return [layer.mlp for i, layer in enumerate(self.model.layers) if self.config.is_sparse(i)]

    def forward(self, input_ids, labels=None, position_ids=None, doc_spans=None, attn_mask=None, loss_tokens=None):
        out = super().forward(input_ids, labels, position_ids, doc_spans, attn_mask, loss_tokens)
        blocks = self.moe_blocks()
        if labels is None or not blocks:
            return out
        cfg = self.config
        logits = [b.router_logits for b in blocks]
        for b in blocks:  # the losses below hold what they need; the blocks need not keep it past this step
            b.router_logits = None
        aux = load_balancing_loss(logits, cfg.num_experts, cfg.num_experts_per_tok)
        z = router_z_loss(logits)
        with torch.no_grad():  # the router's own choice: top k of the same fp32 softmax
            top = [torch.topk(torch.softmax(g, dim=-1, dtype=torch.float32), cfg.num_experts_per_tok).indices
                   for g in logits]
            load = torch.stack([torch.bincount(t.reshape(-1), minlength=cfg.num_experts) for t in top])
            self.stats = {"lm_loss": out.detach(), "aux_loss": aux.detach(), "z_loss": z.detach(),
                          "expert_load": load}  # (sparse layers, E) assignments this micro-batch
        if cfg.router_aux_loss_coef:
            out = out + cfg.router_aux_loss_coef * aux
        if cfg.router_z_loss_coef:
            out = out + cfg.router_z_loss_coef * z
        return out


# Tensor parallelism: Qwen3's plan for the attention and the dense layers. The sparse blocks are not split
# by tensor parallelism (expert parallelism distributes them); their router and experts are replicated.
TP_PLAN = {
    **DECODER_TP_PLAN,
    "model.layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
    "model.layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
}

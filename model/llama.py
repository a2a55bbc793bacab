"""A Llama-family decoder as a plain ``nn.Module``: no collectives, no DeepSpeed, no training policy.

Module and parameter names are those of Hugging Face ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.gate_proj``, ``model.norm``, ``lm_head``)
so that export is a copy and DeepSpeed AutoTP's Llama sharding rules apply to us unchanged.

Under AutoTP, q/k/v/gate/up projections are column-sharded and o/down row-sharded, so a rank sees
fewer heads than the config says: the attention code therefore derives the local head count from
tensor shapes (``view(B, T, -1, head_dim)``), never from ``num_attention_heads``.

Attention is causal by default. For packed documents the caller says which tokens may see which,
in one of two forms the model executes as given (choosing between them, activation checkpointing and
parallelism are the trainer's business: ``trainer/parallelize.py``):

* ``doc_spans``: per batch row, the ``(start, end)`` token ranges of its documents; causal attention
  runs on each span alone;
* ``attn_mask``: a boolean (B, 1, T, T) mask, True where attention is allowed, or a flex-attention
  ``BlockMask`` (``torch.nn.attention.flex_attention``): one block-sparse kernel per layer, every
  layer sharing the mask built once per batch.

With labels the model returns the mean token loss. ``loss_chunk_tokens`` > 0 computes it that many
tokens at a time, fused with the output projection (``LMHead``): the same value and gradients within
fp32 rounding, without the (B, T, V) logits and their fp32 copy in memory (the trainer sets it:
``parallel.loss_chunk_tokens``).

Shapes: B batch, T sequence, d hidden, H query heads, K kv heads, D head_dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .config import ModelConfig

IGNORE_INDEX = -100
# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
# Packed documents per batch row: ((start, end), ...) token ranges covering the row, in order.
DocSpans = tuple[tuple[tuple[int, int], ...], ...]
_flex_compiled = None


def _flex_attention(q, k, v, block_mask: BlockMask, enable_gqa: bool) -> torch.Tensor:
    """flex attention through ``torch.compile``, which generates its fused kernel (eager flex attention
    is an unfused reference); one compiled function for all layers, compiled on first use."""
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as HF Llama does (logit parity).
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class LlamaRotaryEmbedding(nn.Module):
    """cos/sin tables computed on the fly in fp32 from position ids (no cache to go stale)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        # Not persistent: derived from the config, so checkpoints and exports carry no copy.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> cos, sin (B, T, D)
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        pos = position_ids[:, None, :].float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (inv @ pos).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q (B, H, T, D), k (B, K, T, D), cos/sin (B, T, D)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, docs: DocSpans | torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        y = self.attention(q, k, v, docs)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attention(self, q, k, v, docs: DocSpans | torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        """The attention kernel alone: q (B, H, T, D), k/v (B, K, T, D) -> (B, H, T, D). A trainer may
        replace it on an instance (sequence parallelism exchanges q/k/v around it)."""
        n_rep = q.shape[1] // k.shape[1]
        if isinstance(docs, BlockMask):  # one block-sparse kernel; GQA inside it (no k/v copies)
            return _flex_attention(q, k, v, docs, enable_gqa=n_rep > 1)
        gqa = {}
        if n_rep > 1:
            if _SDPA_GQA and not isinstance(docs, torch.Tensor):
                # Grouped-query attention inside SDPA: no (B, H, T, D) copies of k and v, and the flash
                # kernel reads each kv head once for its query group (as transformers' Llama does).
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(n_rep, dim=1)
                v = v.repeat_interleave(n_rep, dim=1)
        if isinstance(docs, torch.Tensor):
            # Dense document mask (many short documents). k/v were expanded above: with a mask only the
            # math kernel takes enable_gqa, and the expansion keeps the faster kernels usable.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=docs)
        elif docs is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        else:
            # Intra-document attention: causal SDPA on each packed document's own span. Per span the
            # fast causal kernels apply (flash on GPUs, the blocked CPU kernel), and the work is the sum
            # of the documents' triangles, not T^2 as with a dense (B, 1, T, T) mask, which would
            # also rule out the flash kernel (benchmarks/intra_doc_attention.py measures both).
            # 4-D (1, H, L, D) slices: SDPA's fused kernels (flash, CPU flash) take only 4-D inputs and
            # would silently fall back to the math kernel on 3-D ones.
            y = torch.cat([
                torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e],
                                                          v[b:b + 1, :, s:e], is_causal=True, **gqa)
                           for s, e in row], dim=2)
                for b, row in enumerate(docs)
            ])
        return y


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, docs: DocSpans | torch.Tensor | BlockMask | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, docs)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, input_ids, position_ids=None,
                docs: DocSpans | torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, docs)
        return self.norm(x)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of the token cross-entropies of ``h @ weight.T`` against ``labels``, ``chunk`` rows at a time,
    with the gradients computed in the same pass (each chunk's logits exist only while it is processed):
    forward leaves d(sum)/dh (N, d) and d(sum)/dweight (V, d, fp32) for backward to scale."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        need_grads = any(ctx.needs_input_grad[:2])  # False under no_grad (evaluation): the loss alone
        grad_h = torch.empty_like(h) if need_grads else None  # (N, d)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grads else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], labels[start:start + chunk]
            # Masked rows are computed and multiplied by 0, not selected: selecting (nonzero, boolean
            # indexing) has a data-dependent shape, which makes the host wait for the GPU every chunk.
            valid = (yc != IGNORE_INDEX)[:, None]  # (n, 1)
            targets = yc.clamp_min(0)[:, None]  # IGNORE_INDEX -> any valid id; its row is zeroed below
            # fp32 log-softmax, as the whole-logits loss: bf16 over a large vocab loses ~2 digits.
            logp = torch.log_softmax((hc @ weight.t()).float(), dim=-1)  # (n, V)
            total -= (logp.gather(1, targets) * valid).sum()
            if not need_grads:
                continue
            p = logp.exp_()  # softmax, in place: d(loss sum)/d(logits) = softmax - one-hot; 0 where masked
            p.scatter_add_(1, targets, -valid.to(p.dtype))
            p.mul_(valid)
            g = p.to(h.dtype)
            grad_h[start:start + chunk] = g @ weight
            grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype), None, None


class LMHead(nn.Linear):
    """The output projection (a plain ``nn.Linear``: same parameter, same name) that can also return the
    loss directly: ``head(h, labels, chunk_tokens)`` computes the mean token cross-entropy ``chunk_tokens``
    tokens at a time (``_LinearCrossEntropy``), so peak memory holds one (chunk, V) block of logits
    instead of (B*T, V) logits, their fp32 copy and the log-softmax. Inside this module's own call, so
    ZeRO-3 gathers the weight once, as for the plain projection."""

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, chunk_tokens: int = 0,
                loss_tokens: int | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        flat_labels = labels.reshape(-1)
        total = _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), self.weight, flat_labels, chunk_tokens)
        if loss_tokens is not None:
            return total / loss_tokens
        return total / (flat_labels != IGNORE_INDEX).sum()  # 0 / 0 = NaN with nothing to predict, as F.cross_entropy


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.loss_chunk_tokens = 0  # 0: the loss from the whole (B, T, V) logits (module docstring)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, module in self.named_modules():
            self.init_module_weights(name, module)

    @torch.no_grad()
    def init_module_weights(self, name: str, module: nn.Module) -> None:
        """Initialise the parameters ``module`` owns directly; ``name`` as in ``named_modules()``.

        One module at a time so that a trainer which builds the model with partitioned parameters
        (DeepSpeed ZeRO-3 ``zero.Init``, where ``reset_parameters`` in ``__init__`` sees empty shards)
        can gather each module's weights, call this in ``named_modules()`` order, and get the same
        values, RNG draw for RNG draw, as an unpartitioned build."""
        std = self.config.initializer_range
        # Residual-output projections get std / sqrt(2L) (GPT-2): keeps the residual stream's
        # variance from growing with depth at init.
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, nn.Linear):
            s = out_std if name.endswith(("o_proj", "down_proj")) else std
            nn.init.normal_(module.weight, mean=0.0, std=s)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_spans: DocSpans | None = None,
        attn_mask: torch.Tensor | BlockMask | None = None,
        loss_tokens: int | None = None,
    ):
        """input_ids (B, T). With labels (B, T) (IGNORE_INDEX = masked) returns the mean token loss;
        otherwise the logits (B, T, V). ``doc_spans`` or ``attn_mask`` restrict attention to packed
        documents (module docstring); neither means plain causal attention. ``loss_tokens``: divide the
        summed token loss by this instead of by the number of unmasked labels here (a caller holding one
        slice of longer sequences passes the whole sequences' count, so the slices' losses add up to the
        mean)."""
        if doc_spans is not None and attn_mask is not None:
            raise ValueError("give doc_spans or attn_mask, not both")
        h = self.model(input_ids, position_ids=position_ids, docs=doc_spans if attn_mask is None else attn_mask)
        if labels is not None and self.loss_chunk_tokens:
            return self.lm_head(h, labels, self.loss_chunk_tokens, loss_tokens)
        logits = self.lm_head(h)
        if labels is None:
            return logits
        flat = logits.float().view(-1, logits.shape[-1])
        if loss_tokens is not None:
            return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum") / loss_tokens
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX)


def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every state-dict name of ``LlamaForCausalLM(cfg)`` with its full shape, built on the meta device
    (no memory): what a checkpoint or an export of this config must hold."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}

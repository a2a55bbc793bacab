"""The language-model head and its loss: the mean token cross-entropy, optionally computed a chunk of
tokens at a time fused with the output projection (``LMHead``), so the (B, T, V) logits and their fp32
copy never exist whole. The same value and gradients within fp32 rounding (tests/test_model.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


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



def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_tokens: int | None = None) -> torch.Tensor:
    """Mean token cross-entropy of the whole logits (fp32), or the sum divided by ``loss_tokens``."""
    flat = logits.float().view(-1, logits.shape[-1])
    if loss_tokens is not None:
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum") / loss_tokens
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX)

"""The attention kernel every family calls, with the document-mask forms the trainer may pass.

Attention is causal by default. For packed documents the caller says which tokens may see which, in one
of two forms executed as given (choosing between them is the trainer's business: ``trainer/batching.py``):

* ``DocSpans``: per batch row, the ``(start, end)`` token ranges of its documents; causal attention runs
  on each span alone;
* a mask: a boolean (B, 1, T, T) tensor, True where attention is allowed, or a flex-attention
  ``BlockMask`` (``torch.nn.attention.flex_attention``): one block-sparse kernel per layer, every layer
  sharing the mask built once per batch.

Under tensor parallelism a rank holds fewer heads than the config says, so ``attend`` derives the head
counts from the tensors (q (B, H, T, D), k/v (B, K, T, D)), never from the config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
# Packed documents per batch row: ((start, end), ...) token ranges covering the row, in order.
DocSpans = tuple[tuple[tuple[int, int], ...], ...]
# What a layer may be told about packed documents (see the module docstring); None = plain causal.
Docs = DocSpans | torch.Tensor | BlockMask | None
_flex_compiled = None


def _flex_attention(q, k, v, block_mask: BlockMask, enable_gqa: bool) -> torch.Tensor:
    """flex attention through ``torch.compile``, which generates its fused kernel (eager flex attention
    is an unfused reference); one compiled function for all layers, compiled on first use."""
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Docs = None) -> torch.Tensor:
    """Causal attention within documents: q (B, H, T, D), k/v (B, K, T, D) -> (B, H, T, D)."""
    n_rep = q.shape[1] // k.shape[1]
    if isinstance(docs, BlockMask):  # one block-sparse kernel; GQA inside it (no k/v copies)
        return _flex_attention(q, k, v, docs, enable_gqa=n_rep > 1)
    gqa = {}
    if n_rep > 1:
        if _SDPA_GQA and not isinstance(docs, torch.Tensor):
            # Grouped-query attention inside SDPA: no (B, H, T, D) copies of k and v, and the flash
            # kernel reads each kv head once for its query group (as transformers does).
            gqa = {"enable_gqa": True}
        else:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
    if isinstance(docs, torch.Tensor):
        # Dense document mask (many short documents). k/v were expanded above: with a mask only the
        # math kernel takes enable_gqa, and the expansion keeps the faster kernels usable.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=docs)
    if docs is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    # Intra-document attention: causal SDPA on each packed document's own span. Per span the fast causal
    # kernels apply (flash on GPUs, the blocked CPU kernel), and the work is the sum of the documents'
    # triangles, not T^2 as with a dense (B, 1, T, T) mask, which would also rule out the flash kernel
    # (benchmarks/intra_doc_attention.py measures both). 4-D (1, H, L, D) slices: SDPA's fused kernels
    # (flash, CPU flash) take only 4-D inputs and would silently fall back to the math kernel on 3-D ones.
    return torch.cat([
        torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                  is_causal=True, **gqa)
                   for s, e in row], dim=2)
        for b, row in enumerate(docs)
    ])

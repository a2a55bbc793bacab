"""Training-time transformations of the plain model, applied from outside in one fixed order.

The model (``model/llama.py``) is a plain module that executes the attention it is given and knows
nothing of recomputation or parallelism. ``parallelize`` applies, in this order (torchtitan's
``parallelize_llama`` idea):

1. **Attention policy**: how a batch's packed documents reach the model. With
   ``data.intra_doc_attention`` the batch carries ``segment_ids`` (built from EOD tokens on the data
   side); ``DocumentAttention`` turns them, on the prefetch thread and never inside ``forward``, into
   the model's ``doc_spans`` (causal SDPA per document span: fused kernels, work = the documents'
   triangles) or, for batches of very short documents, one dense ``attn_mask`` (cheaper than hundreds of
   tiny calls; ``benchmarks/intra_doc_attention.py --mode spans|mask`` measures the crossover that
   ``SPAN_ATTENTION_MIN_MEAN_TOKENS`` encodes). Rows holding one document each get plain causal attention.
2. **Activation checkpointing** (``parallel.activation_checkpointing`` = N): every N-th decoder layer's
   forward is recomputed in backward with PyTorch's non-reentrant ``torch.utils.checkpoint``. It re-runs
   the layer's submodules' hooks during recomputation, so ZeRO-3 re-gathers their weights and AutoTP's
   sharded linears work unchanged; inputs that need no gradient (rotary tables, spans) are fine; only
   the layer input is kept, and gradients are bitwise identical (tests). Parameter names are untouched
   (no wrapper module), so checkpoints, AutoTP's name rules and the export see the plain model.
   DeepSpeed's reentrant ``deepspeed.checkpointing`` would add partitioned/CPU activations, which pay off
   only when that one saved (B, T, d) input per layer is what limits memory.
3. **Loss chunking** (``parallel.loss_chunk_tokens`` = N): the loss is computed N tokens at a time, so
   the (B, T, V) logits and their fp32 copy never exist whole (``model.llama.LMHead``).
4. **Tensor parallelism** (AutoTP) and 5. **ZeRO data-parallel sharding** are applied by
   ``deepspeed.initialize`` (``trainer/engine.py``), from the DeepSpeed config the run config derives:
   AutoTP shards q/k/v/gate/up by columns and o/down by rows, then ZeRO partitions what each rank holds
   over the data-parallel group.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from model import DocSpans, LlamaForCausalLM

# Batches whose documents average fewer tokens than this use one dense mask instead of per-span calls.
# Where the crossover lies on CPU: benchmarks/intra_doc_attention.py --mode spans|mask (seq 1024, tiny
# preset: spans win from ~16 tokens per document on). Not yet measured on GPUs.
SPAN_ATTENTION_MIN_MEAN_TOKENS = 16

BatchTransform = Callable[[dict[str, torch.Tensor]], dict]


def document_spans(segment_ids: np.ndarray | torch.Tensor) -> DocSpans:
    """Per row, the (start, end) token ranges of its packed documents, in order.

    segment_ids (B, T) int, non-decreasing along each row: tokens with equal ids belong to the same
    document. Host-side (numpy): call it on the data side, never inside the step."""
    seg = np.asarray(segment_ids)
    T = seg.shape[1]
    spans = []
    for row in seg:
        cuts = (np.flatnonzero(row[1:] != row[:-1]) + 1).tolist()
        edges = [0, *cuts, T]
        spans.append(tuple(zip(edges[:-1], edges[1:])))
    return tuple(spans)


def document_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask that also forbids attention across packed documents: what per-span attention
    computes, as one dense (B, 1, T, T) boolean mask, True where attention is allowed."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


def document_attention(batch: dict[str, torch.Tensor],
                       min_mean_tokens: int = SPAN_ATTENTION_MIN_MEAN_TOKENS) -> dict:
    """The attention policy (step 1 above): replace ``segment_ids`` by the model's attention input."""
    out = dict(batch)
    segment_ids = out.pop("segment_ids", None)
    if segment_ids is None:
        return out
    spans = document_spans(segment_ids)
    n_docs = sum(len(row) for row in spans)
    if n_docs == len(spans):
        return out  # one document per row: plain causal attention
    if segment_ids.numel() < min_mean_tokens * n_docs:
        out["attn_mask"] = document_attention_mask(segment_ids)
    else:
        out["doc_spans"] = spans
    return out


def _checkpointed(forward: Callable, module: torch.nn.Module) -> Callable:
    @functools.wraps(forward)
    def run(*args):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    return run


def apply_activation_checkpointing(model: LlamaForCausalLM, every: int) -> int:
    """Recompute every ``every``-th decoder layer in backward (1 = all; 0 = none); returns how many."""
    if every < 0:
        raise ValueError("activation checkpointing interval must be >= 0")
    if not every:
        return 0
    layers = [layer for i, layer in enumerate(model.model.layers) if i % every == 0]
    for layer in layers:
        # An instance attribute shadows the class's forward: nn.Module.__call__ (and every hook it runs)
        # is unchanged, only the body runs under checkpoint. The original bound method is kept inside.
        layer.forward = _checkpointed(layer.forward, layer)
    return len(layers)


def parallelize(model: LlamaForCausalLM, *, intra_doc_attention: bool, activation_checkpointing: int,
                loss_chunk_tokens: int = 0) -> BatchTransform:
    """Apply steps 1-3 to ``model`` (4-5 happen in ``deepspeed.initialize``); returns the batch transform
    of step 1, which the data side applies to every batch before it reaches the model."""
    apply_activation_checkpointing(model, activation_checkpointing)
    model.loss_chunk_tokens = loss_chunk_tokens
    return document_attention if intra_doc_attention else (lambda batch: batch)

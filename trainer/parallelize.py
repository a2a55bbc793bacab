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
   With the ``flex`` kernel (``parallel.attention_kernel``; ``auto`` picks it on CUDA) the prefetch
   thread keeps the document ids as a tensor and ``on_device`` turns them, once per batch and on the
   GPU, into a flex-attention ``BlockMask`` that every layer shares: one block-sparse kernel per layer,
   no host reads, and no Python structure that would make ``torch.compile`` recompile per batch.
2. **Activation checkpointing** (``parallel.activation_checkpointing`` = N): every N-th decoder layer's
   forward is recomputed in backward with PyTorch's non-reentrant ``torch.utils.checkpoint``. It re-runs
   the layer's submodules' hooks during recomputation, so ZeRO-3 re-gathers their weights and AutoTP's
   sharded linears work unchanged; inputs that need no gradient (rotary tables, spans) are fine; only
   the layer input is kept, and gradients are bitwise identical (tests). Parameter names are untouched
   (no wrapper module), so checkpoints, AutoTP's name rules and the export see the plain model.
   DeepSpeed's reentrant ``deepspeed.checkpointing`` would add partitioned/CPU activations, which pay off
   only when that one saved (B, T, d) input per layer is what limits memory.
3. **Compilation** (``train.compile``): each decoder layer is compiled on its own (torchtitan's
   per-block compile) after checkpointing is applied, so the recomputed region is compiled too; the
   layers share one compiled code (same shapes), and names are unchanged (``nn.Module.compile``).
4. **Loss chunking** (``parallel.loss_chunk_tokens`` = N): the loss is computed N tokens at a time, so
   the (B, T, V) logits and their fp32 copy never exist whole (``model.llama.LMHead``).
5. **Sequence parallelism** (``parallel.sequence_parallel`` = S, DeepSpeed-Ulysses): every rank of a
   sequence-parallel group reads the same samples; the batch transform gives each its slice of T / S
   tokens (with their global position ids) while the document structure (spans, mask or block mask) is
   built from the whole sequence. Each layer's attention kernel (``LlamaAttention.attention``) is
   wrapped in DeepSpeed's ``DistributedAttention``: an all-to-all turns (B, T/S, H) into (B, T, H/S) -
   the whole sequence for H/S heads, so document masking works unchanged - the kernel runs, and a second
   all-to-all turns the result back. Embeddings, norms, MLPs and the loss see only T/S tokens, which is
   what bounds activation memory. The loss of a slice is its summed token loss divided by the whole
   sequences' unmasked-label count (``loss_tokens``), so the slices add up to the S = 1 mean, and
   DeepSpeed sums gradients over the sequence-parallel ranks (averaging over data-parallel ones only).
   When S does not divide the key/value heads, k/v are expanded to the query heads before the exchange.
   (Applied first in code, so that recomputation and compilation, steps 2 and 3, cover the exchange.)
6. **Tensor parallelism** (AutoTP) and 7. **ZeRO data-parallel sharding** are applied by
   ``deepspeed.initialize`` (``trainer/engine.py``), from the DeepSpeed config the run config derives:
   AutoTP shards q/k/v/gate/up by columns and o/down by rows, then ZeRO partitions what each rank holds
   over the data-parallel group.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils.checkpoint import checkpoint

from model import DocSpans, LlamaForCausalLM

# Batches whose documents average fewer tokens than this use one dense mask instead of per-span calls.
# Where the crossover lies on CPU: benchmarks/intra_doc_attention.py --mode spans|mask (seq 1024, tiny
# preset: spans win from ~16 tokens per document on). Not yet measured on GPUs.
SPAN_ATTENTION_MIN_MEAN_TOKENS = 16

# How intra-document attention is executed: per-span SDPA, one dense mask, or a flex BlockMask;
# "auto" = flex on CUDA; on CPU spans (flex has no CPU backward), or mask when compiled (spans are
# Python tuples: a compiled layer would recompile for every new set of documents).
ATTENTION_KERNELS = ("auto", "spans", "mask", "flex")
# Block-mask construction materialises (B, T, T) booleans unless compiled; compiled from this length on.
FLEX_COMPILED_MASK_FROM_SEQ = 8192


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


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """The flex-attention ``BlockMask`` of causal attention within documents, built on the device of
    ``document_ids`` (B, T) without host reads; blocks entirely inside one document's causal triangle
    are marked full (no mask evaluation), blocks across documents are skipped."""
    B, T = document_ids.shape

    def same_document_causal(b, h, q, kv):
        return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, B, None, T, T, device=document_ids.device,
                             _compile=T >= FLEX_COMPILED_MASK_FROM_SEQ)


def document_attention(batch: dict[str, torch.Tensor], min_mean_tokens: int = SPAN_ATTENTION_MIN_MEAN_TOKENS,
                       kernel: str = "spans") -> dict:
    """The attention policy (step 1 above, on the data side): replace ``segment_ids`` by the model's
    attention input: ``doc_spans``, ``attn_mask``, or (``kernel="flex"``) ``document_ids``, which
    ``on_device`` turns into the block mask."""
    out = dict(batch)
    segment_ids = out.pop("segment_ids", None)
    if segment_ids is None:
        return out
    seg = np.asarray(segment_ids)
    if not (seg[:, 1:] != seg[:, :-1]).any():
        return out  # one document per row: plain causal attention
    if kernel == "flex":
        out["document_ids"] = segment_ids.to(torch.int32)
        return out
    spans = document_spans(seg)
    n_docs = sum(len(row) for row in spans)
    if kernel == "mask" or seg.size < min_mean_tokens * n_docs:
        out["attn_mask"] = document_attention_mask(segment_ids)
    else:
        out["doc_spans"] = spans
    return out


def on_device(batch: dict) -> dict:
    """The device half of the attention policy, once per batch after the copy: document ids -> BlockMask."""
    if "document_ids" not in batch:
        return batch
    out = dict(batch)
    out["attn_mask"] = document_block_mask(out.pop("document_ids"))
    return out


def resolve_attention_kernel(kernel: str, device_type: str, compiled: bool) -> str:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, not {kernel!r}")
    if kernel != "auto":
        return kernel
    if device_type == "cuda":
        return "flex"
    return "mask" if compiled else "spans"


class BatchTransform:
    """Steps 1 and 5 as the trainer runs them: ``__call__`` on the prefetch thread (host tensors),
    ``on_device`` after the batch's copy to the device. With ``sp`` > 1 this rank keeps its slice
    ``sp_rank`` of the sequence (after the document structure was taken from the whole of it)."""

    def __init__(self, intra_doc_attention: bool, kernel: str = "spans", sp: int = 1, sp_rank: int = 0):
        self.intra_doc_attention, self.kernel = intra_doc_attention, kernel
        self.sp, self.sp_rank = sp, sp_rank

    def __call__(self, batch: dict) -> dict:
        out = document_attention(batch, kernel=self.kernel) if self.intra_doc_attention else batch
        return sequence_slice(out, self.sp, self.sp_rank) if self.sp > 1 else out

    def on_device(self, batch: dict) -> dict:
        return on_device(batch)


def sequence_slice(batch: dict, sp: int, sp_rank: int) -> dict:
    """This sequence-parallel rank's share of a batch: tokens [r*T/S, (r+1)*T/S) of ``input_ids``,
    ``labels`` and ``position_ids`` (global positions), plus ``loss_tokens``, the whole batch's count of
    unmasked labels. Attention inputs (spans, mask, document ids) stay whole: after the all-to-all every
    rank attends over the whole sequence."""
    from model.llama import IGNORE_INDEX

    out = dict(batch)
    B, T = out["input_ids"].shape
    if T % sp:
        raise ValueError(f"sequence length {T} is not divisible by parallel.sequence_parallel={sp}")
    n = T // sp
    sl = slice(sp_rank * n, (sp_rank + 1) * n)
    if "position_ids" not in out:
        out["position_ids"] = torch.arange(T, dtype=torch.long).expand(B, T)
    out["loss_tokens"] = int((out["labels"] != IGNORE_INDEX).sum())
    for key in ("input_ids", "labels", "position_ids"):
        out[key] = out[key][:, sl].contiguous()
    return out


class _UlyssesAttention:
    """A layer's attention kernel inside DeepSpeed-Ulysses' ``DistributedAttention`` (step 5)."""

    def __init__(self, kernel: Callable, group, sp: int):
        from deepspeed.sequence.layer import DistributedAttention

        self.kernel, self.sp = kernel, sp
        # Layout (B, T, heads, D), batch first: scatter the heads (dim 2), gather the sequence (dim 1).
        self.exchange = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)

    def _local(self, q, k, v, docs):  # (B, T, H/S, D) each: the whole sequence for this rank's heads
        return self.kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), docs).transpose(1, 2)

    def __call__(self, q, k, v, docs=None):  # (B, H, T/S, D), (B, K, T/S, D)
        if k.shape[1] % self.sp:  # whole kv heads per rank: expand them to the query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = self.exchange(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, docs)
        return y.transpose(1, 2)


def apply_sequence_parallel(model: LlamaForCausalLM, group, sp: int) -> int:
    """Wrap every layer's attention kernel for sequence parallelism over ``group``; returns how many."""
    if sp <= 1:
        return 0
    heads = model.config.num_attention_heads
    if heads % sp:
        raise ValueError(f"parallel.sequence_parallel={sp} must divide num_attention_heads={heads}")
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.attention = _UlyssesAttention(attn.attention, group, sp)
    return len(model.model.layers)


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


def compile_layers(model: LlamaForCausalLM) -> int:
    """Compile each decoder layer in place (step 3); returns how many. Fixed shapes (``dynamic=False``):
    every step has the same (B, T), and the document structure arrives as tensors (mask or BlockMask)."""
    for layer in model.model.layers:
        layer.compile(dynamic=False)
    return len(model.model.layers)


def parallelize(model: LlamaForCausalLM, *, intra_doc_attention: bool, activation_checkpointing: int,
                loss_chunk_tokens: int = 0, attention_kernel: str = "spans",
                compile: bool = False, sequence_parallel: int = 1, sp_rank: int = 0,
                sp_group=None) -> BatchTransform:
    """Apply steps 1-5 to ``model`` (6-7 happen in ``deepspeed.initialize``); returns the batch transform
    of steps 1 and 5, which the data side applies to every batch before it reaches the model.
    ``attention_kernel`` is a resolved one (``resolve_attention_kernel``), not "auto"."""
    if attention_kernel not in ATTENTION_KERNELS[1:]:
        raise ValueError(f"resolve the attention kernel first: {attention_kernel!r}")
    apply_sequence_parallel(model, sp_group, sequence_parallel)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        compile_layers(model)
    model.loss_chunk_tokens = loss_chunk_tokens
    return BatchTransform(intra_doc_attention, attention_kernel, sequence_parallel, sp_rank)

"""From packed samples to model inputs, and which samples each data-parallel rank reads.

A batch travels forward only: data (``data_pipeline.gpt_dataset``) -> here -> the engine -> the model.

* ``DistributedSampleIterator`` walks the dataset's global order from ``consumed_samples``, so resuming
  (even at another data-parallel size) continues exactly.
* ``make_batch`` turns samples into inputs and labels, recovering document boundaries from EOD tokens the
  way Megatron's ``get_ltor_masks_and_position_ids`` does.
* ``BatchTransform`` applies the **attention policy**: how a batch's packed documents reach the model. With
  ``data.intra_doc_attention`` the batch carries ``segment_ids``; ``document_attention`` turns them, on the
  prefetch thread and never inside ``forward``, into the model's ``doc_spans`` (causal SDPA per document
  span: fused kernels, work = the documents' triangles) or, for batches of very short documents, one dense
  ``attn_mask`` (cheaper than hundreds of tiny calls; ``benchmarks/intra_doc_attention.py --mode
  spans|mask`` measures the crossover that ``SPAN_ATTENTION_MIN_MEAN_TOKENS`` encodes). Rows holding one
  document each get plain causal attention. With the ``flex`` kernel (``parallel.attention_kernel``;
  ``auto`` picks it on CUDA) the prefetch thread keeps the document ids as a tensor and ``on_device`` turns
  them, once per batch and on the GPU, into a flex-attention ``BlockMask`` that every layer shares: one
  block-sparse kernel per layer, no host reads, and no Python structure that would make ``torch.compile``
  recompile per batch. Under sequence parallelism it then keeps this rank's slice of the sequence
  (``sequence_slice``).

All of it except ``on_device`` runs on the trainer's prefetch thread, overlapping the previous step.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from lmforge.model import IGNORE_INDEX, DocSpans


def make_batch(
    samples: list[np.ndarray] | np.ndarray, eod_id: int, *, mask_eod_loss: bool = False,
    reset_position_ids: bool = False, intra_doc_attention: bool = False,
) -> dict[str, torch.Tensor]:
    """samples (B, T+1) -> model inputs, all (B, T) long tensors on CPU.

    ``input_ids`` = samples[:, :-1]; ``labels`` = samples[:, 1:], with IGNORE_INDEX where the loss is
    masked. The EOD token belongs to the document it ends; the next document starts after it.
      * mask_eod_loss: no loss where the INPUT token is EOD (predicting the next document's first token
        from the previous document is noise);
      * reset_position_ids: ``position_ids`` restart at 0 after each EOD (absent otherwise);
      * intra_doc_attention: ``segment_ids`` count the EODs strictly before each token (absent
        otherwise); the model lets a token attend only within its segment.
    """
    arr = np.stack(samples) if isinstance(samples, (list, tuple)) else np.asarray(samples)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"make_batch: samples must be (B, T+1) with T >= 1, got shape {arr.shape}")
    # numpy, single-threaded on purpose: torch's intra-op thread pool would compete with the training
    # step (and this may run on the prefetch thread); ~2 ms for 64 x 2048 tokens.
    arr = arr.astype(np.int64, copy=False)
    input_ids = np.ascontiguousarray(arr[:, :-1])  # (B, T)
    labels = arr[:, 1:].copy()  # (B, T)
    out = {"input_ids": input_ids, "labels": labels}
    if mask_eod_loss or reset_position_ids or intra_doc_attention:
        is_eod = input_ids == eod_id  # (B, T)
        if mask_eod_loss:
            labels[is_eod] = IGNORE_INDEX
        if intra_doc_attention:
            out["segment_ids"] = np.cumsum(is_eod, axis=1, dtype=np.int64) - is_eod
        if reset_position_ids:
            B, T = input_ids.shape
            idx = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
            # A document starts at t=0 and right after each EOD; position = t - start of t's document.
            starts_here = np.zeros((B, T), dtype=bool)
            starts_here[:, 0] = True
            starts_here[:, 1:] = is_eod[:, :-1]
            doc_start = np.maximum.accumulate(np.where(starts_here, idx, 0), axis=1)
            out["position_ids"] = idx - doc_start
    return {k: torch.from_numpy(v) for k, v in out.items()}


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
    """The attention policy (module docstring): replace ``segment_ids`` by the model's
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
    """What every batch goes through between ``make_batch`` and the engine: ``__call__`` on the prefetch
    thread (host tensors): the attention policy, then with ``sp`` > 1 this rank's slice ``sp_rank`` of the
    sequence (after the document structure was taken from the whole of it); ``on_device`` after the
    batch's copy to the device."""

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


class DataExhaustedError(RuntimeError):
    """The dataset holds fewer samples than the next optimizer step needs."""


class DistributedSampleIterator:
    """This rank's micro-batches, in the dataset's global order starting at ``consumed_samples``.

    With G = micro_batch * grad_accum * dp_size, optimizer step k reads global samples
    ``[c + k*G, c + (k+1)*G)``. Micro-batch m of rank r is the slice
    ``[m*mb*dp + r*mb, m*mb*dp + (r+1)*mb)`` of that window (Megatron's layout), so the union over ranks
    and micro-batches is the window whatever dp_size is: micro-batch m of rank r at dp=2 is micro-batch
    2m+r at dp=1 with twice the accumulation.

    ``prefetch=True`` reads the next step's samples on a background thread while the current step
    computes; the order is unaffected (the thread only fetches the already-determined next window).
    ``consumed_samples`` counts samples handed out, never prefetched ones: checkpoint it as is.
    ``collate`` (e.g. ``functools.partial(make_batch, eod_id=2, intra_doc_attention=True)``) is applied to
    each micro-batch array, on the prefetch thread when prefetching; the default returns the arrays.
    """

    def __init__(self, dataset, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, prefetch: bool = False,
                 collate: Callable[[np.ndarray], Any] | None = None):
        if micro_batch_size < 1 or grad_accum < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"bad batch layout: micro_batch={micro_batch_size} grad_accum={grad_accum} "
                f"dp_rank={dp_rank} dp_size={dp_size}"
            )
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = micro_batch_size * grad_accum * dp_size
        self.consumed_samples = int(consumed_samples)
        self.collate = collate
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data") if prefetch else None
        self._pending: tuple[int, Future] | None = None

    def sample_indices(self, consumed: int) -> list[list[int]]:
        """Global sample indices of this rank's micro-batches for the step starting at ``consumed``."""
        mb, dp = self.micro_batch_size, self.dp_size
        out = []
        for m in range(self.grad_accum):
            base = consumed + m * mb * dp + self.dp_rank * mb
            out.append(list(range(base, base + mb)))
        return out

    def _load(self, consumed: int) -> list:
        micro = [np.stack([self.dataset[i] for i in idx]) for idx in self.sample_indices(consumed)]
        return micro if self.collate is None else [self.collate(m) for m in micro]

    def next_microbatches(self) -> list:
        """grad_accum arrays (micro_batch, T+1) for the next optimizer step (or their ``collate``
        results); advances consumed_samples."""
        start = self.consumed_samples
        if start + self.global_batch_size > len(self.dataset):
            raise DataExhaustedError(
                f"dataset of {len(self.dataset)} samples cannot supply a global batch of "
                f"{self.global_batch_size} after {start} consumed samples (size it for the run's train_iters)"
            )
        if self._pending is not None and self._pending[0] == start:
            batches = self._pending[1].result()
        else:
            batches = self._load(start)
        self._pending = None
        self.consumed_samples = start + self.global_batch_size
        nxt = self.consumed_samples
        if self._pool is not None and nxt + self.global_batch_size <= len(self.dataset):
            self._pending = (nxt, self._pool.submit(self._load, nxt))
        return batches

    def __iter__(self) -> DistributedSampleIterator:
        return self

    def __next__(self) -> list:
        try:
            return self.next_microbatches()
        except DataExhaustedError:
            raise StopIteration from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None

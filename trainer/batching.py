"""From packed samples to model inputs, and which samples each data-parallel rank reads.

``make_batch`` recovers document boundaries from EOD tokens the way Megatron's
``get_ltor_masks_and_position_ids`` does. ``DistributedSampleIterator`` walks the dataset's global order
(``data_pipeline.gpt_dataset``) from ``consumed_samples``, so resuming (even at another data-parallel
size) continues exactly. Both run on the trainer's prefetch thread, overlapping the previous step.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from model import IGNORE_INDEX


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

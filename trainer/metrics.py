"""Metrics sinks (rank 0 only): ``metrics.jsonl``, TensorBoard scalars, and a console line.

MFU = achieved model FLOP/s per device ÷ the device's peak dense FLOP/s for the run's precision, in two
conventions for attention (TensorBoard tag = ``train/`` + the metrics key):

* ``tflops_per_device``, ``mfu``: the **PaLM** convention, the figure published MFU compares with. Model
  FLOPs per token from ``model.flops_per_token``: 6·N matmul params + 12·L·T·H·D attention over the whole
  row, no causal half, whatever the document masking.
* ``tflops_per_device_causal_doc``, ``mfu_causal_doc``: the **causal_doc** convention, attention as it is
  computed: the causal triangle, diagonal included, of each attention span (each packed document under
  ``data.intra_doc_attention``, else each row), from the batches' own document lengths
  (``model.causal_doc_flops``; ``attention_span_sq_sum`` below). Never above the PaLM figure.

Recomputation is *not* counted in either (MFU, not HFU: MFU does not rise when activation checkpointing
adds work). Peaks are auto-detected for known GPUs (dense, no sparsity) or set with ``log.peak_tflops``;
on CPU there is no agreed peak, so MFU is omitted unless ``log.peak_tflops`` is given. ``mfu_peak`` says
which peak MFU divides by: the precision whose detected dense peak it is, or ``log.peak_tflops``. FP8 runs
(``train.precision: fp8``) divide by the **bf16** dense peak (``mfu_peak: bf16``), not the float8 one
(twice bf16's): an fp8 run's MFU compares with a bf16 run's of the same model, its speed-up shows as a
higher MFU, and the work that stays in bf16 (attention, the loss head, small layers) is not held to the
float8 peak.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Dense (non-sparse) peak TFLOP/s by device-name fragment and precision.
_PEAKS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # fp32 entry = TF32 tensor cores
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}
# Precisions whose MFU divides by another precision's peak: fp8 runs by the bf16 dense peak (module docstring).
_PEAK_OF = {"fp8": "bf16"}


def peak_precision(precision: str) -> str:
    """The precision whose dense peak a run of ``precision`` reports MFU against (fp8 -> bf16)."""
    return _PEAK_OF.get(precision, precision)


def detect_peak_tflops(precision: str) -> float | None:
    """The dense peak TFLOP/s per device that MFU divides by, for known GPUs (None elsewhere): the peak of
    ``peak_precision(precision)``, so the bf16 peak for fp8."""
    if not torch.cuda.is_available():
        return None
    precision = peak_precision(precision)
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}.get(precision)
    for key, peaks in _PEAKS.items():
        if key in name:
            return peaks.get(precision) or None
    return None


def attention_span_sq_sum(batch: dict) -> int:
    """Σ over a ``make_batch`` batch's attention spans of length²: with ``segment_ids`` (document masking)
    the documents of each row, else each whole row (B·T²). ``model.causal_doc_flops`` turns it into FLOPs.
    Host-side (numpy): call it on the data side."""
    B, T = batch["input_ids"].shape
    seg = batch.get("segment_ids")
    if seg is None:
        return B * T * T
    seg = np.asarray(seg, dtype=np.int64)  # per row 0, 0, ..., 1, 1, ...: a document's tokens share one id
    counts = np.bincount((seg + T * np.arange(B, dtype=np.int64)[:, None]).ravel())
    return int((counts * counts).sum())


def memory_stats() -> dict:
    if torch.cuda.is_available():
        return {
            "mem_allocated_gb": torch.cuda.memory_allocated() / 2**30,
            "mem_peak_gb": torch.cuda.max_memory_allocated() / 2**30,
        }
    # ru_maxrss is KiB on Linux.
    return {"rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: a crash loses at most the line being written, never earlier ones.
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": prefix, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        self._tb.flush()

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()

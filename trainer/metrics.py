"""Metrics sinks (rank 0 only): ``metrics.jsonl``, TensorBoard scalars, and a console line.

MFU = achieved model FLOP/s per device ÷ the device's peak dense FLOP/s for the run's precision.
Model FLOPs per token come from ``model.flops_per_token`` (6·N matmul params + 12·L·T·d attention,
recomputation *not* counted, so MFU does not rise when activation checkpointing adds work);
``tflops_per_device`` counts the same model FLOPs. Peaks are auto-detected for known GPUs (dense,
no sparsity) or set with ``log.peak_tflops``; on CPU there is no agreed peak, so MFU is omitted
unless ``log.peak_tflops`` is given.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

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


def detect_peak_tflops(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}[precision]
    for key, peaks in _PEAKS.items():
        if key in name:
            return peaks[precision] or None
    return None


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

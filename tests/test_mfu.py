"""MFU's two FLOP conventions and its peak: attention as computed (causal, per document) against a hand
count and the document mask's own count, the attention spans a batch holds, and fp8's bf16 peak. (The
trainer's logged figures: tests/test_train.py check_flops_conventions, on the golden run.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.model import attention_flops, causal_doc_flops, dense_flops_per_token, flops_per_token, get_preset
from lmforge.trainer import metrics
from lmforge.trainer.batching import document_attention_mask, make_batch

EOD = 2


def test_attention_flops_hand_count():
    """One row of T = 8 holding documents of 3 and 5 tokens. Causal per document: 3·4/2 + 5·6/2 = 21 (query,
    key) pairs per head and layer (the mask's own count), against 36 for a causal whole row and 64 for the
    PaLM count; each pair costs 12·D FLOPs per head and layer in training (score and value, 4·D forward,
    ×3 with the backward), 16·D with recomputation."""
    cfg = get_preset("debug", vocab_size=1000)
    L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    row = np.array([[5, 6, EOD, 7, 8, 9, 10, 11, 12]])  # T + 1: the labels' extra token
    seg = make_batch(row, eod_id=EOD, intra_doc_attention=True)["segment_ids"]
    assert seg.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert int(document_attention_mask(seg).sum()) == 21  # what the trainer's mask allows
    per_pair = 12 * L * H * D
    assert attention_flops(cfg, 3**2 + 5**2, 8) == 21 * per_pair
    assert attention_flops(cfg, 8**2, 8) == 36 * per_pair
    assert attention_flops(cfg, 8**2, 8, causal=False) == 64 * per_pair
    assert attention_flops(cfg, 3**2 + 5**2, 8, recompute=True) == 21 * 16 * L * H * D
    # PaLM (flops_per_token, unchanged) = the dense matmuls + every pair of the whole row.
    assert flops_per_token(cfg, 8) * 8 == dense_flops_per_token(cfg) * 8 + attention_flops(cfg, 64, 8, causal=False)
    assert causal_doc_flops(cfg, 34, 8) == dense_flops_per_token(cfg) * 8 + 21 * per_pair
    recomputed = dense_flops_per_token(cfg, recompute=True) * 8 + 21 * 16 * L * H * D
    assert causal_doc_flops(cfg, 34, 8, recompute=True) == recomputed
    assert causal_doc_flops(cfg, 64, 8) < flops_per_token(cfg, 8) * 8


def test_attention_span_sq_sum_of_a_batch():
    """Σ length² of the spans attention runs over: the packed documents with document masking (segment_ids),
    else each whole row; a document cut by the row's end counts the part in the row."""
    rows = np.array([[5, 6, EOD, 7, 8, 9, 10, 11, 12],  # 3 + 5
                     [5, EOD, 6, EOD, 7, 8, 9, EOD, 10],  # 2 + 2 + 4 (the last EOD is a label only)
                     [5, 6, 7, 8, 9, 10, 11, 12, 13]])  # one document
    masked = make_batch(rows, eod_id=EOD, intra_doc_attention=True)
    assert metrics.attention_span_sq_sum(masked) == (9 + 25) + (4 + 4 + 16) + 64
    assert metrics.attention_span_sq_sum(make_batch(rows, eod_id=EOD)) == 3 * 64
    assert metrics.attention_span_sq_sum(make_batch(rows, eod_id=EOD, reset_position_ids=True)) == 3 * 64


@pytest.mark.parametrize("device,peaks", [
    ("NVIDIA H100 80GB HBM3", {"bf16": 989.0, "fp8": 989.0, "fp16": 989.0, "fp32": 494.5}),
    ("NVIDIA H100 PCIe", {"bf16": 756.0, "fp8": 756.0, "fp32": 378.0}),
    ("NVIDIA A100-SXM4-80GB", {"bf16": 312.0, "fp8": 312.0}),
])
def test_fp8_mfu_divides_by_the_bf16_dense_peak(monkeypatch, device, peaks):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: device)
    for precision, peak in peaks.items():
        assert metrics.detect_peak_tflops(precision) == peak, precision
    assert metrics.peak_precision("fp8") == "bf16"
    assert [metrics.peak_precision(p) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]

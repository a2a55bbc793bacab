"""make_batch (EOD-aware inputs), the intra-document attention policy, and DistributedSampleIterator
(global order across data-parallel sizes and resume)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from lmforge.data_pipeline.gpt_dataset import PackedDataset
from lmforge.data_pipeline.indexed_dataset import IndexedDatasetWriter
from lmforge.model import IGNORE_INDEX, build_model, get_preset
from lmforge.trainer.batching import DataExhaustedError, DistributedSampleIterator, document_attention, make_batch

E = 2  # EOD


def test_make_batch_masks_positions_segments_by_hand():
    samples = [np.array([5, 6, E, 7, 8, E, 9, 10]), np.array([E, 11, 12, E, E, 13, 14, 15])]
    plain = make_batch(samples, E)
    assert set(plain) == {"input_ids", "labels"}
    assert plain["input_ids"].tolist() == [[5, 6, E, 7, 8, E, 9], [E, 11, 12, E, E, 13, 14]]
    assert plain["labels"].tolist() == [[6, E, 7, 8, E, 9, 10], [11, 12, E, E, 13, 14, 15]]
    b = make_batch(np.stack(samples), E, mask_eod_loss=True, reset_position_ids=True,
                   intra_doc_attention=True)
    M = IGNORE_INDEX
    # Loss masked where the INPUT is EOD; predicting EOD itself is kept.
    assert b["labels"].tolist() == [[6, E, M, 8, E, M, 10], [M, 12, E, M, M, 14, 15]]
    # EOD keeps its document's position; the next token restarts at 0.
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 1, 2, 0, 0, 1]]
    # A segment ends with its EOD (an EOD right after an EOD is a one-token segment).
    assert b["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 3, 3]]
    assert all(t.dtype == torch.long and t.shape == (2, 7) for t in b.values())
    only_pos = make_batch(samples, E, reset_position_ids=True)
    assert set(only_pos) == {"input_ids", "labels", "position_ids"}
    assert only_pos["labels"].tolist() == plain["labels"].tolist()
    with pytest.raises(ValueError, match="shape"):
        make_batch(np.zeros(5, dtype=np.int64), E)


@pytest.mark.parametrize("min_mean_tokens", [0, 10**9], ids=["per-span", "dense-mask"])
def test_packed_documents_see_only_themselves(min_mean_tokens):
    """Intra-document attention (either form the policy may choose) + position reset make a packed row
    compute what each document computes alone. Tolerance 1e-5: fp32, identical math, only the SDPA
    kernel's blocking differs."""
    torch.manual_seed(0)
    model = build_model(get_preset("debug", vocab_size=64)).eval()
    docs = [[5, 9, 13, 7, E], [21, 22, E], [30, 31, 32, 33, 34, 35, E], [40, 41]]
    row = np.concatenate([np.array(d) for d in docs] + [np.array([50])])  # (T+1,) with a trailing label
    b = document_attention(make_batch([row], E, reset_position_ids=True, intra_doc_attention=True),
                           min_mean_tokens=min_mean_tokens)
    assert ("doc_spans" in b) == (min_mean_tokens == 0) and ("attn_mask" in b) == (min_mean_tokens > 0)
    with torch.no_grad():
        packed = model(b["input_ids"], position_ids=b["position_ids"], doc_spans=b.get("doc_spans"),
                       attn_mask=b.get("attn_mask"))[0]
        plain = model(b["input_ids"])[0]
        start = 0
        for d in docs:
            alone = model(torch.tensor([d]))[0]
            torch.testing.assert_close(packed[start : start + len(d)], alone, rtol=1e-5, atol=1e-5)
            start += len(d)
    assert not torch.allclose(packed[5:], plain[5:], atol=1e-3)  # without it, documents do mix


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> PackedDataset:
    """Documents of distinct consecutive ids, so every sample is recognisable."""
    prefix = tmp_path_factory.mktemp("it") / "docs"
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        nxt = 10
        for _ in range(200):
            n = int(rng.integers(1, 40))
            w.add_document(list(range(nxt, nxt + n)) + [E])
            nxt += n
    return PackedDataset([str(prefix)], seq_len=8, num_samples=400, seed=1)


def _steps(it: DistributedSampleIterator, n: int) -> list[list[np.ndarray]]:
    return [it.next_microbatches() for _ in range(n)]


def test_dp2_ranks_together_read_the_dp1_global_batch(dataset):
    one = _steps(DistributedSampleIterator(dataset, 2, grad_accum=4, dp_rank=0, dp_size=1), 5)
    ranks = [_steps(DistributedSampleIterator(dataset, 2, grad_accum=2, dp_rank=r, dp_size=2), 5)
             for r in range(2)]
    for step in range(5):
        assert len(one[step]) == 4 and one[step][0].shape == (2, 9)
        for m in range(2):
            for r in range(2):  # rank r's micro-batch m is dp1's micro-batch 2m+r
                np.testing.assert_array_equal(ranks[r][step][m], one[step][2 * m + r])
        dp1 = np.concatenate(one[step])
        expected = np.stack([dataset[i] for i in range(step * 8, (step + 1) * 8)])
        np.testing.assert_array_equal(dp1, expected)


def test_resume_at_consumed_samples_continues_and_may_change_dp(dataset):
    it = DistributedSampleIterator(dataset, 2, grad_accum=2, dp_rank=0, dp_size=1)
    ref = _steps(it, 6)
    first = DistributedSampleIterator(dataset, 2, grad_accum=2, dp_rank=0, dp_size=1)
    _steps(first, 2)
    assert first.consumed_samples == 8
    resumed = _steps(DistributedSampleIterator(dataset, 2, 2, 0, 1, consumed_samples=8), 4)
    for a, b in zip(ref[2:], resumed):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    # Same global batch after resuming on 2 ranks (grad_accum halves): same samples per step.
    r0, r1 = (_steps(DistributedSampleIterator(dataset, 2, 1, r, 2, consumed_samples=8), 4) for r in (0, 1))
    for step in range(4):
        np.testing.assert_array_equal(np.concatenate([r0[step][0], r1[step][0]]),
                                      np.concatenate(ref[2 + step]))


def test_prefetch_same_order_and_exhaustion(dataset):
    plain = list(DistributedSampleIterator(dataset, 4, 3, 1, 2))
    it = DistributedSampleIterator(dataset, 4, 3, 1, 2, prefetch=True)
    fetched = []
    for step in it:
        fetched.append(step)
        assert it.consumed_samples == 24 * len(fetched)  # handed out, not prefetched
    it.close()
    assert len(plain) == len(fetched) == 400 // 24
    collated = DistributedSampleIterator(dataset, 4, 3, 1, 2, prefetch=True,
                                         collate=partial(make_batch, eod_id=E, intra_doc_attention=True))
    first = collated.next_microbatches()
    collated.close()
    assert [set(b) for b in first] == [{"input_ids", "labels", "segment_ids"}] * 3
    assert first[1]["input_ids"].tolist() == plain[0][1][:, :-1].tolist()
    for a, b in zip(plain, fetched):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(DataExhaustedError, match="cannot supply"):
        DistributedSampleIterator(dataset, 4, 3, 0, 2, consumed_samples=390).next_microbatches()
    with pytest.raises(ValueError, match="dp_rank=2"):
        DistributedSampleIterator(dataset, 4, 3, 2, 2)

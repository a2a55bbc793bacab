"""The attention policy of trainer/batching.py (per-span SDPA, a dense mask, or a flex block mask) and the
model transforms of trainer/parallel/transforms.py (activation checkpointing, per-layer compile) on the
plain model, against each document run alone and against the unmodified model."""

from __future__ import annotations

import pytest
import torch

from lmforge.model import build_model, get_preset
from lmforge.trainer.batching import document_attention, document_spans, on_device, resolve_attention_kernel
from lmforge.trainer.parallel.transforms import apply_activation_checkpointing, compile_layers, parallelize

LENGTHS = [[5, 1, 18], [24], [3, 3, 3, 15]]  # documents per row; a 1-token document included


def _packed_batch() -> dict:
    x = torch.randint(3, 100, (3, 24), generator=torch.Generator().manual_seed(0))
    seg = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in LENGTHS])
    pos = torch.tensor([sum((list(range(n)) for n in row), []) for row in LENGTHS])
    return {"input_ids": x, "position_ids": pos, "segment_ids": seg}


def test_policy_chooses_by_document_length():
    b = _packed_batch()
    assert document_spans(b["segment_ids"]) == (((0, 5), (5, 6), (6, 24)), ((0, 24),),
                                                ((0, 3), (3, 6), (6, 9), (9, 24)))
    spans = document_attention(b, min_mean_tokens=8)  # 72 tokens / 8 documents = 9 per document
    assert set(spans) == {"input_ids", "position_ids", "doc_spans"}
    mask = document_attention(b, min_mean_tokens=10)
    assert set(mask) == {"input_ids", "position_ids", "attn_mask"} and mask["attn_mask"].shape == (3, 1, 24, 24)
    one_each = document_attention({**b, "segment_ids": torch.zeros(3, 24, dtype=torch.long)})
    assert set(one_each) == {"input_ids", "position_ids"}  # plain causal attention


@pytest.mark.parametrize("min_mean_tokens", [0, 10**9], ids=["per-span", "dense-mask"])
def test_intra_document_attention_equals_each_document_run_alone(min_mean_tokens):
    """Rows packed with documents of different lengths and intra-document attention (causal SDPA per span,
    or the dense mask used for batches of very short documents; grouped-query heads) give every document
    the logits and the gradient contributions it has when run alone, with activation checkpointing off
    and on."""
    cfg = get_preset("debug", vocab_size=100)  # 4 query heads, 2 kv heads: the GQA path
    batch = document_attention(_packed_batch(), min_mean_tokens=min_mean_tokens)
    x = batch["input_ids"]
    w = torch.randn(3, 24, 100, generator=torch.Generator().manual_seed(1))  # a loss touching every logit
    for every in (0, 1):
        torch.manual_seed(2)
        m = build_model(cfg).train()
        apply_activation_checkpointing(m, every)
        packed = m(**batch)
        (packed * w).sum().backward()
        g_packed = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        total = 0.0
        for b, row in enumerate(LENGTHS):
            start = 0
            for n in row:
                alone = m(x[b:b + 1, start:start + n])[0]
                # fp32, same weights; only kernel shapes (and so summation order) differ: ~1e-7.
                assert (packed[b, start:start + n] - alone).abs().max().item() < 1e-5, (every, b, start)
                total = total + (alone * w[b, start:start + n]).sum()
                start += n
        total.backward()
        for n, p in m.named_parameters():
            # Same sums in another order: relative differences of ~1e-6; any cross-document leak or
            # missing term changes gradients by O(1) relative.
            assert torch.allclose(g_packed[n], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item()), n


def test_intra_document_spans_take_the_fused_kernel():
    """Each span's SDPA call must be one the fused (flash) kernel accepts: with only that backend allowed,
    SDPA raises "No available kernel" instead of silently using the slow math kernel (it does for 3-D
    slices, for instance)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = build_model(get_preset("debug", vocab_size=100)).train()  # GQA: 4 query heads, 2 kv heads
    x = torch.randint(3, 100, (2, 32))
    seg = torch.tensor([[0] * 10 + [1] * 22, [0] * 3 + [1] * 29])
    batch = document_attention({"input_ids": x, "labels": x, "segment_ids": seg}, min_mean_tokens=0)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        m(**batch).backward()
    assert m.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_activation_checkpointing_same_gradients_and_names():
    """Recomputation replays the same fp32 ops: bitwise-equal gradients. The layers keep their names (no
    wrapper module), so checkpoints, AutoTP's rules and the export see the plain model; recomputation
    really happens: the layer's submodules run again in backward, their forward pre-hooks included (where
    ZeRO-3 gathers their weights)."""
    cfg = get_preset("debug", vocab_size=100)
    x = torch.randint(0, 100, (2, 32))
    grads, calls = [], []
    for every in (0, 1, 2):
        torch.manual_seed(1)
        m = build_model(cfg).train()
        names = [n for n, _ in m.named_parameters()]
        assert parallelize(m, activation_checkpointing=every) is m
        assert [n for n, _ in m.named_parameters()] == names
        calls.append(0)
        m.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        m(x, labels=x).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert calls == [1, 2, 2]  # layer 0 is checkpointed at every=1 and every=2
    for g in grads[1:]:
        for n in g:
            assert torch.equal(g[n], grads[0][n]), n
    with pytest.raises(ValueError, match=">= 0"):
        apply_activation_checkpointing(build_model(cfg), -1)


@pytest.mark.slow  # flex attention compiles its CPU kernel on first use: ~13 s
def test_flex_block_mask_equals_each_document_run_alone():
    """The CUDA kernel for packed documents (``kernel="flex"``: document ids on the data side, one
    BlockMask per batch built by ``on_device``, shared by every layer), forward on CPU (flex attention has
    no CPU backward; tests/gpu checks gradients against per-span attention). 24-token rows are smaller
    than one 128-token block: every block is partial, so the mask function decides every entry."""
    cfg = get_preset("debug", vocab_size=100)  # 4 query heads over 2 kv heads: flex's GQA path
    batch = on_device(document_attention(_packed_batch(), min_mean_tokens=0, kernel="flex"))
    assert type(batch["attn_mask"]).__name__ == "BlockMask" and "document_ids" not in batch
    torch.manual_seed(2)
    m = build_model(cfg).eval()
    x = batch["input_ids"]
    with torch.no_grad():
        packed = m(**batch)
        for b, row in enumerate(LENGTHS):
            start = 0
            for n in row:
                alone = m(x[b:b + 1, start:start + n])[0]
                # fp32: only the kernels' summation order differs (~1e-7); a leak across documents or a
                # wrong causal edge is O(1).
                assert (packed[b, start:start + n] - alone).abs().max().item() < 1e-5, (b, start)
                start += n


def test_flex_keeps_rows_of_one_document_causal():
    one_each = document_attention({**_packed_batch(), "segment_ids": torch.zeros(3, 24, dtype=torch.long)},
                                  kernel="flex")
    assert "document_ids" not in one_each and "attn_mask" not in on_device(one_each)


def test_attention_kernel_resolution():
    assert resolve_attention_kernel("auto", "cuda", compiled=False) == "flex"
    assert resolve_attention_kernel("auto", "cuda", compiled=True) == "flex"
    assert resolve_attention_kernel("auto", "cpu", compiled=False) == "spans"
    # Spans are Python tuples that change every batch: a compiled layer would recompile for each.
    assert resolve_attention_kernel("auto", "cpu", compiled=True) == "mask"
    assert resolve_attention_kernel("spans", "cuda", compiled=False) == "spans"
    with pytest.raises(ValueError, match="attention kernel"):
        resolve_attention_kernel("ring", "cpu", compiled=False)


@pytest.mark.parametrize("kernel", ["mask", "spans"])
def test_compiled_layers_do_not_recompile_for_new_documents(kernel):
    """A compiled layer given the document structure as a tensor (``mask``; ``flex`` on CUDA) compiles
    once for every set of documents; given per-span tuples it recompiles for each new set (Dynamo guards
    on Python constants), which is why ``auto`` never hands spans to compiled layers. Dynamo decides when
    to recompile whatever backend generates the code, so the graphs are counted with its ``eager`` backend
    (no code generation: seconds instead of half a minute per graph on 2 CPU cores); inductor's own code
    runs in the compiled trainer runs (tests/test_train.py, tests/test_parallel_parity.py)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    m = build_model(get_preset("debug", vocab_size=100))
    compile_layers(m, backend="eager")
    x = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    before = counters["stats"]["unique_graphs"]
    for cut in (5, 13):
        seg = torch.zeros(2, 24, dtype=torch.long)
        seg[:, cut:] = 1
        m(**document_attention({"input_ids": x, "labels": x, "segment_ids": seg}, min_mean_tokens=0,
                               kernel=kernel)).backward()
    graphs = counters["stats"]["unique_graphs"] - before
    assert graphs == (1 if kernel == "mask" else 2), graphs

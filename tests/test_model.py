"""Model unit tests: HF logit parity, parameter counts, GQA, checkpointing, import hygiene."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from model import PRESETS, LlamaForCausalLM, flops_per_token, get_preset, num_params

ROOT = Path(__file__).resolve().parents[1]


def hf_twin(model: LlamaForCausalLM) -> HFLlama:
    c = model.config.to_dict()
    c.pop("initializer_range")
    hf = HFLlama(LlamaConfig(**c, attention_bias=False, mlp_bias=False, hidden_act="silu",
                             attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    # HF ties lm_head to the embedding itself; no other key may differ.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.eval()


@pytest.mark.parametrize("tied,kv", [(True, 2), (False, 4), (False, 1)])
def test_logits_match_transformers(tied, kv):
    torch.manual_seed(0)
    cfg = get_preset("debug", vocab_size=500, tie_word_embeddings=tied, num_key_value_heads=kv)
    ours = LlamaForCausalLM(cfg).eval()
    hf = hf_twin(ours)
    x = torch.randint(0, 500, (3, 40))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    # Same ops in the same order on the same fp32 weights: any difference above fp32 rounding
    # noise (~1e-6 relative on O(1) logits) would mean a real mismatch (rope, norm eps, GQA layout).
    assert diff <= 1e-5, diff


def test_param_count_matches_module():
    for name in ("debug", "tiny", "125m"):
        for tied in (True, False):
            cfg = get_preset(name, vocab_size=1000, tie_word_embeddings=tied)
            with torch.device("meta"):
                m = LlamaForCausalLM(cfg)
            unique = {id(p): p.numel() for p in m.parameters()}
            assert sum(unique.values()) == num_params(cfg), (name, tied)


def test_presets_documented_and_valid():
    src = (ROOT / "model" / "config.py").read_text()
    for name in PRESETS:
        cfg = get_preset(name)
        assert f'"{name}"' in src
        assert num_params(cfg) > 0 and flops_per_token(cfg, 2048) > 6 * num_params(cfg, True)
    # The 1b and 7b presets are what their names say (within 10%).
    assert 0.9e9 < num_params(get_preset("1b")) < 1.1e9
    assert 6.3e9 < num_params(get_preset("7b")) < 7.1e9


def test_loss_masking_and_segments():
    torch.manual_seed(0)
    cfg = get_preset("debug", vocab_size=100)
    m = LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 100, (2, 16))
    labels = x.clone()
    labels[:, :8] = -100
    with torch.no_grad():
        loss = m(x, labels=labels)
        logits = m(x)
    ref = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 100), x[:, 8:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)
    # Two packed documents with intra-document attention == each document on its own.
    seg = torch.tensor([[0] * 6 + [1] * 10] * 2)
    pos = torch.tensor([list(range(6)) + list(range(10))] * 2)
    with torch.no_grad():
        packed = m(x, segment_ids=seg, position_ids=pos)
        second = m(x[:, 6:])
    assert (packed[:, 6:] - second).abs().max().item() < 1e-5


@pytest.mark.parametrize("min_mean_tokens", [0, 10**9], ids=["per-span", "dense-mask"])
def test_intra_document_attention_equals_each_document_run_alone(monkeypatch, min_mean_tokens):
    """Rows packed with documents of different lengths (1 token included) and intra-document attention
    (causal SDPA per span, or the dense mask used for batches of very short documents; grouped-query
    heads) give every document the logits and the gradient contributions it has when run alone, with
    activation checkpointing off and on."""
    from model import llama

    monkeypatch.setattr(llama, "SPAN_ATTENTION_MIN_MEAN_TOKENS", min_mean_tokens)
    cfg = get_preset("debug", vocab_size=100)  # 4 query heads, 2 kv heads: the GQA path
    lengths = [[5, 1, 18], [24], [3, 3, 3, 15]]
    x = torch.randint(3, 100, (3, 24), generator=torch.Generator().manual_seed(0))
    seg = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lengths])
    pos = torch.tensor([sum((list(range(n)) for n in row), []) for row in lengths])
    w = torch.randn(3, 24, 100, generator=torch.Generator().manual_seed(1))  # a loss touching every logit
    for every in (0, 1):
        torch.manual_seed(2)
        m = LlamaForCausalLM(cfg).train()
        m.set_activation_checkpointing(every)
        packed = m(x, segment_ids=seg, position_ids=pos)
        (packed * w).sum().backward()
        g_packed = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        total = 0.0
        for b, row in enumerate(lengths):
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


def test_intra_document_spans_take_the_fused_kernel(monkeypatch):
    """Each span's SDPA call must be one the fused (flash) kernel accepts: with only that backend allowed,
    SDPA raises "No available kernel" instead of silently using the slow math kernel (it does for 3-D
    slices, for instance)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model import llama

    monkeypatch.setattr(llama, "SPAN_ATTENTION_MIN_MEAN_TOKENS", 0)
    m = LlamaForCausalLM(get_preset("debug", vocab_size=100)).train()  # GQA: 4 query heads, 2 kv heads
    x = torch.randint(3, 100, (2, 32))
    seg = torch.tensor([[0] * 10 + [1] * 22, [0] * 3 + [1] * 29])
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        m(x, labels=x, segment_ids=seg).backward()
    assert m.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = get_preset("debug", vocab_size=100)
    x = torch.randint(0, 100, (2, 32))
    grads = []
    for every in (0, 1, 2):
        torch.manual_seed(1)
        m = LlamaForCausalLM(cfg).train()
        m.set_activation_checkpointing(every)
        m(x, labels=x).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for g in grads[1:]:
        for n in g:
            # Recomputation replays the same fp32 ops: bitwise-equal gradients are expected.
            assert torch.equal(g[n], grads[0][n]), n


def test_model_imports_no_distributed():
    for path in (ROOT / "model").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                assert not n.startswith("deepspeed"), f"{path}: imports {n}"
                assert not n.startswith("torch.distributed"), f"{path}: imports {n}"

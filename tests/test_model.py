"""Model unit tests: HF logit parity, parameter counts, presets, loss masking (import hygiene:
tests/test_layout.py)."""

from __future__ import annotations

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


def test_presets_are_what_the_readme_says():
    """Every preset has a row in the README's preset table whose shape and parameter count (at vocab
    32,000) are the preset's own, and the table lists no other preset."""
    import re

    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| ([\d.]+) ([MB]) \| (\d+) \| (\d+) \| (\d+) / (\d+) \| (\d+) \| (yes|no) \|", line)
        if m:
            rows[m.group(1)] = m.groups()[1:]
    assert set(rows) == set(PRESETS)
    for name, (count, unit, layers, d, heads, kv, ff, tied) in rows.items():
        cfg = get_preset(name, vocab_size=32000)
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.intermediate_size, cfg.tie_word_embeddings) == (
            int(layers), int(d), int(heads), int(kv), int(ff), tied == "yes"), name
        decimals = len(count.partition(".")[2])  # the table rounds to the digits it shows
        shown = num_params(cfg) / (1e6 if unit == "M" else 1e9)
        assert abs(shown - float(count)) <= 0.5 * 10**-decimals + 1e-9, (name, shown, count)
        assert flops_per_token(cfg, 2048) > 6 * num_params(cfg, non_embedding=True)


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
    spans = (((0, 6), (6, 16)),) * 2
    pos = torch.tensor([list(range(6)) + list(range(10))] * 2)
    with torch.no_grad():
        packed = m(x, doc_spans=spans, position_ids=pos)
        second = m(x[:, 6:])
    assert (packed[:, 6:] - second).abs().max().item() < 1e-5


@pytest.mark.parametrize("chunk", [7, 32, 10**6], ids=["7-tokens", "32-tokens", "one-chunk"])
def test_chunked_loss_equals_the_whole_logits_loss(chunk):
    """``loss_chunk_tokens``: the loss and every gradient equal the unchunked ones within fp32 rounding
    (the chunk sums are added in another order: ~1e-7 relative; a dropped or doubled chunk, or a chunk
    misaligned with its labels, is off by O(1/chunks)); masked labels and a chunk size that does not
    divide B*T = 80 included."""
    torch.manual_seed(0)
    cfg = get_preset("debug", vocab_size=300)
    x = torch.randint(0, 300, (2, 40))
    labels = torch.randint(0, 300, (2, 40))
    labels[0, :9] = -100
    results = []
    for chunk_tokens in (0, chunk):
        torch.manual_seed(1)
        m = LlamaForCausalLM(cfg).train()
        m.loss_chunk_tokens = chunk_tokens
        loss = m(x, labels=labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (ref, gref), (got, g) = results
    assert torch.allclose(got, ref, rtol=1e-6, atol=0), (got, ref)
    for n in gref:
        assert torch.allclose(g[n], gref[n], rtol=1e-5, atol=1e-6 * gref[n].abs().max().item()), n
    masked = torch.full_like(labels, -100)
    m.loss_chunk_tokens = chunk
    assert torch.isnan(m(x, labels=masked))  # like F.cross_entropy with nothing to predict

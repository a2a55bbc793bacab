"""Model unit tests: every family's logits against its ``transformers`` class, parameter and FLOP counts,
presets, loss masking, the chunked loss (import hygiene: tests/test_layout.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.model import all_presets, build_model, families, family_of, flops_per_token, get_preset, num_params

ROOT = Path(__file__).resolve().parents[1]


def hf_twin(model):
    """The ``transformers`` model of ``model``'s family with the same weights (its adapter's config)."""
    hf_adapter = family_of(model.config).hf
    hf = hf_adapter.transformers_model_class()(hf_adapter.transformers_config_class()(
        **hf_adapter.to_hf_config(model.config), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    # HF ties lm_head to the embedding itself; no other key may differ.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.eval()


@pytest.mark.parametrize("preset,tied,kv", [("debug", True, 2), ("debug", False, 4), ("debug", False, 1),
                                            ("qwen3-debug", True, 2), ("qwen3-debug", False, 1)])
def test_logits_match_transformers(preset, tied, kv):
    """Each family against its transformers class on the same fp32 weights (norm weights perturbed, so a
    norm applied to the wrong tensor or over the wrong axis shows: Qwen3's per-head q/k norms)."""
    torch.manual_seed(0)
    cfg = get_preset(preset, vocab_size=500, tie_word_embeddings=tied, num_key_value_heads=kv)
    ours = build_model(cfg).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf = hf_twin(ours)
    x = torch.randint(0, 500, (3, 40))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    # Same ops in the same order on the same fp32 weights: any difference above fp32 rounding
    # noise (~1e-6 relative on O(1) logits) would mean a real mismatch (rope, norm eps, GQA layout).
    assert diff <= 1e-5, diff


def test_param_count_matches_module_and_closed_form():
    """``num_params`` counts the module's own parameters (a tied head once); the Llama closed form
    (attention 2d² + 2d·kv, MLP 3d·f, two norms per layer, the final norm, embedding, untied head) agrees."""
    for name in ("debug", "tiny", "125m", "qwen3-debug", "qwen3-0.6b"):
        for tied in (True, False):
            cfg = get_preset(name, vocab_size=1000, tie_word_embeddings=tied)
            with torch.device("meta"):
                m = build_model(cfg)
            unique = {id(p): p.numel() for p in m.parameters()}
            assert sum(unique.values()) == num_params(cfg), (name, tied)
            d, f, hd, H, K, L = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads,
                                 cfg.num_key_value_heads, cfg.num_hidden_layers)
            per_layer = 2 * d * H * hd + 2 * d * K * hd + 3 * d * f + 2 * d
            per_layer += 2 * hd if cfg.family == "qwen3" else 0  # q_norm, k_norm
            body = L * per_layer + d
            assert num_params(cfg, non_embedding=True) == body, name
            assert num_params(cfg) == body + 1000 * d * (1 if tied else 2), name


def test_presets_are_what_the_readme_says():
    """Every preset of every family has a row in the README's preset table whose family, shape and
    parameter count (at the vocabulary the table names) are the preset's own, and the table lists no other
    preset."""
    import re

    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| `([\w.-]+)` \| (\w+) \| ([\d.]+) ([MB]) \| (\d+) \| (\d+) \| (\d+) / (\d+) \| "
                     r"(\d+) \| (\d+) \| (yes|no) \|", line)
        if m:
            rows[m.group(1)] = m.groups()[1:]
    moe = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| `([\w.-]+)` \| (qwen3_moe) \| ([\d.]+) ([MB]) \| ([\d.]+) ([MB]) \| (\d+) \| (\d+) \| "
                     r"(\d+) / (\d+) \| (\d+) \| (\d+) × (\d+), (\d+) \| ([\w, ]+) \| (yes|no) \|", line)
        if m:
            moe[m.group(1)] = m.groups()[1:]
    assert set(rows) | set(moe) == set(all_presets()) and not set(rows) & set(moe)
    for name, (family, total, tu, active, au, layers, d, heads, kv, hd, experts, width, k, dense, tied) in moe.items():
        cfg = get_preset(name)  # at the preset's own vocabulary
        assert (cfg.family, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.head_dim, cfg.num_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok,
                cfg.tie_word_embeddings) == (family, int(layers), int(d), int(heads), int(kv), int(hd), int(experts),
                                             int(width), int(k), tied == "yes"), name
        assert [str(i) for i in cfg.mlp_only_layers] == ([] if dense == "none" else dense.split(", ")), name
        for count, unit, active_only in ((total, tu, False), (active, au, True)):
            decimals = len(count.partition(".")[2])
            shown = num_params(cfg, active=active_only) / (1e6 if unit == "M" else 1e9)
            assert abs(shown - float(count)) <= 0.5 * 10**-decimals + 1e-9, (name, shown, count)
    vocab = {"llama": 32000, "qwen3": 151936}  # the README's columns
    for name, (family, count, unit, layers, d, heads, kv, hd, ff, tied) in rows.items():
        cfg = get_preset(name, vocab_size=vocab[family])
        assert cfg.family == family, name
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.head_dim, cfg.intermediate_size, cfg.tie_word_embeddings) == (
            int(layers), int(d), int(heads), int(kv), int(hd), int(ff), tied == "yes"), name
        decimals = len(count.partition(".")[2])  # the table rounds to the digits it shows
        shown = num_params(cfg) / (1e6 if unit == "M" else 1e9)
        assert abs(shown - float(count)) <= 0.5 * 10**-decimals + 1e-9, (name, shown, count)
        assert flops_per_token(cfg, 2048) > 6 * num_params(cfg, non_embedding=True)


def test_flops_per_token_closed_form():
    """6 × (every linear weight, the output head included) + 12 · L · T · H·D (attention, no causal
    discount); 8 instead of 6 with recomputation."""
    for name in ("125m", "qwen3-0.6b"):
        cfg = get_preset(name, vocab_size=32000)
        d, f, hd, H, K, L = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads,
                             cfg.num_key_value_heads, cfg.num_hidden_layers)
        matmul = L * (2 * d * H * hd + 2 * d * K * hd + 3 * d * f) + 32000 * d
        attn = 2 * L * 2048 * H * hd
        assert flops_per_token(cfg, 2048) == 6 * matmul + 6 * attn
        assert flops_per_token(cfg, 2048, recompute=True) == 8 * matmul + 8 * attn


def test_every_family_is_complete():
    """Each registered family has presets whose names say nothing twice, a config class that round-trips
    through its dict (the family's name in it), and a plan that covers every linear layer and embedding."""
    import fnmatch

    from torch import nn

    from lmforge.model import config_from_dict

    assert {"llama", "qwen3"} <= set(families())
    for fam in families().values():
        cfg = fam.config(next(iter(fam.presets)), vocab_size=300)
        d = cfg.to_dict()
        assert d["family"] == fam.name and config_from_dict(d) == cfg
        with torch.device("meta"):
            m = fam.build(cfg)
        for name, mod in m.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                assert any(fnmatch.fnmatchcase(name, p) for p in fam.tp_plan), (fam.name, name)
    legacy = get_preset("debug").to_dict()
    del legacy["family"]  # checkpoints written before families: Llama
    assert config_from_dict(legacy) == get_preset("debug")


def test_loss_masking_and_segments():
    torch.manual_seed(0)
    cfg = get_preset("debug", vocab_size=100)
    m = build_model(cfg).eval()
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
        m = build_model(cfg).train()
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

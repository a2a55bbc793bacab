"""Import of Hugging Face Llama directories: random transformers models (GQA; tied and untied) give
lmforge logits equal to transformers' own, and configs lmforge cannot represent are refused. Continued
pretraining from an imported model (``model.init_from_hf``), its first loss against transformers': Llama in
tests/test_hf_tokenizer_e2e.py, Qwen3 under tensor parallelism in tests/test_qwen3.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmforge.model import build_model
from lmforge.trainer.hf.importer import HFImportError, import_hf, load_hf_weights, model_config_from_hf
from tests.helpers.models import perturb_norms

os.environ["HF_HUB_OFFLINE"] = "1"


def _random_hf(tmp_path, tie: bool, vocab_size: int = 300):
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    torch.manual_seed(0)
    hf = HFLlama(cfg).eval()
    perturb_norms(hf)  # norms at 1 would hide a misplaced norm
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


@pytest.mark.parametrize("tie", [True, False])
def test_random_llama_imports_with_logit_parity(tmp_path, tie):
    hf, hf_dir = _random_hf(tmp_path, tie)
    out = import_hf(hf_dir, tmp_path / "init")  # runs its own verification too
    cfg, state = load_hf_weights(out)
    assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings == tie
    assert cfg.rope_theta == 50000.0 and cfg.rms_norm_eps == 1e-6
    ours = build_model(cfg).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
    # fp32 on both sides with identical weights: only kernel summation order differs (see LOGIT_ATOL).
    assert diff <= 1e-4
    # the init dir and the HF dir give bit-identical tensors
    _, direct = load_hf_weights(hf_dir)
    assert direct.keys() == state.keys()
    assert all(torch.equal(direct[k], state[k]) for k in state)
    meta = json.loads((out / "lmforge_init.json").read_text())
    assert meta["format"] == "lmforge-init-v1" and "model.safetensors" in meta["source_sha256"]


def test_modified_init_weights_are_detected(tmp_path):
    _, hf_dir = _random_hf(tmp_path, True)
    out = import_hf(hf_dir, tmp_path / "init", verify=False)
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(HFImportError, match="sha256"):
        load_hf_weights(out)


BASE = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, hidden_act="silu")


@pytest.mark.parametrize("change, match", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
    ({"head_dim": 32}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window"),
])
def test_unsupported_configs_are_refused(change, match):
    with pytest.raises(HFImportError, match=match):
        model_config_from_hf({**BASE, **change})


def test_supported_config_maps_every_field():
    cfg = model_config_from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
                                "tie_word_embeddings": True, "max_position_embeddings": 4096})
    assert (cfg.rope_theta, cfg.tie_word_embeddings, cfg.max_position_embeddings) == (5e5, True, 4096)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)


def test_pickle_only_and_missing_dirs_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(HFImportError, match="pickle"):
        load_hf_weights(tmp_path)
    with pytest.raises(HFImportError, match="not a directory"):
        load_hf_weights(tmp_path / "nope")

"""Run-config parsing, overrides, validation and DeepSpeed JSON derivation."""

from __future__ import annotations

import json

import pytest

from lmforge.trainer.config import ConfigError, check_global_batch, load_config
from lmforge.trainer.parallel.ds_config import build_ds_config
from tests.helpers.paths import ROOT


def test_every_shipped_config_loads():
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert paths
    for p in paths:
        cfg = load_config(p)
        assert cfg.data.train


def test_overrides_are_typed(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", [
        "train.max_steps=7", "optim.lr=1e-3", "parallel.zero_stage=3", "optim.betas=[0.8, 0.9]",
        "data.train=[{path: a, weight: 2}, {path: b, weight: 1}]", "eval.interval=0",
    ])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.parallel.zero_stage == 3
    assert cfg.optim.betas == [0.8, 0.9]
    assert [(s.path, s.weight) for s in cfg.data.train] == [("a", 2.0), ("b", 1.0)]


@pytest.mark.parametrize("override,needle", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("nosuch.key=1", "nosuch"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.precision=fp4", "train.precision"),
    ("parallel.zero_stage=4", "zero_stage"),
    ("parallel.offload=optimizer+params", "zero_stage=3"),
    ("data.train=[{path: x, wieght: 1}]", "data.train[0].wieght"),
    ("model.preset=huge", "model.preset: unknown model preset 'huge'; presets: llama: debug, tiny"),
    ("model.family=gpt2", "model.family: unknown model family 'gpt2'; lmforge has: llama, qwen3"),
    ("model.family=qwen3", "model.preset: preset 'tiny' is not a qwen3 preset \\(it is llama's\\); qwen3 presets: "
                           "qwen3-debug"),
    ("model.hiden_size=64", "unknown config key 'model.hiden_size'; valid keys here: family, preset, init_from_hf and "
                            "the llama family's fields vocab_size, hidden_size"),
    ("model.head_dim=64", "unknown config key 'model.head_dim'"),  # Qwen3's field, not Llama's
    ("model.hidden_size=big", "model.hidden_size: expected an integer"),
    ("model.init_from_hf=x;model.hidden_size=64", "model: init_from_hf takes the shape from the checkpoint; drop "
                                                  "model.hidden_size"),
    ("parallel.attention_kernel=ring", "parallel.attention_kernel: 'ring' is not one of auto"),
    ("train.compile=maybe", "train.compile: expected true/false"),
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(ROOT / "configs/demo.yaml", override.split(";"))


def test_model_section_is_family_preset_and_the_familys_fields(tmp_path):
    """One owner of the shape: ``model:`` names a family and preset and overrides fields of that family's
    config class, typed by it; a preset says its family; the dump writes the fields flat, as they were given."""
    from lmforge.trainer.config import dump_config

    cfg = load_config(ROOT / "configs/demo.yaml", ["model.preset=qwen3-debug", "model.head_dim=16",
                                                    "model.rope_theta=5e5"])
    m = cfg.model
    assert (m.family, m.preset, m.overrides) == ("qwen3", "qwen3-debug", {"head_dim": 16, "rope_theta": 5e5})
    dumped = dump_config(cfg)
    assert "family: qwen3" in dumped and "head_dim: 16" in dumped and "overrides" not in dumped
    (tmp_path / "again.yaml").write_text(dumped)
    assert load_config(tmp_path / "again.yaml").model == m
    legacy = load_config(ROOT / "configs/demo.yaml", ["model.family=null"])  # no family: the preset's (Llama's)
    assert legacy.model.family == "llama"


def test_global_batch_checked():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.micro_batch_size=4", "train.grad_accum=2",
                                                    "train.global_batch_size=16"])
    assert check_global_batch(cfg, 2) == 16
    with pytest.raises(ConfigError, match="global_batch_size=16"):
        check_global_batch(cfg, 4)


def test_ds_config_derived_not_duplicated(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", ["parallel.zero_stage=3", "train.grad_accum=4"])
    ds = build_ds_config(cfg, dp_size=2, precision="bf16")
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 4 * 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    # A template may add settings, but not hold a value the run config owns.
    tpl = tmp_path / "t.json"
    tpl.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    cfg2 = load_config(ROOT / "configs/demo.yaml", [f"parallel.ds_config={tpl}"])
    assert build_ds_config(cfg2, 2, "fp32")["zero_optimization"] == {"overlap_comm": True, "stage": 2}
    tpl.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        build_ds_config(cfg2, 2, "fp32")


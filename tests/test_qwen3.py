"""Qwen3 (dense) through every stage: a random ``transformers`` Qwen3ForCausalLM (GQA, untied, qk-norm and
the other norm weights perturbed, so a norm applied to the wrong tensor shows) is imported, trained by the
real trainer on 2 ranks with tensor parallelism 2 × ZeRO-3 from those weights, exported, and reloaded by
``transformers``; the checkpoint resumes on another layout. Its logits against transformers on the same
weights are tests/test_model.py's; its ZeRO 0-3 × TP parity is tests/test_parallel_parity.py's.

Sizes: hidden 64, 4 heads of 32 (q_proj 64 -> 128: head_dim is not hidden / heads, as in the released
models), 2 kv heads, MLP 96, vocab 1024, 2 layers. Under ZeRO-3 the trainer's persistence threshold is 10·d
= 640 elements: every matrix is partitioned and gathered (the path real models take), only the norms (32
and 64 elements) persist. TP 2 splits whole heads (2 query, 1 kv per rank) and the MLP (48 per rank).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from lmforge.data_pipeline.gpt_dataset import build_dataset
from lmforge.trainer.hf.importer import HFImportError, load_hf_weights, model_config_from_hf
from tests.helpers.models import perturb_norms
from tests.helpers.process import run_cmd
from tests.helpers.runs import deepspeed_train, hf_loss_on_packed_samples, read_metrics, write_config

os.environ["HF_HUB_OFFLINE"] = "1"
PY = sys.executable
VOCAB = 1024  # >= the test tokenizer's 1000 ids
SEQ = 64
# Step-1 and step-4 losses against transformers': fp32 on both sides with identical weights; what differs is
# the order of sums (TP's row-parallel all-reduce, SDPA per document span vs transformers' per document):
# ~1e-7 relative per op, measured below 3e-6 absolute on losses of ~7. Another init or a wrong sample window
# moves the loss by O(0.1).
LOSS_ATOL = 2e-5


def random_qwen3(out, vocab_size: int = VOCAB, tie: bool = False):
    """A random transformers Qwen3ForCausalLM saved with safetensors; norm weights perturbed."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(cfg).eval()
    perturb_norms(hf)  # norms at 1 would hide a misplaced norm
    hf.save_pretrained(out)
    return hf


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def test_qwen3_config_json_is_read_and_refused_where_it_must_be():
    base = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
    cfg = model_config_from_hf(base)
    assert (cfg.family, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == ("qwen3", 32, 1e6, True)
    for change, match in (({"use_sliding_window": True}, "use_sliding_window"), ({"attention_bias": True},
                          "attention_bias"), ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn")):
        with pytest.raises(HFImportError, match=match):
            model_config_from_hf({**base, **change})
    # Any other architecture: one line naming the entry found and what lmforge imports.
    with pytest.raises(HFImportError) as e:
        model_config_from_hf({**base, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral"})
    msg = str(e.value)
    assert "\n" not in msg and "['MixtralForCausalLM']" in msg
    assert "LlamaForCausalLM" in msg and "Qwen3ForCausalLM (qwen3)" in msg and "(llama)" in msg


@pytest.mark.slow
def test_qwen3_imported_trains_with_tp2_zero3_exports_and_resumes_elsewhere(tmp_path, tiny_data):
    """import_hf -> 3 steps on 2 ranks (TP 2 × ZeRO-3, fp32) from the imported weights -> export_hf (verified)
    -> Qwen3ForCausalLM reloads it with our logits; the step-3 checkpoint resumes on 1 rank without TP
    (DeepSpeed's universal conversion). The first step's loss, computed on the imported weights before any
    update, equals transformers' on the same samples; the resumed run's first loss (step 4, on the step-3
    weights) equals transformers' on the export of step 3 and the next samples of the same order."""
    from lmforge.model import build_model
    from lmforge.trainer.checkpoint import find_checkpoint, read_state, weight_source

    hf_dir, init, run, export = (tmp_path / n for n in ("hf", "init", "run", "export"))
    original = random_qwen3(hf_dir)
    run_cmd([PY, "-m", "lmforge.trainer.import_hf", "--model", hf_dir, "--output", init])  # verifies logits
    cfg_init, state = load_hf_weights(init)
    _, direct = load_hf_weights(hf_dir)
    assert cfg_init.family == "qwen3" and all(torch.equal(state[k], direct[k]) for k in direct)

    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, model={"init_from_hf": str(init)},
                       train={"max_steps": 3, "micro_batch_size": 4, "seed": 7, "precision": "fp32"},
                       optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1}, checkpoint={"interval": 3},
                       parallel={"zero_stage": 3, "tensor_parallel": 2})
    out = deepspeed_train(cfg, ["model.preset=null"], nproc=2)
    assert "world 2 = dp 1 × tp 2 | ZeRO-3" in out.stdout, out.stdout[-3000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    train = build_dataset([(str(tiny_data["data"]), 1.0)], "train", SEQ, 16, 7, cache_dir=None)
    want, docs = hf_loss_on_packed_samples(original, [train[i] for i in range(4)], eod_id=2)
    assert docs >= 4 and abs(rows[0]["loss"] - want) < LOSS_ATOL, (rows[0]["loss"], want)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05  # it trained (the later comparisons see updates)

    st = read_state(find_checkpoint(run / "checkpoints"))
    assert (st.model.family, st.tensor_parallel, st.zero_stage, st.step) == ("qwen3", 2, 3, 3)

    # Elastic: the TP-2 × ZeRO-3 checkpoint, copied, on 1 rank without TP (universal conversion), one more
    # step. The conversion stays in the copy's checkpoints (step_00000003_universal): the export and the
    # weight reading below reuse it, as they would a resumed run's.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    cfg2 = write_config(tmp_path / "cfg2.yaml", tiny_data, resumed, model={"init_from_hf": str(init)},
                        train={"max_steps": 4, "micro_batch_size": 4, "seed": 7, "precision": "fp32"},
                        optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1}, checkpoint={"interval": 3},
                        parallel={"zero_stage": 3, "tensor_parallel": 1})
    out = deepspeed_train(cfg2, ["model.preset=null"], nproc=1)
    assert "resumed from" in out.stdout and "tensor-parallel 2" in out.stdout, out.stdout[-3000:]

    ckdir = resumed / "checkpoints"
    tag = ckdir / "step_00000003"
    run_cmd([PY, "-m", "lmforge.trainer.export_hf", "--checkpoint", ckdir, "--output", export, "--step", "3"])
    assert json.loads((export / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert "existing universal checkpoint" in (export / "README.md").read_text()
    reloaded = _load_hf(export)
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    getters, _ = weight_source(tag, read_state(tag))  # TP × ZeRO-3: through that universal conversion
    ours = build_model(st.model).eval()
    ours.load_state_dict({k: get().float() for k, get in getters.items()})
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours(ids) - reloaded(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5, diff  # the same fp32 weights through the same ops (tests/test_model.py's bound)
    # The resumed run's first loss: the step-3 weights on the order's next samples.
    step4 = [r for r in read_metrics(resumed) if r["step"] == 4]
    want4, _ = hf_loss_on_packed_samples(reloaded, [train[i] for i in range(12, 16)], eod_id=2)
    assert len(step4) == 1 and abs(step4[0]["loss"] - want4) < LOSS_ATOL, (step4, want4)


@pytest.mark.slow
def test_qwen3_import_then_export_is_bitwise(tmp_path, tiny_data):
    """A tied Qwen3 (the 0.6B-4B form) imported and exported again without training (``train.max_steps=0``
    saves the initial weights as a step-0 checkpoint) gives back every tensor bit for bit."""
    from safetensors.torch import load_file

    hf_dir, run, export = tmp_path / "hf", tmp_path / "run", tmp_path / "export"
    random_qwen3(hf_dir, tie=True)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, model={"init_from_hf": str(hf_dir)},
                       train={"max_steps": 0, "precision": "fp32"}, parallel={"zero_stage": 1})
    deepspeed_train(cfg, ["model.preset=null"], nproc=1)
    run_cmd([PY, "-m", "lmforge.trainer.export_hf", "--checkpoint", run / "checkpoints", "--output", export])
    a, b = load_file(hf_dir / "model.safetensors"), load_file(export / "model.safetensors")
    a.pop("lm_head.weight", None)  # transformers writes the tied head or not depending on version
    b.pop("lm_head.weight", None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Export of checkpoints written by real bf16 training (trainer.train, 2 ranks, gloo on CPU).

The exported fp32 weights must be the fp32 optimizer masters bit for bit (not the bf16 module weights
upcast), read here independently of the exporter: zero_to_fp32 for ZeRO-2/3, DeepSpeed's universal
conversion (ds_to_universal) for ZeRO-1 with fp32 gradient accumulation (BF16_Optimizer), and for
ZeRO-0 the optimizer's fp32 groups matched to parameters by value (each master must round to exactly
one saved bf16 weight). transformers must load the export with logits equal to lmforge's model on the
same weights (<= 1e-4, see hf_verify.LOGIT_ATOL); a bf16 export must be the masters rounded to bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge.model import build_model, config_from_dict
from lmforge.trainer.checkpoint import CheckpointError
from lmforge.trainer.hf.export import export
from lmforge.trainer.hf.importer import load_hf_weights
from lmforge.trainer.hf.verify import LOGIT_ATOL
from tests.helpers.runs import deepspeed_train, write_config

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.slow
TAG = "step_00000002"


def _train_bf16(tmp_path, tiny_data, stage: int, ds_template: dict | None = None):
    run = tmp_path / "run"
    parallel = {"zero_stage": stage}
    if ds_template is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds_template))
        parallel["ds_config"] = str(tmp_path / "ds.json")
    # lr 2e-2 without warmup: two Adam steps move every weight by ~4e-2, more than bf16's spacing near
    # 1.0 (2^-7), so the norm weights no longer all round to 1.0 and the ZeRO-0 masters match uniquely.
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run,
                       train={"micro_batch_size": 2, "grad_accum": 1, "max_steps": 2, "seed": 7, "precision": "bf16"},
                       optim={"lr": 2e-2, "min_lr": 2e-3, "warmup_steps": 0}, parallel=parallel,
                       checkpoint={"interval": 2, "keep_last": 1})
    deepspeed_train(cfg, [], timeout=300)
    ckpt = run / "checkpoints"
    meta = json.loads((ckpt / TAG / "lmforge.json").read_text())
    assert meta["precision"] == "bf16" and meta["zero_stage"] == stage
    return ckpt, config_from_dict(meta["model_config"])


def _masters_zero0(states_file, cfg) -> dict[str, torch.Tensor]:
    sd = torch.load(states_file, weights_only=True)
    module = {k: v for k, v in sd["module"].items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    masters = [t for group in sd["optimizer"]["fp32_groups"] for t in group]
    out = {}
    for t in masters:
        assert t.dtype == torch.float32
        hits = [k for k, w in module.items() if w.shape == t.shape and torch.equal(t.to(w.dtype), w)]
        assert len(hits) == 1, f"master {tuple(t.shape)} rounds to {hits}"
        out[hits[0]] = t
    assert set(out) == set(module)
    return out


def _masters_universal(ckpt, cfg) -> dict[str, torch.Tensor]:
    out_dir = ckpt.parent / "universal"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(ckpt / TAG), "--output_folder", str(out_dir), "--num_extract_workers", "1",
                    "--num_merge_workers", "1", "--inject_missing_state"], check=True, capture_output=True)
    names = [n for n, _ in build_model(cfg).named_parameters()]
    # DeepSpeed's own per-parameter fp32 file (a pickled dict: weights_only=False on our own test output)
    return {n: torch.load(out_dir / "zero" / n / "fp32.pt", weights_only=False)["param"] for n in names}


def _masters_zero_to_fp32(ckpt, cfg) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), TAG)
    return {k: v for k, v in full.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}


def _check_logits(out, cfg, weights: dict[str, torch.Tensor]):
    from transformers import LlamaForCausalLM as HFLlama

    hf = HFLlama.from_pretrained(str(out), dtype=torch.float32, local_files_only=True).eval()
    ours = build_model(cfg).eval()
    ours.load_state_dict({**weights, **({"lm_head.weight": weights["model.embed_tokens.weight"]}
                                        if cfg.tie_word_embeddings else {})})
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
    assert diff <= LOGIT_ATOL, diff


SCENARIOS = {
    "zero0": (0, None, lambda ckpt, cfg: _masters_zero0(ckpt / TAG / "mp_rank_00_model_states.pt", cfg)),
    # fp32 gradient accumulation makes DeepSpeed use BF16_Optimizer (bf16_zero_pp_rank_* files that
    # zero_to_fp32 rejects) instead of the ZeRO-1 optimizer
    "zero1_bf16_optimizer": (1, {"data_types": {"grad_accum_dtype": "fp32"}}, _masters_universal),
    "zero2": (2, None, _masters_zero_to_fp32),
    "zero3": (3, None, _masters_zero_to_fp32),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bf16_run_exports_fp32_masters(name, tmp_path, tiny_data):
    stage, template, read_masters = SCENARIOS[name]
    ckpt, cfg = _train_bf16(tmp_path, tiny_data, stage, template)
    assert any(f.name.startswith("bf16_zero_pp_rank_") for f in (ckpt / TAG).iterdir()) == (stage > 0)
    masters = read_masters(ckpt, cfg)

    out = export(ckpt, tmp_path / "hf")  # fp32, verified
    _, state = load_hf_weights(out)
    assert set(state) == set(masters) | {"lm_head.weight"}
    for k, v in masters.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v), k
    if stage < 3:  # the bf16 module weights upcast would be a different (wrong) export
        module = torch.load(ckpt / TAG / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        assert not torch.equal(module["model.layers.0.mlp.up_proj.weight"].float(),
                               masters["model.layers.0.mlp.up_proj.weight"])
    assert "fp32 master weights" in (out / "README.md").read_text()
    _check_logits(out, cfg, masters)

    out16 = export(ckpt, tmp_path / "hf16", dtype="bf16")
    _, state16 = load_hf_weights(out16)
    for k, v in masters.items():
        assert state16[k].dtype == torch.bfloat16 and torch.equal(state16[k], v.to(torch.bfloat16)), k

    if stage == 0:  # a master that no longer rounds to its saved bf16 weight is refused, nothing written
        path = ckpt / TAG / "mp_rank_00_model_states.pt"
        sd = torch.load(path, weights_only=True)
        with torch.no_grad():
            sd["optimizer"]["fp32_groups"][1][0].add_(0.25)
        torch.save(sd, path)
        # As if saved that way (the file records updated): the integrity check would refuse it first.
        from lmforge.trainer.checkpoint.integrity import record_files
        from lmforge.trainer.checkpoint.state import read_state, write_state

        state = read_state(ckpt / TAG)
        state.files = record_files(ckpt / TAG)
        write_state(ckpt / TAG, state)
        with pytest.raises(CheckpointError, match="does not round to the saved"):
            export(ckpt, tmp_path / "bad")
        assert not (tmp_path / "bad").exists() and not list(tmp_path.glob("bad.tmp-*"))


def test_bf16_zero0_tensor_parallel_2_exports_masters(tmp_path):
    """AutoTP-2 ZeRO-0 bf16 (tests/helpers/checkpoints.py: one optimizer group in model order, the exporter's other
    group layout): each TP rank's masters are value-matched to its shards; sharded q_proj is their
    concatenation, replicated norms are rank 0's master."""
    from tests.helpers.checkpoints import make_checkpoint, train_test_tokenizer

    tok = train_test_tokenizer(tmp_path / "sp")
    ckpt = make_checkpoint(tmp_path / "run", tok, [[1, 5, 6, 7, 8, 9]] * 2, zero_stage=0, world_size=2, tp=2,
                           precision="bf16")
    meta = json.loads((ckpt / TAG / "lmforge.json").read_text())
    cfg = config_from_dict(meta["model_config"])
    shards = [_masters_zero0(ckpt / TAG / f"mp_rank_{r:02d}_model_states.pt", cfg) for r in range(2)]
    out = export(ckpt, tmp_path / "hf")  # verified: weights + logits vs transformers
    _, state = load_hf_weights(out)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert shards[0][q].shape[0] * 2 == state[q].shape[0]
    assert torch.equal(state[q], torch.cat([shards[0][q], shards[1][q]]))
    assert torch.equal(state["model.norm.weight"], shards[0]["model.norm.weight"])

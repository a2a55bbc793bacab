"""Qwen3-MoE, the model and its Hugging Face mapping: lmforge's module against transformers'
``Qwen3MoeForCausalLM`` on the same weights (logits; the loss with the load-balancing loss added as
transformers adds it), the on-disk per-expert names both ways, and the counts (total against active).

Sizes: hidden 64, 4 heads of 32, 2 kv heads, 8 experts of width 32 with top 2 (renormalised), 3 layers of
which the first is dense (``mlp_only_layers``), vocab 1024. Every expert receives tokens at these sizes (the
test asserts it), so every expert's slice of the stacked weights is exercised, and a routing or weight-layout
mistake moves logits by O(0.1), far outside the 1e-5 bound (fp32 both sides: only sums differ in order).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmforge.model import IGNORE_INDEX, build_config, build_model, flops_per_token, num_params
from lmforge.model.qwen3_moe.hf import from_hf_config, to_hf_config
from lmforge.trainer.hf.export import hf_weights
from lmforge.trainer.hf.importer import HFImportError, load_hf_weights
from tests.helpers.models import perturb_norms

os.environ["HF_HUB_OFFLINE"] = "1"
VOCAB = 1024
ATOL = 1e-5


def small_cfg(**kw):
    shape = dict(vocab_size=VOCAB, num_hidden_layers=3, mlp_only_layers=(0,), router_aux_loss_coef=0.01,
                 tie_word_embeddings=False)
    return build_config("qwen3_moe", "qwen3-moe-debug", **{**shape, **kw})


def hf_twin(cfg, model):
    """transformers' Qwen3MoeForCausalLM built from our config.json, holding our model's weights."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**to_hf_config(cfg))).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def perturbed(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    perturb_norms(model)  # norms at 1 would hide a misplaced norm
    return model


def test_logits_and_loss_match_transformers():
    cfg = small_cfg()
    model = perturbed(cfg)
    hf = hf_twin(cfg, model)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
        assert (ours - theirs).abs().max().item() < ATOL
        # lmforge's labels are the next tokens already (transformers shifts inside)
        loss = model(ids, labels=torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1))
        out = hf(input_ids=ids, labels=ids, output_router_logits=True)
    assert abs(loss.item() - out.loss.item()) < ATOL, (loss.item(), out.loss.item())
    assert abs(model.stats["aux_loss"].item() - out.aux_loss.item()) < ATOL
    load = model.stats["expert_load"]
    assert load.shape == (2, 8) and (load > 0).all()  # 2 sparse layers; every expert used
    assert (load.sum(dim=1) == 2 * 48 * cfg.num_experts_per_tok).all()  # dropless: every assignment served


def test_z_loss_and_coefficients_enter_the_loss():
    cfg = small_cfg(router_z_loss_coef=0.5)
    model = perturbed(cfg)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    loss = model(ids, labels=ids)
    s = model.stats
    assert s["z_loss"] > 0
    assert abs(loss.item() - (s["lm_loss"] + 0.01 * s["aux_loss"] + 0.5 * s["z_loss"]).item()) < 1e-6
    loss.backward()  # the router learns from both auxiliary losses
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_counts_distinguish_total_and_active_parameters():
    cfg = build_config("qwen3_moe", "qwen3-moe-30b-a3b")
    assert 30.4e9 < num_params(cfg) < 30.6e9  # Qwen3-30B-A3B: 30.5B
    assert 3.2e9 < num_params(cfg, active=True) < 3.4e9  # ... A3B: 3.3B active
    # 6 x the weights a token multiplies by (its 8 experts, the router, attention, the head: the active
    # parameters but the embedding, a lookup, and the norms, no matmul) + attention's 6 x 2 x L x T x H x D
    embedding = cfg.vocab_size * cfg.hidden_size
    norms = cfg.num_hidden_layers * (2 * cfg.hidden_size + 2 * cfg.head_dim) + cfg.hidden_size
    attention = 6 * 2 * cfg.num_hidden_layers * 4096 * cfg.num_attention_heads * cfg.head_dim
    assert flops_per_token(cfg, 4096) == 6 * (num_params(cfg, active=True) - embedding - norms) + attention


def test_config_json_both_ways_and_refusals():
    cfg = small_cfg()
    assert from_hf_config(json.loads(json.dumps(to_hf_config(cfg))), "config.json") == cfg
    with pytest.raises(ValueError, match="num_experts_per_tok 9 must be in 1..num_experts"):
        small_cfg(num_experts_per_tok=9)
    with pytest.raises(ValueError, match="mlp_only_layers \\[7\\] are not layer indices"):
        small_cfg(mlp_only_layers=(7,))


def test_per_expert_names_on_disk_both_ways(tmp_path):
    """The export's safetensors name every expert's matrices (what released checkpoints and transformers 4
    hold); transformers 5 loads them into its stacked experts with the same logits, and import stacks them
    back bit for bit. A missing expert is an import error naming it."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = small_cfg()
    model = perturbed(cfg)
    sd = model.state_dict()
    getters = {k: (lambda t=t: t) for k, t in sd.items() if "rotary" not in k}
    from lmforge.model import family_of

    hf_get, hf_shapes = hf_weights(family_of(cfg).hf, getters, {k: v.shape for k, v in sd.items()})
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in hf_get
    assert not any(k.endswith("experts.gate_up_proj") for k in hf_get)
    tensors = {k: g() for k, g in hf_get.items()}
    assert all(tuple(tensors[k].shape) == tuple(hf_shapes[k]) for k in tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    hf_cfg = {**to_hf_config(cfg), "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, local_files_only=True).eval()
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids)).abs().max().item() < ATOL
    got_cfg, state = load_hf_weights(tmp_path)
    assert got_cfg == cfg
    assert all(torch.equal(state[k], sd[k]) for k in getters)

    del tensors["model.layers.2.mlp.experts.3.gate_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFImportError, match=r"missing weights \['model.layers.2.mlp.experts.3.gate_proj.weight'\]"):
        load_hf_weights(tmp_path)


def random_qwen3_moe(out):
    """A random transformers Qwen3MoeForCausalLM (3 layers, the first dense, 8 experts, top 2), norm weights
    perturbed, saved with safetensors as transformers saves it."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=3,
                         mlp_only_layers=[0], num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    hf = Qwen3MoeForCausalLM(cfg).eval()
    perturb_norms(hf)  # norms at 1 would hide a misplaced norm
    hf.save_pretrained(out)
    return hf


@pytest.mark.slow
def test_imported_qwen3_moe_trains_logs_its_experts_exports_and_resumes_elsewhere(tmp_path, tiny_data):
    """import_hf of a transformers Qwen3-MoE -> 3 steps on 2 ranks at expert parallel 2 (DeepSpeed AutoEP: 4
    experts per rank, tokens exchanged by all-to-all; ZeRO-3 partitions each rank's 4 × 64 × 32 expert
    tensors, above its 640-value persistence threshold; fp32) -> the first step's language-model loss equals
    transformers' on the same samples; metrics.jsonl and TensorBoard have the auxiliary losses and every
    sparse layer's expert load -> the step-3 checkpoint resumes on 1 rank at expert parallel 1 (universal
    conversion: AutoEP's expert shards joined) -> export_hf of that checkpoint (AutoEP's names mapped back;
    verified: weights bit-exact, logits) reloads in transformers, whose loss on the step-4 samples equals the
    resumed run's."""
    import shutil
    import sys

    from lmforge.data_pipeline.gpt_dataset import build_dataset
    from tests.helpers.process import run_cmd
    from tests.helpers.runs import deepspeed_train, hf_loss_on_packed_samples, read_metrics, write_config

    py = sys.executable
    hf_dir, init, run, export = (tmp_path / n for n in ("hf", "init", "run", "export"))
    original = random_qwen3_moe(hf_dir)
    run_cmd([py, "-m", "lmforge.trainer.import_hf", "--model", hf_dir, "--output", init])  # verifies logits
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, model={"init_from_hf": str(init)},
                       train={"max_steps": 3, "micro_batch_size": 2, "seed": 7, "precision": "fp32"},
                       optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1}, checkpoint={"interval": 3},
                       parallel={"zero_stage": 3, "expert_parallel": 2})
    out = deepspeed_train(cfg, ["model.preset=null"], nproc=2)
    assert "world 2 = dp 2 × tp 1 | experts over groups of 2 ranks (DeepSpeed AutoEP) | ZeRO-3" in out.stdout
    assert "active per token" in out.stdout, out.stdout[-3000:]
    rows, moe = read_metrics(run), read_metrics(run, kind="moe")
    assert [r["step"] for r in rows] == [1, 2, 3] == [r["step"] for r in moe]
    train = build_dataset([(str(tiny_data["data"]), 1.0)], "train", 64, 16, 7, cache_dir=None)
    want, docs = hf_loss_on_packed_samples(original, [train[i] for i in range(4)], eod_id=2)
    assert docs >= 4 and abs(moe[0]["lm_loss"] - want) < 2e-5, (moe[0], want)
    assert abs(rows[0]["loss"] - (moe[0]["lm_loss"] + 0.01 * moe[0]["aux_loss"])) < 1e-5  # the loss trained on
    for r in moe:  # 2 sparse layers (layer 0 is dense): named by their order among the sparse layers
        assert 1 <= r["layer0/max_over_mean"] <= 8 and 0.125 <= r["layer1/busiest_share"] <= 1, r
        assert r["max_over_mean"] == max(r["layer0/max_over_mean"], r["layer1/max_over_mean"])
        assert r["aux_loss"] >= 1.0  # E · Σ f·P >= 1, equality at perfect balance
    assert rows[-1]["loss"] < rows[0]["loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    for key in ("lm_loss", "aux_loss", "z_loss", "max_over_mean", "layer0/max_over_mean", "layer1/busiest_share"):
        events = {e.step: e.value for e in tb.Scalars(f"moe/{key}")}
        assert [events[r["step"]] for r in moe] == pytest.approx([r[key] for r in moe], rel=1e-6), key

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    cfg2 = write_config(tmp_path / "cfg2.yaml", tiny_data, resumed, model={"init_from_hf": str(init)},
                        train={"max_steps": 4, "micro_batch_size": 4, "seed": 7, "precision": "fp32"},
                        optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1}, checkpoint={"interval": 3},
                        parallel={"zero_stage": 3, "expert_parallel": 1})
    out = deepspeed_train(cfg2, ["model.preset=null"], nproc=1)
    assert "expert parallel 2 -> 1" in out.stdout and "resumed from" in out.stdout, out.stdout[-3000:]
    run_cmd([py, "-m", "lmforge.trainer.export_hf", "--checkpoint", resumed / "checkpoints", "--output", export,
             "--step", "3"])
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32, local_files_only=True).eval()
    assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
    step4 = read_metrics(resumed, kind="moe")[-1]
    want4, _ = hf_loss_on_packed_samples(reloaded, [train[i] for i in range(12, 16)], eod_id=2)
    assert step4["step"] == 4 and abs(step4["lm_loss"] - want4) < 2e-5, (step4, want4)


def test_experts_with_tensor_or_sequence_parallelism_are_refused_at_start_up():
    from lmforge.trainer.config import ConfigError
    from lmforge.trainer.parallel.layout import check_experts

    cfg = small_cfg()
    check_experts(cfg, 1, 1)
    check_experts(build_config("qwen3", "qwen3-debug"), 2, 2)  # dense: no objection here
    for tp, sp, key in ((2, 1, "tensor_parallel"), (1, 2, "sequence_parallel")):
        with pytest.raises(ConfigError, match=f"parallel.{key}=2 with a qwen3_moe model \\(num_experts=8\\): not "
                                              f"supported.*set parallel.{key}=1"):
            check_experts(cfg, tp, sp)


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel,how", [(0, "stop file"), (2, "kill -9")])
def test_a_stopped_qwen3_moe_run_resumes_bitwise(tmp_path, tiny_data, expert_parallel, how):
    """2 ranks, ZeRO-2, the debug MoE preset: with the reference experts, a run stopped by the stop file after
    step 1 (it saves); at expert parallel 2 (AutoEP: each rank saves its 4 experts in DeepSpeed's per-expert
    files), the launcher's whole session SIGKILLed once the step-2 checkpoint is complete (a node failure; the
    steps after it are lost). Started again, either gives the uninterrupted run's losses and expert metrics,
    bit for bit, at every step."""
    from tests.helpers.runs import deepspeed_train, kill_after_first_checkpoint, read_metrics, write_config

    def config(run, interval=0):
        return write_config(tmp_path / f"{run.name}.yaml", tiny_data, run, model={"preset": "qwen3-moe-debug"},
                            train={"max_steps": 5, "micro_batch_size": 2, "seed": 7, "precision": "fp32"},
                            checkpoint={"interval": interval}, parallel={"zero_stage": 2,
                                                                         "expert_parallel": expert_parallel})

    ref, run = tmp_path / "ref", tmp_path / "run"
    deepspeed_train(config(ref), [], nproc=2)
    run.mkdir()
    if how == "stop file":
        (run / "STOP").touch()
        assert "stopping on the stop file" in deepspeed_train(config(run), [], nproc=2).stdout
    else:
        kill_after_first_checkpoint(config(run, interval=2), run, tmp_path / "killed.log")
        assert max(r["step"] for r in read_metrics(run)) < 5, "the run finished before the kill"
    assert "resumed from" in deepspeed_train(config(run), [], nproc=2).stdout

    def rows(d, kind):
        return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "tokens_per_s_per_device",
                                                            "tflops_per_device", "tflops_per_device_causal_doc",
                                                            "step_time_s", "data_wait_frac", "mfu", "mfu_causal_doc",
                                                            "rss_peak_gb") and not k.startswith("mem")}
                for r in read_metrics(d, kind)]
    for kind in ("train", "moe"):
        got = {r["step"]: r for r in rows(run, kind)}
        assert [got[r["step"]] for r in rows(ref, kind)] == rows(ref, kind), kind


def test_checkpointed_blocks_keep_no_router_logits_after_backward():
    """Under activation checkpointing the recomputation runs each block's forward again inside backward; the
    logits it makes must not be kept on the block, or their graph holds the recomputed activations until the
    next step (measured before the fix: 288 MiB for qwen3-moe-tiny at 4 × 2048; docs/planning.md)."""
    from lmforge.trainer.parallel.transforms import apply_activation_checkpointing

    cfg = small_cfg()
    model = build_model(cfg)
    apply_activation_checkpointing(model, 1)
    ids = torch.randint(0, VOCAB, (2, 32))
    loss = model(ids, labels=ids)
    assert all(b.router_logits is None for b in model.moe_blocks())  # dropped once the losses read them
    loss.backward()
    assert all(b.router_logits is None for b in model.moe_blocks())  # the recomputation kept none
    assert model.stats["aux_loss"] > 0 and all(p.grad is not None for p in model.model.layers[1].mlp.gate.parameters())

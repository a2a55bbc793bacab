"""Expert parallelism through DeepSpeed AutoEP (``parallel.expert_parallel``) against the model's own reference
experts, on 2 real CPU ranks over gloo, and what is refused at start-up.

Sizes (``qwen3-moe-debug``, vocab 1000): hidden 64, 8 experts of width 32, top 2, 2 sparse layers. At expert
parallel 2 each rank holds 4 experts and the all-to-all moves tokens both ways; each rank's expert tensor
(4 × 32 × 64 = 8,192 values) is above ZeRO-3's persistence threshold here (10·d = 640, ``ds_config.py``) and
twice the reduce bucket (d² = 4,096), so ZeRO-3 partitions and gathers the experts and ZeRO-1/2 reduce them
in more than one bucket; the router (8 × 64) persists. Documents are masked (``data.intra_doc_attention``,
the default) and the z-loss is switched on, so both auxiliary losses reach the gradients.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.model import build_config
from lmforge.trainer.config import ConfigError, ParallelSection

MOE = {"preset": "qwen3-moe-debug", "router_z_loss_coef": 1e-3}
TRAIN = {"max_steps": 6, "micro_batch_size": 2, "seed": 7, "precision": "fp32"}
# fp32 on both paths; only the order of sums differs (grouped GEMM against the per-expert loop, the
# all-to-all's order of arrival, ZeRO's bucketing): measured 3e-8 relative over 6 steps. The bound.
REL = 1e-5


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.slow
def test_expert_parallel_2_and_1_match_the_reference_experts_at_every_zero_stage(tmp_path, tiny_data):
    """Reference experts (ZeRO-3: the stacked expert tensors partitioned) against AutoEP at expert parallel 1
    (grouped GEMM, no exchange) and 2 at ZeRO 0, 1, 2 and 3: per step, the loss, the language-model loss and
    both auxiliary losses within 1e-5; the first step's per-layer expert load identical (same weights, same
    router logits)."""
    from tests.helpers.runs import deepspeed_train, read_metrics, write_config

    runs = {"reference": (0, 3), "ep1-zero2": (1, 2), **{f"ep2-zero{z}": (2, z) for z in (0, 1, 2, 3)}}
    got = {}
    for name, (ep, zero) in runs.items():
        run = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_data, run, model=MOE, train=TRAIN,
                           parallel={"zero_stage": zero, "expert_parallel": ep}, checkpoint={"interval": 0})
        out = deepspeed_train(cfg, [], nproc=2).stdout
        assert (f"experts over groups of {ep} ranks (DeepSpeed AutoEP)" in out) == (ep > 0), out[-2000:]
        got[name] = read_metrics(run), read_metrics(run, kind="moe")
    ref_rows, ref_moe = got.pop("reference")
    assert [r["step"] for r in ref_rows] == list(range(1, 7)) and ref_moe[0]["z_loss"] > 0
    for name, (rows, moe) in got.items():
        for r, want in zip(rows, ref_rows, strict=True):
            assert _rel(r["loss"], want["loss"]) < REL, (name, r["step"], r["loss"], want["loss"])
        for m, want in zip(moe, ref_moe, strict=True):
            for key in ("lm_loss", "aux_loss", "z_loss"):
                assert _rel(m[key], want[key]) < REL, (name, m["step"], key, m[key], want[key])
        first = {k: v for k, v in moe[0].items() if k.startswith("layer")}
        assert first == {k: v for k, v in ref_moe[0].items() if k.startswith("layer")}, name


def test_start_up_refusals_name_the_keys():
    from lmforge.trainer.parallel import experts

    moe, dense = build_config("qwen3_moe", "qwen3-moe-debug"), build_config("qwen3", "qwen3-debug")

    def check(mcfg=moe, world=2, compile=False, precision="fp32", **p):
        experts.check(mcfg, ParallelSection(**{"expert_parallel": 2, **p}), world, compile, precision)

    check()
    check(expert_parallel=0, offload="optimizer")  # the reference experts: no objection here
    check(compile=True, precision="bf16")
    for kw, match in ((dict(mcfg=dense), "parallel.expert_parallel=2: the qwen3 model has no experts"),
                      (dict(world=3), "parallel.expert_parallel=2 must divide the world size 3"),
                      (dict(expert_parallel=16, world=16), "must divide the model's num_experts=8"),
                      (dict(offload="optimizer"), "parallel.expert_parallel=2 with parallel.offload=optimizer"),
                      (dict(compile=True), "train.compile=true needs train.precision=bf16")):
        with pytest.raises(ConfigError, match=match):
            check(**kw)


def test_resume_between_reference_and_autoep_experts_is_refused(tmp_path):
    """Their parameters differ in names and layout: a checkpoint of one is not loaded into the other, and the
    error says how to move (export, then model.init_from_hf)."""
    from lmforge.trainer import checkpoint
    from lmforge.trainer.checkpoint import resume
    from lmforge.trainer.checkpoint.state import write_state
    from lmforge.trainer.config import RunConfig

    ckpt = tmp_path / "checkpoints"
    cfg = RunConfig(run_dir=str(tmp_path), tokenizer="t")

    def write_state_only(ckdir, tag, expert_parallel, zero_stage, data_parallel):
        (ckdir / tag).mkdir(parents=True, exist_ok=True)
        state = checkpoint.CheckpointState(
            step=3, consumed_samples=12, model_config=build_config("qwen3_moe", "qwen3-moe-debug").to_dict(),
            config=cfg.to_dict(), tokenizer=checkpoint.TokenizerRecord(sha256="sha"), data_fingerprint="fp",
            precision="fp32", zero_stage=zero_stage, tensor_parallel=1, data_parallel=data_parallel,
            world_size=data_parallel, global_batch_size=4, expert_parallel=expert_parallel)
        write_state(ckdir / tag, state)
    for saved, now in ((2, 0), (0, 1)):
        write_state_only(ckpt, "step_00000003", expert_parallel=saved, zero_stage=2, data_parallel=2)
        cfg.parallel.expert_parallel, cfg.parallel.zero_stage = now, 2
        with pytest.raises(ConfigError, match="export this checkpoint .* model.init_from_hf"):
            resume.plan(cfg, ckpt, dp=2, tp=1, tokenizer_sha="sha", data_fingerprint="fp", global_batch=4)
    write_state_only(ckpt, "step_00000003", expert_parallel=2, zero_stage=2, data_parallel=2)
    cfg.parallel.expert_parallel = 1  # another size: DeepSpeed's universal conversion
    plan = resume.plan(cfg, ckpt, dp=2, tp=1, tokenizer_sha="sha", data_fingerprint="fp", global_batch=4)
    assert plan.universal and "expert parallel 2 -> 1" in plan.reason
    write_state_only(ckpt, "step_00000003", expert_parallel=2, zero_stage=0, data_parallel=2)
    cfg.parallel.zero_stage = 0  # ZeRO-0 has no universal conversion
    with pytest.raises(ConfigError, match="ZeRO stages 1-3 only"):
        resume.plan(cfg, ckpt, dp=2, tp=1, tokenizer_sha="sha", data_fingerprint="fp", global_batch=4)


def test_reproduction_compiled_grouped_mm_rejects_fp32():
    """Why train.compile with expert parallelism needs bf16 (``experts.check``): torch 2.13's traced
    ``torch._grouped_mm`` (AutoEP's expert GEMM) accepts only bf16, though eager runs fp32 on CPU. When this
    test fails, torch has fixed it and the refusal can go."""
    a, b = torch.randn(8, 16), torch.randn(2, 16, 4)
    offs = torch.tensor([3, 8], dtype=torch.int32)
    eager = torch._grouped_mm(a, b, offs=offs)
    assert torch.allclose(eager[:3], a[:3] @ b[0], atol=1e-5) and torch.allclose(eager[3:], a[3:] @ b[1], atol=1e-5)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="Expected inputs of BF16 type"):
        torch.compile(lambda x, w: torch._grouped_mm(x, w, offs=offs), backend="eager", fullgraph=True)(a, b)

"""FP8 training on a GPU with float8 tensor cores (``train.precision: fp8``, trainer/parallel/fp8.py): real
``torch._scaled_mm`` matmuls, not the CPU emulation tests/test_fp8.py uses.

Skipped without CUDA; the float8 runs also need float8 tensor cores (compute capability >= 8.9: Ada, Hopper,
Blackwell), and below that ``test_fp8_start_up_check_follows_the_compute_capability`` checks the refusal
instead. Run on a GPU machine with ``pytest -q tests/gpu`` (benchmarks/gpu_check.sh runs this file first).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.helpers.paths import ROOT
from tests.helpers.process import run_cmd
from tests.helpers.runs import deepspeed_train, read_metrics, write_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def float8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_float8 = pytest.mark.skipif(not float8_capable(), reason="needs float8 tensor cores (compute capability >= 8.9)")

# fp8 against bf16, per-step loss, relative. This test's model, batches and 8 steps run with torchao's CPU
# emulation (same float8 rounding of operands and scales, matmuls in higher precision) measured 3.0e-4
# (tensorwise) and 6.1e-4 (rowwise) at most (2 CPU cores, 2026-12-05). The GPU's float8 kernels round the same
# way but accumulate in the tensor cores' own order: not yet measured on a GPU, so the bound is 1e-2 (16x the
# larger), which still fails a wrong scale (a factor 2 saturates or flushes values: O(1) loss changes). The
# test prints the measured maximum, so that a run on a GPU can tighten it.
REL = 1e-2
STEPS = 8


def _model(seed: int = 0):
    from lmforge.model.llama import LlamaConfig, LlamaForCausalLM

    # Every projection a multiple of 16 (the float8 GEMM's requirement), M = B·T = 1024: with
    # parallel.fp8_layers "all" all 14 decoder projections convert (auto's shape rule would keep most of them
    # in bf16 at this width).
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to("cuda")


def _train(model, batches) -> list[float]:
    """fp32 masters, bf16 autocast (what the bf16 engine computes in), AdamW: the per-step losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    losses = []
    for ids in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@needs_float8
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_trains_like_bf16_on_the_gpu_with_float8_kernels(recipe):
    """The same model, weights and batches, STEPS optimizer steps: bf16 against fp8 (every decoder projection
    Float8Linear); each step's loss within REL of bf16's and not identical to it, and the fp8 run really
    multiplies in float8 (``aten::_scaled_mm`` in its profile; no emulation on CUDA)."""
    from lmforge.trainer.parallel import fp8

    assert not fp8.emulated()
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, 1024, (4, 257), device="cuda", generator=g) for _ in range(STEPS)]
    bf16 = _train(_model(), batches)
    model = _model()
    converted, kept = fp8.convert(model, recipe, "all")
    assert len(converted) == 14 and kept == ["lm_head"], (converted, kept)
    assert "torch._scaled_mm" in fp8.describe(converted, kept, recipe)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        losses = _train(model, batches[:1])
    assert any("_scaled_mm" in e.key for e in prof.key_averages()), "no float8 matmul ran"
    model = _model()  # again from the same initial weights, unprofiled
    fp8.convert(model, recipe, "all")
    losses = _train(model, batches)
    rel = [abs(a - b) / b for a, b in zip(losses, bf16, strict=True)]
    print(f"fp8 {recipe} vs bf16, {STEPS} steps: losses {[round(x, 4) for x in losses]} vs "
          f"{[round(x, 4) for x in bf16]}; max relative difference {max(rel):.2e} (bound {REL:.0e})")
    assert all(math.isfinite(x) for x in losses), losses
    assert max(rel) < REL, rel
    assert losses != bf16  # float8 rounding really entered the matmuls


def test_fp8_start_up_check_follows_the_compute_capability():
    """On this GPU: accepted from compute capability 8.9 (Ada, Hopper, Blackwell), a config error naming it
    below; never emulated where CUDA exists."""
    from lmforge.trainer.config import ConfigError
    from lmforge.trainer.parallel import fp8

    assert not fp8.emulated()
    if float8_capable():
        fp8.check("fp8", "tensorwise", "auto", 1)
        fp8.check("fp8", "rowwise", "all", 1)
    else:
        with pytest.raises(ConfigError, match="compute capability 8.9"):
            fp8.check("fp8", "tensorwise", "auto", 1)


@needs_float8
@pytest.mark.slow
def test_throughput_benchmark_fp8_and_host_sync_profile(tmp_path):
    """benchmarks/train_throughput.py as gpu_check.sh runs it, small: --precision fp8 converts with the trainer's
    rule and says so; --profile-sync finds device kernels and DeepSpeed's per-step host reads (ZeRO-2 with
    clipping: ``has_overflow`` and ``get_grad_norm_direct`` read the device in the optimizer step), so the
    check's section e. measures something."""
    import json

    out = run_cmd([sys.executable, ROOT / "benchmarks" / "train_throughput.py", "--preset", "debug",
                   "--precision", "fp8", "--fp8-layers", "all", "--seq-len", "256", "--micro-batch", "2",
                   "--mean-doc-len", "60", "--variants", "eager:flex", "--warmup", "1", "--steps", "3",
                   "--profile-sync", "2", "--json", tmp_path / "r.json"], timeout=600)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["device"] == "cuda" and r["precision"] == "fp8" and r["fp8_layer_counts"]["converted"] == 14, r
    assert "torch._scaled_mm" in r["fp8"] and "linear layers converted" in out.stdout
    sp = r["sync_profile"]
    assert "error" not in sp, sp
    assert sp["device_events"] > 0 and sp["gpu_busy_ms"] > 0, sp
    assert sp["per_phase"]["step"]["calls"] >= 1, sp  # DeepSpeed's reads, in the optimizer step
    assert sp["loop"]["calls"] >= 1, sp  # the loop's own loss read
    assert "host syncs (" in out.stdout


@needs_float8
@pytest.mark.slow
def test_fp8_zero3_through_the_trainer_exports_verified(tmp_path, tiny_data):
    """The product on one GPU: ``train.precision: fp8`` (compiled by default with fp8), ZeRO-3 (the converted
    layers' weights partitioned), the debug preset with every projection converted; finite losses, MFU
    against the bf16 peak, and the checkpoint exports through the fp32 masters, verified against
    ``transformers``."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run,
                       train={"max_steps": 4, "precision": "fp8", "micro_batch_size": 4},
                       parallel={"zero_stage": 3, "fp8_layers": "all"}, data={"seq_len": 256},
                       checkpoint={"interval": 0})
    out = deepspeed_train(cfg, [], nproc=1).stdout
    assert "14 linear layers converted" in out and "torch._scaled_mm" in out, out[-3000:]
    assert "decoder layers compiled" in out, out[-3000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows), rows
    if "mfu" in rows[-1]:  # a GPU whose peak is known (H100/H200, ...): fp8 MFU is against the bf16 peak
        assert rows[-1]["mfu_peak"] == "bf16", rows[-1]
    exp = run_cmd([sys.executable, "-m", "lmforge.trainer.export_hf", "--checkpoint", run / "checkpoints",
                   "--output", tmp_path / "hf"], timeout=600, cwd=ROOT)
    assert "exported and verified" in exp.stdout + exp.stderr, (exp.stdout + exp.stderr)[-3000:]

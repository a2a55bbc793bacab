"""GPU-only checks: fp16 with dynamic loss scaling through the real trainer, NCCL, flash attention.

Skipped on machines without CUDA (the only allowed skip). Run on a GPU machine with
``.venv/bin/pytest -q tests/gpu``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.paths import ROOT
from tests.helpers.process import run_cmd
from tests.helpers.runs import deepspeed_train, read_metrics, write_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.slow
def test_fp16_dynamic_loss_scaling_trains(tmp_path, tiny_data):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run,
                       train={"max_steps": 8, "precision": "fp16", "micro_batch_size": 4})
    out = deepspeed_train(cfg, [], nproc=1)
    assert "| fp16 |" in out.stdout
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert math.isfinite(r["loss"]), r
        # Dynamic scaling starts at 2**16 and may halve on overflow; it never reaches 0 or grows past it.
        assert "loss_scale" in r and 1.0 <= r["loss_scale"] <= 2.0**16, r
        assert math.log2(r["loss_scale"]).is_integer(), r  # dynamic scaling moves in powers of two
    # Overflowing steps are skipped (and the scale halved), but most steps must have updated the weights.
    assert rows[-1]["skipped_steps"] < 4, rows[-1]


def nccl_collectives() -> list:
    """On each rank: trainer.parallel.distributed.init() must give NCCL on CUDA, and collectives work."""
    import os

    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = dist.get_backend()
    x = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    assert torch.all(x == world * (world + 1) / 2), x[:4]  # 1 + 2 + ... + world, exact in fp32
    parts = [torch.empty(4, device="cuda") for _ in range(world)]
    dist.all_gather(parts, torch.full((4,), float(rank), device="cuda"))
    return [rank, world, backend, [int(q[0].item()) for q in parts]]


@pytest.mark.slow
def test_nccl_backend_and_collectives():
    n = min(2, torch.cuda.device_count())  # 2 ranks when possible, else a 1-rank NCCL group
    results = run_distributed(nccl_collectives, n, timeout=300)
    assert results == [[r, n, "nccl", list(range(n))] for r in range(n)], results


def _flash_model():
    from lmforge.model.llama import LlamaConfig, LlamaForCausalLM

    # head_dim 64 (flash supports <= 256, multiples of 8); 8 query heads over 2 kv heads: the GQA path.
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)


def test_flash_attention_runs_and_matches_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _flash_model()
    x = torch.randint(0, 512, (2, 256), device="cuda")
    y = torch.randint(0, 512, (2, 256), device="cuda")
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        model.zero_grad(set_to_none=True)
        # Only this backend is allowed: if flash could not take our attention call (dtype, GQA, head
        # dim, is_causal), SDPA raises "No available kernel" instead of silently falling back.
        with sdpa_kernel(backend):
            logits = model(x)
            loss = model(x, labels=y)
            loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.float()
        results[backend] = (logits.float(), loss.item(), grad)
    (lf, loss_f, gf), (lm, loss_m, gm) = results[SDPBackend.FLASH_ATTENTION], results[SDPBackend.MATH]
    # bf16 keeps 8 significant bits (relative rounding 2**-9 ~ 2e-3 per op); flash and math accumulate in
    # different orders and flash keeps P in bf16, so across 2 layers a few 1e-3 of relative error is
    # expected; 2e-2 leaves margin while still catching a wrong mask, rotary or GQA grouping (~100%).
    rel = ((lf - lm).norm() / lm.norm()).item()
    assert rel < 2e-2, rel
    assert abs(loss_f - loss_m) < 2e-2 * abs(loss_m), (loss_f, loss_m)
    grel = ((gf - gm).norm() / gm.norm()).item()
    assert grel < 5e-2, grel  # gradients go through two more bf16 matmul chains: looser


def test_intra_document_attention_uses_flash_and_matches_documents_alone():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _flash_model()
    from lmforge.trainer.batching import document_spans

    lengths = [[100, 1, 155], [256], [64, 64, 128]]
    x = torch.randint(3, 512, (3, 256), device="cuda")
    seg = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lengths])  # host, as the trainer
    pos = torch.tensor([sum((list(range(n)) for n in row), []) for row in lengths], device="cuda")
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # per span: flash or "No available kernel"
        packed = model(x, doc_spans=document_spans(seg), position_ids=pos).float()
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(x[b:b + 1, start:start + n])[0].float()
                part = packed[b, start:start + n]
                # bf16 (see test_flash_attention_runs_and_matches_math): batch shapes change the kernels'
                # accumulation order only; attending across documents would be ~100% off.
                rel = ((part - alone).norm() / alone.norm()).item()
                assert rel < 2e-2, (b, start, rel)
                start += n


@pytest.mark.slow
def test_throughput_benchmark_runs_on_gpu(tmp_path):
    out = run_cmd([sys.executable, ROOT / "benchmarks" / "train_throughput.py", "--preset", "debug",
                   "--precision", "bf16", "--seq-len", "256", "--micro-batch", "2", "--warmup", "2",
                   "--steps", "3", "--compare-hf", "--rounds", "2", "--json", tmp_path / "r.json"], timeout=600)
    import json

    r = json.loads((tmp_path / "r.json").read_text())
    assert r["device"] == "cuda" and r["precision"] == "bf16"
    assert r["ours"]["tokens_per_s"] > 0 and r["hf"]["tokens_per_s"] > 0 and r["ratio_ours_over_hf"] > 0
    assert "step-time ratio ours/HF" in out.stdout


@pytest.mark.slow
def test_no_device_syncs_from_our_step_path(tmp_path, tiny_data):
    """bf16 ZeRO-1 on CUDA under torch.cuda.set_sync_debug_mode("warn"): no synchronizing call from
    trainer/ or model/ inside train_step or between sync steps (DeepSpeed's own overflow check and
    gradient-norm reads are not ours: README, "Host syncs")."""
    from tests.test_step_sync import run_with_cuda_sync_warnings

    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, tmp_path / "run",
                       train={"max_steps": 12, "micro_batch_size": 2, "grad_accum": 2, "precision": "bf16"},
                       log={"interval": 5}, checkpoint={"interval": 0}, eval={"interval": 0},
                       parallel={"zero_stage": 1})
    (syncs, sync_steps), = run_distributed(run_with_cuda_sync_warnings, 1, (str(cfg),), timeout=600)
    bad = [r for r in syncs if r[1] == "train_step" or (r[1] == "loop" and r[0] not in sync_steps)]
    assert bad == [], bad


def test_flex_document_attention_matches_per_span_attention_with_gradients():
    """The CUDA default for packed documents (one flex kernel per layer, block mask built on the GPU)
    against per-span flash SDPA (itself checked against documents run alone above), forward and backward."""
    from lmforge.trainer.batching import document_attention, on_device

    lengths = [[100, 1, 155], [256], [64, 64, 128], [3] * 85 + [1]]
    x = torch.randint(3, 512, (4, 256), device="cuda")
    seg = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lengths])
    pos = torch.tensor([sum((list(range(n)) for n in row), []) for row in lengths])
    out = {}
    for kernel in ("spans", "flex"):
        model = _flash_model()  # same seed: same weights
        batch = document_attention({"input_ids": x.cpu(), "labels": torch.roll(x, -1, 1).cpu(),
                                    "position_ids": pos, "segment_ids": seg}, min_mean_tokens=0, kernel=kernel)
        batch = on_device({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        assert ("attn_mask" in batch) == (kernel == "flex")
        loss = model(**batch)
        loss.backward()
        out[kernel] = (loss.item(), [p.grad.float() for p in model.parameters()])
    (ls, gs), (lf, gf) = out["spans"], out["flex"]
    # bf16 tolerances as in test_flash_attention_runs_and_matches_math; a mask that let documents see
    # each other, or dropped a block, changes the loss and gradients by far more.
    assert abs(lf - ls) < 1e-2 * abs(ls), (lf, ls)
    for a, b in zip(gf, gs):
        assert ((a - b).norm() / b.norm()).item() < 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1])  # ZeRO-2 and eager/compiled parity per stage: CPU tests
def test_bf16_compiled_flex_training_matches_eager(tmp_path, tiny_data, zero_stage):
    """train.compile with the flex document kernel, bf16 on one GPU, against the same run eager with
    per-span attention: same data, same initial weights."""
    losses = {}
    for name, over in (("eager", {"train": {"compile": False}, "parallel": {"attention_kernel": "spans"}}),
                       ("compiled", {"train": {"compile": True}, "parallel": {"attention_kernel": "auto"}})):
        run = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_data, run,
                           train={"max_steps": 6, "precision": "bf16", "micro_batch_size": 4, **over["train"]},
                           parallel={"zero_stage": zero_stage, **over["parallel"]},
                           data={"seq_len": 256}, checkpoint={"interval": 0})
        out = deepspeed_train(cfg, [], nproc=1)
        if name == "compiled":
            assert "train.compile: 2 decoder layers compiled" in out.stdout, out.stdout[-3000:]
        losses[name] = [r["loss"] for r in read_metrics(run)]
    # bf16: per-step losses agree to ~1e-2 relative (kernel and fusion order differ; see the flash test).
    for e, c in zip(losses["eager"], losses["compiled"]):
        assert abs(e - c) < 2e-2 * abs(e), losses


@pytest.mark.slow
def test_bf16_zero3_trains_and_exports_verified(tmp_path, tiny_data):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run,
                       train={"max_steps": 4, "precision": "bf16", "micro_batch_size": 4},
                       parallel={"zero_stage": 3}, data={"seq_len": 256}, checkpoint={"interval": 0})
    deepspeed_train(cfg, [], nproc=1)
    rows = read_metrics(run)
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows), rows
    out = run_cmd([sys.executable, "-m", "lmforge.trainer.export_hf", "--checkpoint", run / "checkpoints",
                   "--output", tmp_path / "hf"], timeout=600)
    assert (tmp_path / "hf" / "model.safetensors").exists() or list((tmp_path / "hf").glob("*.safetensors"))
    assert "verif" in (out.stdout + out.stderr).lower()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL: one rank per GPU)")
def test_nccl_rank_death_ends_the_job(tmp_path, tiny_data):
    """A rank SIGKILLed under NCCL (bf16, launch_scripts/single_node.sh): the survivor's collective fails
    through NCCL's asynchronous error handling (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, set by the trainer)
    instead of hanging for parallel.collective_timeout_minutes; the job ends non-zero, nothing is left."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    from tests.helpers.process import child_env, free_port

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run,
                       train={"max_steps": 100000, "precision": "bf16", "micro_batch_size": 4},
                       checkpoint={"interval": 0}, log={"interval": 5},
                       parallel={"zero_stage": 1, "collective_timeout_minutes": 2})
    with open(tmp_path / "log", "w") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "launch_scripts" / "single_node.sh"), "-n", "2", "-p",
                                 str(free_port()), str(cfg)], cwd=ROOT, env=child_env(PYTHON=sys.executable),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not ((run / "metrics.jsonl").is_file() and read_metrics(run)):
            assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.2)
        procs = psutil.Process(proc.pid).children(recursive=True)
        rank1 = [p for p in procs if "--local_rank=1" in p.cmdline()][0]
        t0 = time.time()
        rank1.kill()
        rc = proc.wait(timeout=180)
        print(f"NCCL job ended {time.time() - t0:.1f} s after the kill, status {rc}")
        assert rc != 0
        gone, alive = psutil.wait_procs(procs, timeout=30)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_bf16_sequence_parallel_flex_and_zeropp_quantized(tmp_path, tiny_data):
    """On CUDA: Ulysses (S = number of GPUs, at most 2) with the flex document kernel in bf16 trains like
    S = 1 (bf16 tolerance as above); ZeRO-3 with ZeRO++ qwZ + qgZ (int8 weight gathers, int4 gradient
    reduce-scatter) trains to finite losses close to plain ZeRO-3 (quantization error: 5e-2 relative)."""
    n = min(2, torch.cuda.device_count())
    losses = {}
    for name, nproc, parallel in (("s1", 1, {"zero_stage": 1}), ("sp", n, {"zero_stage": 1, "sequence_parallel": n}),
                                  ("z3", n, {"zero_stage": 3}),
                                  ("qz", n, {"zero_stage": 3, "zero_quantized_weights": True,
                                             "zero_quantized_gradients": True})):
        run = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_data, run,
                           train={"max_steps": 6, "precision": "bf16", "micro_batch_size": 4},
                           parallel={**parallel, "attention_kernel": "flex"},
                           data={"seq_len": 256, "intra_doc_attention": True}, checkpoint={"interval": 0})
        deepspeed_train(cfg, [], nproc=nproc)
        losses[name] = [r["loss"] for r in read_metrics(run)]
        assert all(math.isfinite(x) for x in losses[name]), (name, losses[name])
    for a, b in zip(losses["s1"], losses["sp"]):
        assert abs(a - b) < 2e-2 * abs(a), losses
    for a, b in zip(losses["z3"], losses["qz"]):
        assert abs(a - b) < 5e-2 * abs(a), losses

"""Real trainer runs: the data they read, their configs, the ``deepspeed`` launch, and what they log.

``build_tiny_data`` tokenizes the shipped sample corpus with a real SentencePiece model (vocab 1000)
into real shards; ``write_config`` writes a ``debug``-preset run config over it; ``deepspeed_train``
starts ``deepspeed --num_gpus N --module lmforge.trainer.train`` exactly as users do (gloo on CPU) and checks
that the run released DeepSpeed's shared-memory segments.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import BIN, ROOT, SAMPLE
from tests.helpers.process import free_port, run_cmd

TINY_VOCAB = 1000


def build_tiny_data(out: Path) -> dict:
    """A real SentencePiece tokenizer (vocab 1000, one trainer thread: the same model on every machine)
    and real shards (5% valid) of the sample corpus."""
    inputs = [SAMPLE / "wikipedia", SAMPLE / "books"]
    run_cmd([sys.executable, "-m", "lmforge.data_pipeline", "train-tokenizer", "--input", *inputs, "--vocab-size",
             TINY_VOCAB, "--threads", "1", "--output", out / "tok"])
    run_cmd([sys.executable, "-m", "lmforge.data_pipeline", "preprocess", "--input", *inputs, "--tokenizer",
             out / "tok" / "tokenizer.model", "--output", out / "data", "--valid-fraction", "0.05",
             "--strip-gutenberg", "--no-progress"])
    return {"tokenizer": out / "tok" / "tokenizer.model", "data": out / "data", "root": out}


def write_config(path: Path, tiny_data: dict, run_dir: Path, **sections) -> Path:
    """A debug-preset run config over ``tiny_data``; ``sections`` update whole sections (dicts) or keys."""
    import yaml

    cfg = {
        "run_dir": str(run_dir), "tokenizer": str(tiny_data["tokenizer"]),
        "model": {"preset": "debug"},
        "data": {"train": [{"path": str(tiny_data["data"]), "weight": 1.0}], "seq_len": 64},
        "train": {"micro_batch_size": 2, "grad_accum": 1, "max_steps": 6, "seed": 7, "precision": "fp32"},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2},
        "parallel": {"zero_stage": 2},
        "checkpoint": {"interval": 3, "keep_last": 2},
        "log": {"interval": 1},
        "eval": {"interval": 0, "steps": 2},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


def deepspeed_args(config: Path | str, overrides: list[str], nproc: int, port: int) -> list:
    return [BIN / "deepspeed", "--num_gpus", nproc, "--master_addr", "127.0.0.1", "--master_port", port,
            "--module", "lmforge.trainer.train", "--config", config, *overrides]


def deepspeed_train(config: Path | str, overrides: list[str], nproc: int = 2, timeout: int = 600,
                    check: bool = True, cwd: Path = ROOT, **env) -> subprocess.CompletedProcess:
    """A real multi-process run: ``deepspeed --num_gpus N --module lmforge.trainer.train`` on loopback, from
    ``cwd`` (the repository by default)."""
    from lmforge.trainer.parallel.deepspeed_compat import shm_segment_path

    port = free_port()
    proc = run_cmd(deepspeed_args(config, overrides, nproc, port), timeout=timeout, check=check, cwd=cwd, **env)
    # DeepSpeed's CPU shm all-reduce segments (~66 MB of RAM each) must not outlive the run.
    leaked = [p.name for r in range(nproc) if (p := shm_segment_path(r, "127.0.0.1", port)).exists()]
    assert not leaked, f"run left shared-memory segments behind: {leaked}"
    return proc


def kill_after_first_checkpoint(config: Path | str, run_dir: Path, log: Path, nproc: int = 2) -> None:
    """Start ``deepspeed`` on ``config`` in a session of its own and SIGKILL that whole session (launcher and
    ranks together, as a node failure would) as soon as a complete checkpoint exists; then it is gone."""
    import os
    import signal
    import time

    from lmforge.trainer import checkpoint
    from tests.helpers.process import child_env

    with open(log, "w") as out:
        proc = subprocess.Popen([str(a) for a in deepspeed_args(config, [], nproc, free_port())], cwd=ROOT,
                                env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while checkpoint.latest_tag(Path(run_dir) / "checkpoints") is None:
            assert proc.poll() is None, Path(log).read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]


def last_rows(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl is appended to by every start of a run: the last train record of each step."""
    return {r["step"]: r for r in read_metrics(run_dir)}


def check_flops_conventions(run_dir: Path, data: Path, seq_len: int, global_batch: int, seed: int,
                            peak: float) -> int:
    """Both FLOP conventions of every logged step of a run with ``log.interval`` 1, ``log.peak_tflops``
    ``peak`` and intra-document attention: the PaLM figure (``tflops_per_device``, ``mfu``: attention over
    whole rows, no causal half) and the causal_doc one (attention as computed: each packed document's causal
    triangle), whose ratio to it is recomputed from the documents of the step's global batch (the train
    order rebuilt from ``data``), and MFU = TFLOP/s ÷ the peak. Returns the number of steps whose batch holds
    a document boundary (where causal_doc differs from a causal whole row)."""
    import pytest
    import torch

    from lmforge.data_pipeline.gpt_dataset import build_dataset
    from lmforge.model import causal_doc_flops, config_from_dict, flops_per_token
    from lmforge.trainer import checkpoint as ckpt
    from lmforge.trainer.batching import make_batch

    ckdir = Path(run_dir) / "checkpoints"
    mcfg = config_from_dict(ckpt.read_state(ckdir / ckpt.latest_tag(ckdir)).model_config)
    rows = last_rows(run_dir)
    T, G = seq_len, global_batch
    train = build_dataset([(str(data), 1.0)], "train", T, max(rows) * G, seed, cache_dir=None)
    split = 0
    for step, r in sorted(rows.items()):
        seg = make_batch([train[i] for i in range((step - 1) * G, step * G)], eod_id=2,
                         intra_doc_attention=True)["segment_ids"]
        docs = [int(n) for row in seg for n in torch.unique_consecutive(row, return_counts=True)[1]]
        palm = flops_per_token(mcfg, T) * G * T
        want = causal_doc_flops(mcfg, sum(n * n for n in docs), G * T) / palm
        split += want < causal_doc_flops(mcfg, G * T * T, G * T) / palm * (1 - 1e-9)
        assert r["tflops_per_device_causal_doc"] / r["tflops_per_device"] == pytest.approx(want, rel=1e-9), step
        assert r["mfu_causal_doc"] < r["mfu"]
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / peak, rel=1e-12)
        assert r["mfu_causal_doc"] == pytest.approx(r["tflops_per_device_causal_doc"] / peak, rel=1e-12)
        assert (r["peak_tflops"], r["mfu_peak"]) == (peak, "log.peak_tflops")
    return split


def hf_loss_on_packed_samples(hf_model, samples: list, eod_id: int) -> tuple[float, int]:
    """The mean token loss ``transformers`` gives on packed samples when each document is run on its own
    (what the trainer computes with intra-document attention: rotary attention depends only on relative
    positions, so a document's logits do not depend on where in the row it sits); also the number of
    documents, so a caller can check the samples really pack several."""
    import torch

    from lmforge.trainer.batching import document_spans, make_batch

    b = make_batch(samples, eod_id=eod_id, intra_doc_attention=True)
    spans = document_spans(b["segment_ids"])
    with torch.no_grad():
        logits = torch.cat([torch.cat([hf_model(b["input_ids"][i:i + 1, s:e]).logits for s, e in row], dim=1)
                            for i, row in enumerate(spans)])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))
    return loss.item(), sum(len(row) for row in spans)

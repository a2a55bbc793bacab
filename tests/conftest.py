"""Shared fixtures: paths, a small real dataset (tokenizer + shards) and a DeepSpeed launcher helper."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CORPORA = SHARED / "corpora"
SAMPLE = ROOT / "data_pipeline" / "sample_corpus"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{BIN}:{env.get('PATH', '')}")
    env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cmd(args: list[str], timeout: int = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], cwd=ROOT, env=child_env(**env), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                             f"\n--- stderr\n{p.stderr[-6000:]}")
    return p


def deepspeed_train(config: Path | str, overrides: list[str], nproc: int = 2, timeout: int = 600,
                    check: bool = True, **env) -> subprocess.CompletedProcess:
    """A real multi-process run: `deepspeed --num_gpus N --module trainer.train` on loopback (gloo on CPU)."""
    port = free_port()
    args = [BIN / "deepspeed", "--num_gpus", nproc, "--master_addr", "127.0.0.1", "--master_port", port,
            "--module", "trainer.train", "--config", config, *overrides]
    proc = run_cmd(args, timeout=timeout, check=check, **env)
    # DeepSpeed's CPU shm all-reduce segments (~66 MB of RAM each) must not outlive the run.
    from trainer.distributed import shm_segment_path

    leaked = [p.name for r in range(nproc) if (p := shm_segment_path(r, "127.0.0.1", port)).exists()]
    assert not leaked, f"run left shared-memory segments behind: {leaked}"
    return proc


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A real SentencePiece tokenizer (vocab 1000) and real shards of the shipped sample corpus."""
    out = tmp_path_factory.mktemp("tiny_data")
    inputs = [SAMPLE / "wikipedia", SAMPLE / "books"]
    run_cmd([sys.executable, "-m", "data_pipeline", "train-tokenizer", "--input", *inputs, "--vocab-size", "1000",
             "--output", out / "tok"])
    run_cmd([sys.executable, "-m", "data_pipeline", "preprocess", "--input", *inputs, "--tokenizer",
             out / "tok" / "tokenizer.model", "--output", out / "data", "--valid-fraction", "0.05",
             "--strip-gutenberg", "--no-progress"])
    return {"tokenizer": out / "tok" / "tokenizer.model", "data": out / "data", "root": out}


def write_config(path: Path, tiny_data: dict, run_dir: Path, **sections) -> Path:
    """A debug-preset run config over ``tiny_data``; ``sections`` override whole keys."""
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

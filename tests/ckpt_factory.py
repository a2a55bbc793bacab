"""Real DeepSpeed checkpoints in the lmforge layout (notes/CHECKPOINT.md), for export/import tests.

``make_checkpoint`` runs ``python tests/ckpt_factory.py`` in a subprocess that spawns ``world_size``
gloo processes; each builds a real ``deepspeed.initialize`` engine (CPU accelerator), takes a few
optimizer steps on random tokens, evaluates a fixed held-out batch, and saves with
``save_checkpoint(dir, tag=step_XXXXXXXX, save_latest=False)``. Rank 0 then writes ``lmforge.json``,
``tokenizer.model`` and ``latest`` exactly as the trainer does, so the tests do not depend on it.

The held-out batch (``RUN/eval_batch.pt``: ``input_ids`` (B, T) int64) and the loss the engine computed
on it (``eval_loss`` in lmforge.json) let a test check that ``transformers`` reproduces that loss.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(run_dir: Path, tokenizer_model: Path, eval_ids: list[list[int]], *, zero_stage: int,
                    world_size: int = 2, tp: int = 1, precision: str = "fp32", preset: str = "debug",
                    steps: int = 2, overrides: dict | None = None, timeout: float = 240) -> Path:
    """Create RUN_DIR/checkpoints with one complete tag; returns the checkpoints directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    import torch

    torch.save({"input_ids": torch.tensor(eval_ids, dtype=torch.int64)}, run_dir / "eval_batch.pt")
    spec = dict(run_dir=str(run_dir), tokenizer=str(tokenizer_model), zero_stage=zero_stage,
                world_size=world_size, tp=tp, precision=precision, preset=preset, steps=steps,
                overrides=overrides or {}, port=free_port())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"checkpoint factory failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-6000:]}")
    return run_dir / "checkpoints"


def _worker(rank: int, spec: dict) -> None:
    import deepspeed
    import sentencepiece as spm
    import torch
    import torch.distributed as dist

    from model import LlamaForCausalLM, get_preset

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec["world_size"]),
                      LOCAL_WORLD_SIZE=str(spec["world_size"]), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(spec["port"]))
    deepspeed.init_distributed(dist_backend="gloo")
    sp = spm.SentencePieceProcessor(model_file=spec["tokenizer"])
    cfg = get_preset(spec["preset"], **{"vocab_size": sp.get_piece_size(), **spec["overrides"]})
    torch.manual_seed(0)  # same init on every rank, as the trainer does
    model = LlamaForCausalLM(cfg)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": spec["zero_stage"]},
        "bf16": {"enabled": spec["precision"] == "bf16"},
        "fp16": {"enabled": spec["precision"] == "fp16"},
        "steps_per_print": 10**9,
    }
    if spec["tp"] > 1:
        ds_config["tensor_parallel"] = {"autotp_size": spec["tp"]}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    gen = torch.Generator().manual_seed(1 + rank // spec["tp"])  # same data within a TP group
    loss = None
    for _ in range(spec["steps"]):
        ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)
        loss = engine(ids[:, :-1], labels=ids[:, 1:].contiguous())  # pre-shifted labels
        engine.backward(loss)
        engine.step()
    eval_ids = torch.load(Path(spec["run_dir"]) / "eval_batch.pt", weights_only=True)["input_ids"]
    engine.eval()
    with torch.no_grad():
        eval_loss = float(engine(eval_ids[:, :-1], labels=eval_ids[:, 1:].contiguous()))
    engine.train()
    ckpt = Path(spec["run_dir"]) / "checkpoints"
    step = spec["steps"]
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt), tag=tag, save_latest=False)
    dist.barrier()
    if rank == 0:
        tok_dst = ckpt / "tokenizer.model"
        shutil.copyfile(spec["tokenizer"], tok_dst)
        meta = {
            "format": "lmforge-checkpoint-v1", "step": step, "consumed_samples": step * 2 * spec["world_size"],
            "model_config": cfg.to_dict(),
            "config": {"model": {"preset": spec["preset"]}, "precision": spec["precision"],
                       "zero_stage": spec["zero_stage"], "data": {"train": [{"path": "random-tokens", "weight": 1.0}]}},
            "tokenizer": {"file": "tokenizer.model", "sha256": hashlib.sha256(tok_dst.read_bytes()).hexdigest(),
                          "vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
                          "pad_id": sp.pad_id(), "unk_id": sp.unk_id()},
            "data_fingerprint": "ckpt-factory", "precision": spec["precision"],
            "zero_stage": spec["zero_stage"], "tensor_parallel": spec["tp"],
            "data_parallel": spec["world_size"] // spec["tp"], "world_size": spec["world_size"],
            "train_loss": None if loss is None else float(loss), "eval_loss": eval_loss,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        tmp = ckpt / tag / "lmforge.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, ckpt / tag / "lmforge.json")
        (ckpt / "latest.tmp").write_text(tag)
        os.replace(ckpt / "latest.tmp", ckpt / "latest")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description="write one lmforge DeepSpeed checkpoint (test helper)")
    parser.add_argument("spec", help="JSON spec (see make_checkpoint)")
    spec = json.loads(parser.parse_args().spec)
    mp.start_processes(_worker, args=(spec,), nprocs=spec["world_size"], start_method="spawn")


def shared_dir() -> Path:
    """/work/shared locally; ../shared beside a CI clone."""
    return REPO.parent / "shared"


def train_test_tokenizer(out_prefix: Path, lossless: bool = True) -> Path:
    """A ~1000-piece BPE SentencePiece model on a slice of English + Chinese Wikipedia (a second or two).

    lossless=True trains like data_pipeline/tokenizer.py (identity normalization, whitespace kept);
    False keeps SentencePiece's defaults (nmt_nfkc, folded whitespace) to test that path too."""
    import sentencepiece as spm

    corp = shared_dir() / "corpora" / "wikipedia"
    en = (corp / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:200_000]
    zh = (corp / "zhwiki" / "AA" / "wiki_00").read_text(encoding="utf-8")[:25_000]
    text = out_prefix.with_suffix(".txt")
    text.write_text(en + "\n" + zh, encoding="utf-8")
    extra = dict(normalization_rule_name="identity", remove_extra_whitespaces=False) if lossless else {}
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out_prefix), vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.98,
                                   minloglevel=2, **extra)
    return out_prefix.with_suffix(".model")


def held_out_texts() -> dict[str, str]:
    """Text the test tokenizer never saw: a Gutenberg book and a later part of the Chinese file."""
    corp = shared_dir() / "corpora"
    zh = (corp / "wikipedia" / "zhwiki" / "AA" / "wiki_00").read_text(encoding="utf-8")
    return {"english": (corp / "books" / "84-0.txt").read_text(encoding="utf-8")[20_000:26_000],
            "chinese": zh[-6000:-2000]}

"""Real DeepSpeed checkpoints in the lmforge layout, for export and import tests, without the trainer.

``make_checkpoint`` runs ``world_size`` gloo ranks (``run_distributed``); each builds a real
``deepspeed.initialize`` engine (CPU accelerator) of a preset, takes a few optimizer steps on random
tokens, evaluates a fixed held-out batch, and saves through ``trainer.checkpoint.save`` — the code the
trainer saves with, so ``lmforge.json`` cannot drift from the trainer's. The engine is deliberately not
the trainer's: one optimizer group in model order (the trainer uses decay / no-decay groups), plain
DeepSpeed config, pre-shifted labels; export must read both.

The held-out batch (``RUN/eval_batch.pt``: ``input_ids`` (B, T) int64) and the loss the engine computed
on it (``eval_loss`` in lmforge.json) let a test check that ``transformers`` reproduces that loss.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.distributed import run_distributed
from tests.helpers.paths import CORPUS, SAMPLE

WIKITEXT = CORPUS / "wikipedia" / "wikitext-2-raw" / "wiki.test.raw"
ZHWIKI = CORPUS / "wikipedia" / "zhwiki" / "AA" / "wiki_00"


def make_checkpoint(run_dir: Path, tokenizer_model: Path, eval_ids: list[list[int]], *, zero_stage: int,
                    world_size: int = 2, tp: int = 1, precision: str = "fp32", preset: str = "debug",
                    steps: int = 2, overrides: dict | None = None, timeout: float = 240) -> Path:
    """Create RUN_DIR/checkpoints with one complete tag (step ``steps``); returns the checkpoints dir."""
    (out,) = make_checkpoints([dict(run_dir=run_dir, zero_stage=zero_stage, precision=precision, preset=preset,
                                    steps=steps, overrides=overrides)], tokenizer_model, eval_ids,
                              world_size=world_size, tp=tp, timeout=timeout)
    return out


def make_checkpoints(specs: list[dict], tokenizer_model: Path, eval_ids: list[list[int]], *, world_size: int = 2,
                     tp: int = 1, timeout: float = 240) -> list[Path]:
    """Several checkpoints of one layout (``world_size`` ranks, tensor-parallel ``tp``) made by the same ranks,
    one engine after another (each start of the ranks costs seconds): ``specs`` are dicts of ``run_dir``,
    ``zero_stage`` and optionally ``precision``, ``preset``, ``steps``, ``overrides``. Returns each run's
    checkpoints dir."""
    import torch

    full = []
    for spec in specs:
        run_dir = Path(spec["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"input_ids": torch.tensor(eval_ids, dtype=torch.int64)}, run_dir / "eval_batch.pt")
        full.append(dict(run_dir=str(run_dir), tokenizer=str(tokenizer_model), zero_stage=spec["zero_stage"], tp=tp,
                         precision=spec.get("precision", "fp32"), preset=spec.get("preset", "debug"),
                         steps=spec.get("steps", 2), overrides=spec.get("overrides") or {}))
    run_distributed(_train_and_save_all, world_size, (full,), timeout=timeout * len(full), DS_ACCELERATOR="cpu")
    return [Path(s["run_dir"]) / "checkpoints" for s in full]


def _train_and_save_all(specs: list[dict]) -> None:
    import gc

    layout = None
    if specs[0]["tp"] > 1:  # the trainer's (data, tensor) groups, made once for every engine of this layout
        from lmforge.trainer.parallel.layout import init_layout

        layout = init_layout(specs[0]["tp"])
    for spec in specs:
        _train_and_save(spec, layout)
        gc.collect()


def _train_and_save(spec: dict, layout=None) -> None:
    import shutil

    import deepspeed
    import sentencepiece as spm
    import torch
    import torch.distributed as dist

    from lmforge.common.files import sha256_file
    from lmforge.model import build_model, get_preset
    from lmforge.trainer import checkpoint
    from lmforge.trainer.config import DataSource, RunConfig
    from lmforge.trainer.parallel.ds_config import communication_defaults

    rank, world = dist.get_rank(), dist.get_world_size()
    sp = spm.SentencePieceProcessor(model_file=spec["tokenizer"])
    cfg = get_preset(spec["preset"], **{"vocab_size": sp.get_piece_size(), **spec["overrides"]})
    torch.manual_seed(0)  # same init on every rank, as the trainer does
    model = build_model(cfg)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": spec["zero_stage"]},
        "bf16": {"enabled": spec["precision"] == "bf16"},
        "fp16": {"enabled": spec["precision"] == "fp16"},
        "steps_per_print": 10**9,
    }
    if spec["tp"] > 1:  # AutoTP following the family's plan, as the trainer configures it
        from lmforge.model import family_of
        from lmforge.trainer.parallel.ds_config import autotp_partition_config

        ds_config["tensor_parallel"] = {"autotp_size": spec["tp"],
                                        "partition_config": autotp_partition_config(family_of(cfg).tp_plan)}
    # The trainer's communication settings: under ZeRO-3 every matrix is partitioned (persistence 10·d),
    # the path real models take. DeepSpeed's default threshold (1e5 elements) would keep every parameter
    # of this small model whole, and the partitioned save/convert/export path would never run.
    top, zero = communication_defaults(spec["zero_stage"], cfg.hidden_size, spec["precision"], cuda=False)
    ds_config.update(top)
    ds_config["zero_optimization"].update(zero)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                      mpu=None if layout is None else layout.mpu)
    gen = torch.Generator().manual_seed(1 + rank // spec["tp"])  # same data within a TP group
    loss = None
    for _ in range(spec["steps"]):
        ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)
        loss = engine(ids[:, :-1], labels=ids[:, 1:].contiguous())  # pre-shifted labels
        engine.backward(loss)
        engine.step()
    run_dir = Path(spec["run_dir"])
    eval_ids = torch.load(run_dir / "eval_batch.pt", weights_only=True)["input_ids"]
    engine.eval()
    with torch.no_grad():
        eval_loss = float(engine(eval_ids[:, :-1], labels=eval_ids[:, 1:].contiguous()))
    engine.train()

    ckpt_dir = run_dir / "checkpoints"
    run_cfg = RunConfig(run_dir=str(run_dir), tokenizer=spec["tokenizer"])
    run_cfg.model.preset = spec["preset"]
    run_cfg.data.train = [DataSource("random-tokens", 1.0)]
    run_cfg.train.precision = spec["precision"]
    run_cfg.parallel.zero_stage, run_cfg.parallel.tensor_parallel = spec["zero_stage"], spec["tp"]
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec["tokenizer"], ckpt_dir / "tokenizer.model")
    tok = checkpoint.TokenizerRecord(sha256=sha256_file(spec["tokenizer"]), vocab_size=sp.get_piece_size(),
                                     bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(), unk_id=sp.unk_id())
    dp = world // spec["tp"]
    state = checkpoint.CheckpointState(
        step=spec["steps"], consumed_samples=spec["steps"] * 2 * dp, model_config=cfg.to_dict(),
        config=run_cfg.to_dict(), tokenizer=tok, data_fingerprint="ckpt-factory", precision=spec["precision"],
        zero_stage=spec["zero_stage"], tensor_parallel=spec["tp"], data_parallel=dp, world_size=world,
        global_batch_size=2 * dp, train_loss=None if loss is None else float(loss), eval_loss=eval_loss)
    checkpoint.save(engine, ckpt_dir, state)
    engine.destroy()


def train_test_tokenizer(out_prefix: Path, lossless: bool = True) -> Path:
    """A ~1000-piece BPE SentencePiece model on English (WikiText) and Chinese Wikipedia (a second or two).

    lossless=True trains like data_pipeline/tokenizer.py (identity normalization, whitespace kept);
    False keeps SentencePiece's defaults (nmt_nfkc, folded whitespace) to test that path too."""
    import sentencepiece as spm

    en = WIKITEXT.read_text(encoding="utf-8")[:200_000]
    zh = ZHWIKI.read_text(encoding="utf-8")[:25_000]
    text = out_prefix.with_suffix(".txt")
    text.write_text(en + "\n" + zh, encoding="utf-8")
    extra = dict(normalization_rule_name="identity", remove_extra_whitespaces=False) if lossless else {}
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out_prefix), vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.98, num_threads=1,
                                   minloglevel=2, **extra)
    return out_prefix.with_suffix(".model")


def held_out_texts() -> dict[str, str]:
    """Text the test tokenizer never saw: a Gutenberg book and the end of the Chinese file."""
    zh = ZHWIKI.read_text(encoding="utf-8")
    return {"english": (SAMPLE / "books" / "84-0.txt").read_text(encoding="utf-8")[20_000:26_000],
            "chinese": zh[-6000:-2000]}

"""The run, built from its config in one place (OLMo-core's ``config.build()`` idea).

``build_run(cfg)`` turns a validated ``RunConfig`` into everything the step loop needs, in the order the
pieces depend on each other: the process group and the parallel layout, the tokenizer (SentencePiece or
Hugging Face: its vocabulary, added tokens included, sizes the model; its EOS is the end-of-document
token), the model config (its family's, from ``lmforge.model``), the global sample order, the resume plan
(chosen before the engine exists: another layout needs DeepSpeed's universal loader, which is selected in
its config), the model with its training-time transformations (``parallel/transforms.py``), the DeepSpeed
engine, loaded from the checkpoint when resuming, and the batch transform (``batching.py``) that gives the
model its attention structure.
Every rank calls it; the collectives inside are called in the same order everywhere.

This is the composition root: the one engine-stage module that imports the later stages (the resume
plan from ``checkpoint``, ``model.init_from_hf`` weights from ``hf``); the rest of the flow only ever
depends on earlier stages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lmforge.common.files import atomic_write_text
from lmforge.common.tokenizer_files import TokenizerError, TokenizerFiles, resolve_tokenizer
from lmforge.data_pipeline.gpt_dataset import BlendedDataset, PackedDataset, build_dataset
from lmforge.data_pipeline.manifest import MANIFEST_NAME, ManifestError, load_manifest
from lmforge.data_pipeline.tokenizer import copy_tokenizer, tokenizer_info
from lmforge.model import ModelConfig, build_config

from . import checkpoint
from .batching import BatchTransform, resolve_attention_kernel
from .checkpoint import resume
from .config import ConfigError, RunConfig, check_global_batch, dump_config
from .parallel import distributed, engine, experts, fp8, transforms
from .parallel import layout as layouts
from .parallel.ds_config import build_ds_config, resolve_precision

Dataset = PackedDataset | BlendedDataset


@dataclass(frozen=True)
class Tokenizer:
    """The run's tokenizer: a SentencePiece model or a Hugging Face tokenizer.json (``files``), with what
    ``data_pipeline.tokenizer.tokenizer_info`` reads from it (``info``: vocab size, special ids)."""

    files: TokenizerFiles
    sha256: str
    info: dict

    @property
    def path(self) -> Path:
        return self.files.path

    @property
    def vocab_size(self) -> int:
        """Largest id + 1, a Hugging Face tokenizer's added tokens included: the model's minimum vocab."""
        return self.info["vocab_size"]

    @property
    def eod_id(self) -> int:
        return self.info["eos_id"]

    def record(self) -> checkpoint.TokenizerRecord:
        i = self.info
        return checkpoint.TokenizerRecord(file=self.files.name, sha256=self.sha256, vocab_size=i["vocab_size"],
                                          bos_id=i["bos_id"], eos_id=i["eos_id"], pad_id=i["pad_id"],
                                          unk_id=i["unk_id"])


@dataclass
class Run:
    cfg: RunConfig
    layout: layouts.Layout
    precision: str
    global_batch: int
    run_dir: Path
    ckpt_dir: Path
    tokenizer: Tokenizer
    model_config: ModelConfig
    train_ds: Dataset
    valid_ds: Dataset | None
    data_fingerprint: str  # the training order's identity, independent of its length
    batch_transform: BatchTransform
    ds_config: dict
    engine: object  # deepspeed.DeepSpeedEngine
    step: int = 0
    consumed_samples: int = 0
    resumed_from: resume.ResumePlan | None = None


def load_tokenizer(path: str, eod_token: str | None = None) -> Tokenizer:
    if not Path(path).exists():
        raise ConfigError(f"tokenizer: {path} not found")
    try:
        files = resolve_tokenizer(path)
        info = tokenizer_info(files, eod_token)
    except TokenizerError as e:
        raise ConfigError(f"tokenizer: {e}") from None
    return Tokenizer(files, info["sha256"], info)


def data_end_of_document(cfg: RunConfig) -> tuple[str | None, list[tuple[str, dict]]]:
    """The end-of-document token the data was written with (``preprocess`` records it in each output's
    manifest: its ``--eod-token`` or the tokenizer's choice) and the (path, manifest tokenizer record) of
    every preprocess output among the sources; (None, ...) when none records a token. Data written with
    two different tokens is a ConfigError naming both."""
    paths = [s.path for s in cfg.data.train] + ([cfg.data.valid] if cfg.data.valid else [])
    records = []
    for p in paths:
        mp = Path(p) / MANIFEST_NAME
        if mp.is_file():
            try:
                records.append((p, load_manifest(mp)["tokenizer"]))
            except (ManifestError, KeyError) as e:
                raise ConfigError(f"data: {mp}: {e}") from None
    tokens = {(r["eod_token"], r["eos_id"]): p for p, r in records if r.get("eod_token") is not None}
    if len(tokens) > 1:
        (a, pa), (b, pb) = list(tokens.items())[:2]
        raise ConfigError(f"data: {pa} ends documents with {a[0]!r} (id {a[1]}) but {pb} with {b[0]!r} (id {b[1]}); "
                          "preprocess them with the same --eod-token")
    return (next(iter(tokens))[0] if tokens else None), records


def check_data_tokenizer(tok: Tokenizer, records: list[tuple[str, dict]]) -> None:
    """Each preprocess output among the sources was written with the run's tokenizer and end of document."""
    for p, r in records:
        if r.get("sha256") != tok.sha256:
            raise ConfigError(f"data: {p} was tokenized with another tokenizer (sha256 {str(r.get('sha256'))[:12]}...) "
                              f"than tokenizer: {tok.path} (sha256 {tok.sha256[:12]}...)")
        if r.get("eos_id") != tok.eod_id:
            raise ConfigError(f"data: {p} ends documents with id {r.get('eos_id')} but the tokenizer's end of "
                              f"document is {tok.info['eod_token']!r} (id {tok.eod_id}, from {tok.info['eod_source']})")


def build_data(cfg: RunConfig, layout: layouts.Layout, global_batch: int,
               run_dir: Path) -> tuple[Dataset, Dataset | None]:
    """One global sample order for training (this rank's slice of each step is chosen by the iterator)
    and the validation order. Collective."""
    seq_len = cfg.data.seq_len
    cache_dir = cfg.data.cache_dir or str(run_dir / "data_cache")
    sources = [(s.path, s.weight) for s in cfg.data.train]
    train_ds = build_dataset(sources, "train", seq_len, cfg.train.max_steps * global_batch, cfg.train.seed,
                             cache_dir=cache_dir)
    valid_ds = None
    if cfg.eval.interval > 0:
        if not cfg.data.valid and not (Path(sources[0][0]) / MANIFEST_NAME).is_file():
            raise ConfigError(
                "eval.interval > 0 but data.valid is not set and the first train source is not a "
                "preprocess output with a valid split; set data.valid (or eval.interval=0)"
            )
        vsrc = [(cfg.data.valid, 1.0)] if cfg.data.valid else [(sources[0][0], 1.0)]
        valid_ds = build_dataset(vsrc, "valid", seq_len, cfg.eval.steps * cfg.train.micro_batch_size * layout.dp,
                                 cfg.train.seed + 1, cache_dir=cache_dir)
    # Index arrays are built once per node (local rank 0, atomic writes: safe on a shared filesystem)
    # and memory-mapped by every rank; no rank builds them at every start.
    if layout.local_rank == 0:
        for ds in (train_ds, valid_ds):
            if ds is not None:
                ds.build_cache()
    dist.barrier()
    return train_ds, valid_ds


def resolve_model(cfg: RunConfig, tokenizer_vocab: int,
                  init_from: tuple[ModelConfig, dict] | None = None) -> tuple[ModelConfig, dict | None]:
    """(model config, initial weights or None): the family's config from the ``model:`` section (preset and
    overrides, vocab_size defaulting to the tokenizer's), or the one read from ``model.init_from_hf``
    (``trainer.hf.importer.load_hf_weights``). Errors are ConfigErrors naming the ``model.*`` key."""
    m = cfg.model
    if m.init_from_hf:
        assert init_from is not None, "read model.init_from_hf first"
        mcfg, state = init_from
        if m.family is not None and m.family != mcfg.family:
            raise ConfigError(f"model.family is {m.family!r} but model.init_from_hf {m.init_from_hf} is a "
                              f"{mcfg.family!r} model")
        if mcfg.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.init_from_hf vocab {mcfg.vocab_size} < tokenizer vocab {tokenizer_vocab} (the "
                              "tokenizer's ids, added tokens included, must fit the model's embedding)")
        return mcfg, state
    shape = {"vocab_size": tokenizer_vocab, **m.overrides}
    if shape["vocab_size"] < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size {shape['vocab_size']} < tokenizer vocab {tokenizer_vocab}")
    try:
        return build_config(m.family, m.preset, **shape), None
    except (TypeError, ValueError) as e:  # heads not dividing the width, and the like
        raise ConfigError(f"model: {e}") from None


def build_run(cfg: RunConfig, log=print) -> Run:
    """Everything the step loop needs (module docstring). Collective."""
    distributed.init(cfg.parallel.collective_timeout_minutes)
    layout = layouts.init_layout(cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel)
    global_batch = check_global_batch(cfg, layout.dp)
    precision = resolve_precision(cfg.train.precision)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    eod_token, data_records = data_end_of_document(cfg)
    tok = load_tokenizer(cfg.tokenizer, eod_token)
    check_data_tokenizer(tok, data_records)
    if layout.rank == 0:
        source = "the data's manifest" if eod_token is not None else tok.info["eod_source"]
        log(f"end of document: {tok.info['eod_token']!r} (id {tok.eod_id}), from {source}")
    init_from = None
    if cfg.model.init_from_hf:
        from .hf.importer import load_hf_weights

        init_from = load_hf_weights(cfg.model.init_from_hf)
    mcfg, init_state = resolve_model(cfg, tok.vocab_size, init_from)
    layouts.check_tensor_parallel(mcfg, layout.tp)
    layouts.check_sequence_parallel(mcfg, layout.sp)
    layouts.check_experts(mcfg, layout.tp, layout.sp)
    experts.check(mcfg, cfg.parallel, layout.world, cfg.train.compile, precision)
    fp8.check(precision, cfg.parallel.fp8_recipe, cfg.parallel.fp8_layers, layout.tp)
    checkpoint.check_shared_run_dir(run_dir)  # collective: one filesystem for every rank, or a clear refusal
    if layout.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        # The checkpoint folder carries its tokenizer (an HF tokenizer.json with its tokenizer_config.json and
        # special_tokens_map.json), so export needs nothing from the run config.
        try:
            copy_tokenizer(tok.files, ckpt_dir, tok.sha256)
        except ValueError as e:  # changed since it was read
            raise ConfigError(f"tokenizer: {e}") from None

    train_ds, valid_ds = build_data(cfg, layout, global_batch, run_dir)
    data_fp = train_ds.order_fingerprint
    # Collective, one decision: rank 0 picks the tag (a damaged one set aside, the previous one tried), every
    # rank confirms it sees that tag's step and files.
    tag = checkpoint.newest_intact(ckpt_dir, checksums=cfg.checkpoint.verify == "checksums", log=log) \
        if cfg.checkpoint.resume else None
    plan = resume.plan(cfg, ckpt_dir, dp=layout.dp, tp=layout.tp, tokenizer_sha=tok.sha256,
                       data_fingerprint=data_fp, global_batch=global_batch, sp=layout.sp, tag=tag)
    resume.prepare(plan, ckpt_dir, log=log)

    # Identical initial weights on every rank and at every ZeRO stage for a seed (ZeRO-3 builds under
    # zero.Init with the same values as an eager build: engine.py); DeepSpeed also broadcasts rank 0's.
    np.random.seed(cfg.train.seed)
    ds_config = resume.ds_config_for(plan, build_ds_config(cfg, layout.dp, precision, mcfg))
    model = engine.build_model(mcfg, ds_config, cfg.parallel.zero_stage, cfg.train.seed, layout, init_state)
    if precision == "fp8":  # before checkpointing and compile wrap the layers (transforms.py's order)
        converted, kept = fp8.convert(model, cfg.parallel.fp8_recipe, cfg.parallel.fp8_layers)
        if layout.rank == 0:
            log(fp8.describe(converted, kept, cfg.parallel.fp8_recipe))
    transforms.parallelize(model, activation_checkpointing=cfg.parallel.activation_checkpointing,
                           loss_chunk_tokens=cfg.parallel.loss_chunk_tokens, compile=cfg.train.compile,
                           sequence_parallel=layout.sp, sp_group=layout.sp_group)
    eng = engine.initialize(model, cfg, ds_config, layout)
    kernel = resolve_attention_kernel(cfg.parallel.attention_kernel, "cuda" if torch.cuda.is_available() else "cpu",
                                      cfg.train.compile)
    batch_transform = BatchTransform(cfg.data.intra_doc_attention, kernel, layout.sp, layout.sp_rank)
    if layout.rank == 0:
        atomic_write_text(run_dir / "ds_config.json", json.dumps(ds_config, indent=1))

    run = Run(cfg, layout, precision, global_batch, run_dir, ckpt_dir, tok, mcfg, train_ds, valid_ds, data_fp,
              batch_transform, ds_config, eng)
    if plan is not None:
        run.step, run.consumed_samples = resume.load(eng, plan, ckpt_dir, layout.rank)
        run.resumed_from = plan
    return run

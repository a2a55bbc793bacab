"""Export an lmforge checkpoint to a Hugging Face ``LlamaForCausalLM`` directory, verified before it exists.

    python -m trainer.export_hf --checkpoint RUN/checkpoints --output DIR [--dtype bf16|fp16|fp32]
                                [--step N] [--no-verify] [--max-shard-size 2GB] [--overwrite]

The export is built in ``DIR.tmp-<pid>`` next to DIR and renamed to DIR only after verification
passed; on any failure the temporary directory is removed and the exit status is non-zero with the
reason. Only complete checkpoints are read (a tag directory counts once its ``lmforge.json`` exists;
``latest`` names the newest), so a running job's folder is safe to export from.

Weights come from the fp32 optimizer masters whenever the checkpoint has them (a bf16/fp16 run at any
ZeRO stage; see trainer/hf_weights.py), so ``--dtype fp32`` of a bf16 run gives the masters bit for bit
and ``--dtype bf16`` gives them rounded to bf16; each master is also checked to round to the
half-precision module weight DeepSpeed saved beside it (ZeRO 0-2).

Verification (on by default) loads DIR with ``transformers`` in fp32 and checks: config values;
every weight bit-exact against the checkpoint's source weights (after the cast to --dtype); logits on fixed token
batches equal to lmforge's own model run on the same (cast) weights within 1e-4; SentencePiece id
parity and decode round trip for the fast and slow HF tokenizers; and that ``generate`` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from data_pipeline.atomic import atomic_dir
from model import ModelConfig
from trainer import hf_weights
from trainer.hf_verify import LOGIT_ATOL  # noqa: F401  (re-exported: the stated bound)
from trainer.hf_weights import CheckpointError

FORMAT = "lmforge-checkpoint-v1"


class ExportError(RuntimeError):
    """Export or verification failed; the message says what differed."""


def resolve_tag(checkpoint_dir: Path, step: int | None) -> Path:
    """RUN dir, RUN/checkpoints or a tag dir -> the complete tag directory to export."""
    d = Path(checkpoint_dir)
    if not d.exists():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    if (d / "lmforge.json").is_file() and step is None:
        return d
    if (d / "checkpoints").is_dir() and not (d / "latest").exists():
        d = d / "checkpoints"
    complete = {}
    for tag in d.iterdir():
        meta = tag / "lmforge.json"
        if meta.is_file():
            try:
                complete[int(json.loads(meta.read_text())["step"])] = tag
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{meta}: unreadable lmforge.json ({e})") from e
    if step is not None:
        if step not in complete:
            raise CheckpointError(f"{d}: no complete checkpoint for step {step} (complete steps: "
                                  f"{sorted(complete) or 'none'})")
        return complete[step]
    latest = d / "latest"
    if latest.is_file():
        tag = d / latest.read_text().strip()
        if not (tag / "lmforge.json").is_file():
            raise CheckpointError(f"{latest} names {tag.name}, which is not a complete checkpoint "
                                  "(no lmforge.json): was it deleted by checkpoint rotation?")
        return tag
    if not complete:
        raise CheckpointError(f"{d}: no complete checkpoint (no 'latest' file and no tag with lmforge.json)")
    return complete[max(complete)]


def read_meta(tag_dir: Path) -> tuple[dict, ModelConfig, Path]:
    path = tag_dir / "lmforge.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model_config ({e})") from e
    tok = meta.get("tokenizer") or {}
    tok_file = tag_dir.parent / tok.get("file", "tokenizer.model")
    if not tok_file.is_file():
        tok_file = tag_dir / tok.get("file", "tokenizer.model")
    if not tok_file.is_file():
        raise CheckpointError(f"{path}: tokenizer file {tok.get('file', 'tokenizer.model')} not found beside "
                              "the checkpoint")
    if tok.get("sha256") and hashlib.sha256(tok_file.read_bytes()).hexdigest() != tok["sha256"]:
        raise CheckpointError(f"{tok_file}: sha256 differs from the one recorded in {path}")
    return meta, cfg, tok_file


def _parse_size(s: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    u = s.strip().upper()
    for name, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if u.endswith(name):
            return int(float(u[: -len(name)]) * mult)
    return int(u)


def write_config(out: Path, cfg: ModelConfig, meta: dict, dtype_name: str) -> None:
    from transformers import GenerationConfig, LlamaConfig

    tok = meta.get("tokenizer") or {}
    ids = {k: (tok.get(k) if (tok.get(k) is not None and tok.get(k) >= 0) else None)
           for k in ("bos_id", "eos_id", "pad_id")}
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype_name]
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range, attention_bias=False, mlp_bias=False,
        bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"], pad_token_id=ids["pad_id"],
        architectures=["LlamaForCausalLM"], torch_dtype=torch_dtype,
    )
    hf.save_pretrained(out)
    # transformers 5 writes rope_theta only inside rope_parameters; transformers 4 reads the top-level key
    # and would silently fall back to 10000. Write both (5 accepts the duplicate), plus 4's torch_dtype.
    path = out / "config.json"
    d = json.loads(path.read_text())
    d.setdefault("rope_theta", cfg.rope_theta)
    d.setdefault("torch_dtype", torch_dtype)
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"],
                     pad_token_id=ids["pad_id"]).save_pretrained(out)


def _manifest_summary(data: dict) -> list[str]:
    """One line per training source: weight and, when its manifest.json is readable here, the token and
    document counts per split (the manifest may live on another machine; then only the path is given)."""
    lines = []
    train = data.get("train")
    for src in train if isinstance(train, list) else ([train] if train else []):
        path = Path(str(src.get("path", ""))) if isinstance(src, dict) else Path(str(src))
        weight = src.get("weight", 1.0) if isinstance(src, dict) else 1.0
        line = f"- `{path}` (weight {weight})"
        try:
            man = json.loads((path / "manifest.json").read_text())
            parts = [f"{name}: {len(shards)} shards, {sum(x.get('documents', 0) for x in shards):,} documents, "
                     f"{sum(x.get('tokens', 0) for x in shards):,} tokens"
                     for name, shards in (man.get("splits") or {}).items()]
            line += ": " + "; ".join(parts)
        except (OSError, ValueError, AttributeError, TypeError):
            line += ": manifest not readable at export time"
        lines.append(line)
    return lines or ["- (no training sources recorded in the checkpoint)"]


def write_readme(out: Path, meta: dict, cfg: ModelConfig, source: str, dtype_name: str) -> None:
    conf = meta.get("config") or {}
    data = conf.get("data", {}) if isinstance(conf.get("data"), dict) else {}
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "---", "",
        f"# lmforge export (step {meta.get('step')})", "",
        "A Llama-architecture causal language model pretrained with lmforge and exported by "
        "`python -m trainer.export_hf`; the export was checked against the checkpoint (weights, logits, "
        "tokenizer) before it was written.", "",
        "## Final losses", "",
        f"- step: {meta.get('step')}, consumed samples: {meta.get('consumed_samples')}",
        f"- train loss: {meta.get('train_loss')}", f"- eval loss: {meta.get('eval_loss')}", "",
        "## Model", "", "```json", json.dumps(cfg.to_dict(), indent=2), "```", "",
        f"Weights: {dtype_name}, from {source}. Training precision {meta.get('precision')}, ZeRO stage "
        f"{meta.get('zero_stage')}, tensor parallel {meta.get('tensor_parallel')}, data parallel "
        f"{meta.get('data_parallel')}.", "",
        "## Data", "", f"Data fingerprint: `{meta.get('data_fingerprint')}`", "", *_manifest_summary(data), "",
        "## Training config", "", "```json", json.dumps(conf, indent=2, default=str)[:20000], "```", "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def _progress(total_bytes: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None


def write_weights(out: Path, getters: dict, shapes: dict, dtype: torch.dtype, max_shard_bytes: int) -> None:
    names = list(getters)
    sub = {k: shapes[k] for k in names}
    shards = hf_weights.plan_shards(sub, dtype, max_shard_bytes)
    files = list(hf_weights.iter_shard_names(len(shards)))
    item = torch.empty((), dtype=dtype).element_size()
    total = sum(s.numel() for s in sub.values()) * item
    bar = _progress(total, "writing safetensors")
    for fname, keys in zip(files, shards):
        hf_weights.write_safetensors(out / fname, keys, sub, dtype, lambda k: getters[k](),
                                     on_tensor=(bar.update if bar else None))
    if bar:
        bar.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: f for f, keys in zip(files, shards) for k in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export(checkpoint_dir: str | Path, output_dir: str | Path, dtype: str = "fp32", step: int | None = None,
           verify: bool = True, max_shard_size: str | int = "2GB", overwrite: bool = False,
           verify_texts: list[str] | None = None) -> Path:
    """Export (and by default verify) a checkpoint; returns the output directory.

    Raises CheckpointError for unusable input and ExportError when verification fails; in both cases
    nothing is left at ``output_dir`` (an existing directory is only replaced with ``overwrite``)."""
    from trainer.hf_tokenizer import write_tokenizer_files

    out = Path(output_dir).resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    torch_dtype = hf_weights.parse_dtype(dtype)
    max_bytes = _parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    tag_dir = resolve_tag(Path(checkpoint_dir), step)
    meta, cfg, tok_file = read_meta(tag_dir)
    print(f"exporting {tag_dir} (step {meta.get('step')}) -> {out}", file=sys.stderr)
    # Scratch for a universal conversion (tensor-parallel ZeRO masters), beside the output, not in the
    # checkpoint folder, which may belong to a running job; removed however the export ends.
    scratch = out.parent / f".{out.name}.scratch-{os.getpid()}"
    try:
        getters, source = hf_weights.weight_source(tag_dir, meta, cfg, scratch=scratch)
        shapes = hf_weights.expected_shapes(cfg)
        with atomic_dir(out) as tmp:
            t0 = time.time()
            write_weights(tmp, getters, shapes, torch_dtype, max_bytes)
            write_config(tmp, cfg, meta, dtype)
            write_tokenizer_files(tok_file, tmp, model_max_length=cfg.max_position_embeddings)
            write_readme(tmp, meta, cfg, source, dtype)
            print(f"wrote {tmp.name} in {time.time() - t0:.1f}s from {source}", file=sys.stderr)
            if verify:
                from trainer.hf_verify import verify_export

                problems = verify_export(tmp, cfg, getters, torch_dtype, extra_texts=verify_texts or [])
                if problems:
                    raise ExportError("verification failed:\n  " + "\n  ".join(problems))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer.export_hf",
        description="Export an lmforge DeepSpeed checkpoint (any ZeRO stage, tensor-parallel size, precision) "
                    "to a Hugging Face LlamaForCausalLM directory with tokenizer, verified before it is "
                    "written: weights, fp32 logits (<= 1e-4), tokenizer ids/decoding and generate().")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="run directory, its checkpoints/ directory, or one tag directory (step_XXXXXXXX)")
    p.add_argument("--output", required=True, type=Path, help="directory to create (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype to save")
    p.add_argument("--step", type=int, default=None, help="export this step instead of the latest")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification")
    p.add_argument("--max-shard-size", default="2GB", help="split model.safetensors above this (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--verify-text-file", type=Path, action="append", default=[],
                   help="extra UTF-8 text for the tokenizer parity check (repeatable; first 20k chars)")
    a = p.parse_args(argv)
    texts = []
    for f in a.verify_text_file:
        try:
            texts.append(f.read_text(encoding="utf-8")[:20000])
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: --verify-text-file {f}: {e}", file=sys.stderr)
            return 2
    try:
        out = export(a.checkpoint, a.output, dtype=a.dtype, step=a.step, verify=a.verify,
                     max_shard_size=a.max_shard_size, overwrite=a.overwrite, verify_texts=texts)
    except (CheckpointError, ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {'and verified ' if a.verify else ''}{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export an lmforge checkpoint to a Hugging Face directory of its family's architecture (``LlamaForCausalLM``,
``Qwen3ForCausalLM``: the family's adapter, ``lmforge.model.<family>.hf``), verified before it exists.

    python -m lmforge.trainer.export_hf --checkpoint RUN/checkpoints --output DIR [--dtype bf16|fp16|fp32]
                                [--step N] [--no-verify] [--max-shard-size 2GB] [--overwrite]

The export is built in ``DIR.tmp-<pid>`` next to DIR and renamed to DIR only after verification
passed; on any failure the temporary directory is removed and the exit status is non-zero with the
reason. Only complete checkpoints are read (a tag directory counts once its ``lmforge.json`` exists;
``latest`` names the newest), so a running job's folder is safe to export from.

Weights come from the fp32 optimizer masters whenever the checkpoint has them (a bf16/fp16 run at any
ZeRO stage; see trainer/checkpoint/weights.py), so ``--dtype fp32`` of a bf16 run gives the masters bit for bit
and ``--dtype bf16`` gives them rounded to bf16; each master is also checked to round to the
half-precision module weight DeepSpeed saved beside it (ZeRO 0-2).

Verification (on by default) loads DIR with ``transformers`` in fp32 and checks: config values;
every weight bit-exact against the checkpoint's source weights (after the cast to --dtype); logits on fixed token
batches equal to lmforge's own model run on the same (cast) weights within 1e-4; SentencePiece id
parity and decode round trip for the fast and slow HF tokenizers; and that ``generate`` runs.

A run trained with a Hugging Face tokenizer.json exports that file byte for byte, with a tokenizer_config.json
derived from the one beside it so that ``transformers`` loads tokenizer.json as is (``tokenizer_class:
PreTrainedTokenizerFast``, the run's eos, keys that make transformers rebuild the pipeline dropped:
``tokenizer.write_hf_tokenizer_files``); each change is printed and listed in the model card. The parity check
then compares ``transformers``' AutoTokenizer on the export with the ``tokenizers`` library on the run's own
tokenizer.json (what encoded the training data), and a failure names the text, the position, both sides'
tokens and, where the loaded class or its pipeline shows it, why.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from lmforge.common.errors import CheckFailed, InputError, run_cli
from lmforge.common.files import atomic_dir
from lmforge.model import ModelConfig, family_of, parameter_shapes

from ..checkpoint import (
    CheckpointError,
    CheckpointState,
    check_tag,
    find_checkpoint,
    read_state,
    tokenizer_path,
    weight_source,
)
from . import safetensors


class ExportError(CheckFailed):
    """The export did not verify (exit 1); the message says what differed."""


def _parse_size(s: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    u = s.strip().upper()
    for name, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if u.endswith(name):
            return int(float(u[: -len(name)]) * mult)
    return int(u)


def hf_adapter(cfg: ModelConfig):
    """The family's Hugging Face adapter; InputError (exit 2) for a family without one."""
    fam = family_of(cfg)
    if fam.hf is None:
        raise InputError(f"the {fam.name} family has no Hugging Face counterpart (model/{fam.name}/: Family.hf is "
                         "None): nothing to export to")
    return fam.hf


def write_config(out: Path, cfg: ModelConfig, state: CheckpointState, dtype_name: str) -> None:
    from transformers import GenerationConfig

    adapter = hf_adapter(cfg)
    tok = state.tokenizer
    ids = {k: (v if v is not None and v >= 0 else None)
           for k, v in (("bos_id", tok.bos_id), ("eos_id", tok.eos_id), ("pad_id", tok.pad_id))}
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype_name]
    hf = adapter.transformers_config_class()(
        **adapter.to_hf_config(cfg),
        bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"], pad_token_id=ids["pad_id"],
        architectures=[adapter.architecture], torch_dtype=torch_dtype,
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
    """One line per training source: weight and, when its manifest is readable here, the token and
    document counts per split (the data may live on another machine; then only the path is given)."""
    from lmforge.data_pipeline.manifest import ManifestError, load_manifest, split_totals

    lines = []
    for src in data.get("train") or []:
        line = f"- `{src.get('path')}` (weight {src.get('weight', 1.0)})"
        try:
            totals = split_totals(load_manifest(src.get("path", ""))["splits"])
            line += ": " + "; ".join(f"{name}: {t['shards']} shards, {t['documents']:,} documents, "
                                     f"{t['tokens']:,} tokens" for name, t in totals.items())
        except (ManifestError, OSError):
            line += ": manifest not readable at export time"
        lines.append(line)
    return lines or ["- (no training sources recorded in the checkpoint)"]


def write_readme(out: Path, state: CheckpointState, cfg: ModelConfig, source: str, dtype_name: str,
                 tokenizer_changes: list[str] = ()) -> None:
    conf = state.config
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "---", "",
        f"# lmforge export (step {state.step})", "",
        f"A `{hf_adapter(cfg).architecture}` causal language model (lmforge family `{cfg.family}`) pretrained "
        "with lmforge and exported by `python -m lmforge.trainer.export_hf`; the export was checked against "
        "the checkpoint (weights, logits, tokenizer) before it was written.", "",
        "## Final losses", "",
        f"- step: {state.step}, consumed samples: {state.consumed_samples}",
        f"- train loss: {state.train_loss}", f"- eval loss: {state.eval_loss}", "",
        "## Model", "", "```json", json.dumps(cfg.to_dict(), indent=2), "```", "",
        f"Weights: {dtype_name}, from {source}. Training precision {state.precision}, ZeRO stage "
        f"{state.zero_stage}, tensor parallel {state.tensor_parallel}, data parallel "
        f"{state.data_parallel}.", "",
        "## Data", "", f"Data fingerprint: `{state.data_fingerprint}`", "",
        *_manifest_summary(conf.get("data") or {}), "",
        "## Training config", "", "```json", json.dumps(conf, indent=2, default=str)[:20000], "```", "",
    ]
    if tokenizer_changes:
        lines += ["## Tokenizer", "", "tokenizer.json is the run's, byte for byte. Changed against the files beside "
                  "it, so that `transformers` gives the ids the model was trained on:", "",
                  *(f"- {c}" for c in tokenizer_changes), ""]
    (out / "README.md").write_text("\n".join(lines))


def hf_weights(adapter, getters: dict, shapes: dict) -> tuple[dict, dict]:
    """The checkpoint's tensor getters and shapes under the Hugging Face names on disk: one tensor each, or
    several slices of one (a family's stacked experts, ``HFAdapter.to_hf_tensors``), the stacked tensor read
    once for all of its slices."""
    hf_getters, hf_shapes = {}, {}
    for k, get in getters.items():
        pieces = adapter.hf_tensors(k, shapes[k])
        if len(pieces) == 1 and pieces[0][2] is None:
            hf_getters[pieces[0][0]], hf_shapes[pieces[0][0]] = get, shapes[k]
            continue
        source = _Slices(get, len(pieces))
        for name, shape, (index, lo, hi) in pieces:
            hf_getters[name] = functools.partial(source.take, index, lo, hi)
            hf_shapes[name] = torch.Size(shape)
    return hf_getters, hf_shapes


class _Slices:
    """One stacked tensor read once for its ``n`` slices, and let go after the last is taken."""

    def __init__(self, get, n: int):
        self.get, self.left, self.tensor = get, n, None

    def take(self, index: int, lo: int, hi: int) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = self.get()
        out = self.tensor[index, lo:hi].clone()
        self.left -= 1
        if self.left == 0:
            self.tensor = None
        return out


def write_weights(out: Path, getters: dict, dtype: torch.dtype, max_shard_bytes: int,
                  shapes: dict[str, torch.Size]) -> None:
    """model.safetensors, or shards plus model.safetensors.index.json above ``max_shard_bytes``."""
    from tqdm import tqdm

    sub = {k: shapes[k] for k in getters}
    shards = safetensors.plan_shards(sub, dtype, max_shard_bytes)
    files = list(safetensors.iter_shard_names(len(shards)))
    item = torch.empty((), dtype=dtype).element_size()
    total = sum(s.numel() for s in sub.values()) * item
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing safetensors", file=sys.stderr) as bar:
        for fname, keys in zip(files, shards):
            safetensors.write_safetensors(out / fname, keys, sub, dtype, lambda k: getters[k](),
                                          on_tensor=bar.update)
    if len(files) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: f for f, keys in zip(files, shards) for k in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export(checkpoint_dir: str | Path, output_dir: str | Path, dtype: str = "fp32", step: int | None = None,
           verify: bool = True, max_shard_size: str | int = "2GB", overwrite: bool = False,
           verify_texts: list[str] | None = None, checksums: bool = True) -> Path:
    """Export (and by default verify) a checkpoint; returns the output directory.

    Raises CheckpointError (exit 2) for unusable input and ExportError (exit 1) when verification fails;
    in both cases nothing is left at ``output_dir`` (an existing directory is only replaced with
    ``overwrite``)."""
    from lmforge.common.tokenizer_files import HF, resolve_tokenizer

    from .tokenizer import write_hf_tokenizer_files, write_tokenizer_files

    out = Path(output_dir).resolve()
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    torch_dtype = safetensors.parse_dtype(dtype)
    max_bytes = _parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    tag_dir = find_checkpoint(Path(checkpoint_dir), step)
    problems = check_tag(tag_dir, checksums)
    if problems:
        raise CheckpointError(f"{tag_dir} is damaged, refusing to export it:\n  " + "\n  ".join(problems)
                              + "\n(--step N exports an earlier checkpoint; python -m "
                              "lmforge.trainer.verify_checkpoint lists the intact ones)")
    state = read_state(tag_dir)
    cfg = state.model
    adapter = hf_adapter(cfg)
    tok_file = tokenizer_path(tag_dir, state)
    print(f"exporting {tag_dir} (step {state.step}) -> {out}", file=sys.stderr)
    # Scratch for a universal conversion (tensor-parallel ZeRO masters), beside the output, not in the
    # checkpoint folder, which may belong to a running job; removed however the export ends.
    scratch = out.parent / f".{out.name}.scratch-{os.getpid()}"
    try:
        getters, source = weight_source(tag_dir, state, scratch=scratch)
        with atomic_dir(out) as tmp:
            t0 = time.time()
            hf_getters, hf_shapes = hf_weights(adapter, getters, parameter_shapes(cfg))
            write_weights(tmp, hf_getters, torch_dtype, max_bytes, hf_shapes)
            write_config(tmp, cfg, state, dtype)
            changes: list[str] = []
            if resolve_tokenizer(tok_file).kind == HF:
                t = state.tokenizer
                changes = write_hf_tokenizer_files(tok_file, tmp, model_max_length=cfg.max_position_embeddings,
                                                   special_ids={"bos_id": t.bos_id, "eos_id": t.eos_id,
                                                                "pad_id": t.pad_id})
                for line in changes:
                    print(f"tokenizer: {line}", file=sys.stderr)
            else:
                write_tokenizer_files(tok_file, tmp, model_max_length=cfg.max_position_embeddings)
            write_readme(tmp, state, cfg, source, dtype, changes)
            print(f"wrote {tmp.name} in {time.time() - t0:.1f}s from {source}", file=sys.stderr)
            if verify:
                from .verify import verify_export

                problems = verify_export(tmp, cfg, getters, torch_dtype, extra_texts=verify_texts or [],
                                         tokenizer_file=tok_file)
                if problems:
                    raise ExportError("verification failed:\n  " + "\n  ".join(problems)
                                      + _tokenizer_advice(problems))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _tokenizer_advice(problems: list[str]) -> str:
    """What a tokenizer mismatch means and how to export anyway, when one of ``problems`` is one."""
    if not any(p.startswith("tokenizer ") for p in problems):
        return ""
    return ("\nThe tokenizer lines compare transformers' AutoTokenizer on the export with the tokenizer the "
            "training data was encoded with (the tokenizers library on the run's tokenizer.json, or "
            "SentencePiece): where they differ, a transformers user would give the model other ids than it "
            "was trained on. To export anyway, --no-verify writes the same files without any check (weights, "
            "logits and generate are then unchecked too), and the differences above stay in the export; see "
            "docs/huggingface.md (Export).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lmforge.trainer.export_hf",
        description="Export an lmforge DeepSpeed checkpoint (any ZeRO stage, tensor-parallel size, precision) "
                    "to a Hugging Face directory of its family's architecture (LlamaForCausalLM, Qwen3ForCausalLM) "
                    "with tokenizer, verified before it is "
                    "written: weights, fp32 logits (<= 1e-4), tokenizer ids/decoding (a SentencePiece or "
                    "Hugging Face tokenizer.json run) and generate(). "
                    "Exit status: 0 exported, 1 verification failed, 2 unusable checkpoint or arguments.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="run directory, its checkpoints/ directory, or one tag directory (step_XXXXXXXX)")
    p.add_argument("--output", required=True, type=Path, help="directory to create (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype to save")
    p.add_argument("--step", type=int, default=None, help="export this step instead of the latest")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification")
    p.add_argument("--skip-checksums", dest="checksums", action="store_false",
                   help="check the checkpoint's file sizes only, not their CRC-32s (faster on huge checkpoints)")
    p.add_argument("--max-shard-size", default="2GB", help="split model.safetensors above this (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--verify-text-file", type=Path, action="append", default=[],
                   help="extra UTF-8 text for the tokenizer parity check (repeatable; first 20k chars)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def body() -> int:
        texts = []
        for f in a.verify_text_file:
            try:
                texts.append(f.read_text(encoding="utf-8")[:20000])
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"--verify-text-file {f}: {e}") from None
        out = export(a.checkpoint, a.output, dtype=a.dtype, step=a.step, verify=a.verify,
                     max_shard_size=a.max_shard_size, overwrite=a.overwrite, verify_texts=texts,
                     checksums=a.checksums)
        print(f"exported {'and verified ' if a.verify else ''}{out}")
        return 0

    return run_cli(body, prog="export_hf")


if __name__ == "__main__":
    sys.exit(main())

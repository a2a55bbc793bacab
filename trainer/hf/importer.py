"""Import a local Hugging Face model of a supported architecture as initial weights for continued pretraining.

    python -m lmforge.trainer.import_hf --model HF_DIR --output INIT_DIR [--no-verify] [--overwrite]

INIT_DIR gets ``model.safetensors`` in lmforge's parameter names (identical to HF's, tied
``lm_head.weight`` omitted) and ``lmforge_init.json`` (model_config, source directory, sha256 of every
source file and of the written weights), plus the source's tokenizer files: ``tokenizer.model`` and a
Hugging Face ``tokenizer.json`` with its ``tokenizer_config.json``/``special_tokens_map.json``, whichever it
has, so that INIT_DIR (or the tokenizer.json in it) is the ``--tokenizer`` of preprocess and the trainer's
``tokenizer:`` for continued pretraining. A tokenizer with more ids than the model's vocabulary is refused.
Weights keep their stored dtype, so lmforge -> HF -> lmforge is bit-exact.

The architecture (``config.json``'s ``architectures``) picks the lmforge family (``lmforge.model.hf_family``:
LlamaForCausalLM and MistralForCausalLM -> llama, Qwen3ForCausalLM -> qwen3), whose adapter reads the config
and names the weights; any other architecture is refused in one line naming the entry found and the
architectures lmforge imports. ``load_hf_weights(path)`` accepts either an HF directory or an INIT_DIR and
returns ``(ModelConfig, state_dict)`` for the family's module (the trainer's ``model.init_from_hf``).
Unsupported settings fail with the config key that rules them out.
Verification (default) runs HF's model and ours on the same random tokens in fp32 (<= 1e-4, see
``trainer/hf/verify.py``'s LOGIT_ATOL).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.common.errors import CheckFailed, InputError, run_cli
from lmforge.common.files import atomic_dir, read_json, sha256_file
from lmforge.model import ModelConfig, build_model, config_from_dict, family_of, hf_family, parameter_shapes

INIT_FORMAT = "lmforge-init-v1"


class HFImportError(InputError):
    """The Hugging Face directory cannot be imported (exit 2); the message says which file/key and why."""


def model_config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    """HF config.json dict -> the config of the lmforge family that architecture belongs to (its adapter,
    ``lmforge.model.<family>.hf``); HFImportError naming the file and key for anything no family's module
    represents, including an architecture lmforge has no family for."""
    try:
        return hf_family(d, where).hf.from_hf_config(d, where)
    except ValueError as e:
        raise HFImportError(str(e)) from None


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    if any(d.glob("*.bin")):
        raise HFImportError(f"{d}: only pickle *.bin weights found; re-save the model with safetensors "
                           "(save_pretrained(..., safe_serialization=True)): pickles are not loaded")
    raise HFImportError(f"{d}: no model.safetensors or model.safetensors.index.json")


def _read_state(files: list[Path], cfg: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    shapes = parameter_shapes(cfg)
    adapter = family_of(cfg).hf
    from_hf = adapter.from_hf_name
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}  # stacked name -> (index, part) -> tensor
    for f in files:
        if not f.is_file():
            raise HFImportError(f"{f}: listed in the index but missing")
        with safe_open(str(f), framework="pt") as sf:
            for hf_name in sf.keys():
                stacked = adapter.from_hf_stacked(hf_name) if adapter.from_hf_stacked else None
                if stacked is not None:  # one expert's matrix of a stacked lmforge tensor
                    k, index, part = stacked
                    if k not in shapes:
                        raise HFImportError(f"{f}: tensor {hf_name} has no counterpart in lmforge's {cfg.family} "
                                            "model")
                    parts.setdefault(k, {})[(index, part)] = sf.get_tensor(hf_name)
                    continue
                k = from_hf(hf_name)
                if k is None:
                    continue  # derived from the config (rotary inv_freq in old exports)
                if k not in shapes:
                    raise HFImportError(f"{f}: tensor {hf_name} has no counterpart in lmforge's {cfg.family} model")
                state[k] = sf.get_tensor(hf_name)
    for k, got in parts.items():
        pieces = adapter.hf_tensors(k, shapes[k])  # the on-disk tensors this one is made of, in order
        by_name = {adapter.from_hf_stacked(name)[1:]: (name, shape) for name, shape, _ in pieces}
        lost = [name for key, (name, _) in by_name.items() if key not in got]
        if lost:
            raise HFImportError(f"{where}: missing weights {lost[:5]}{' ...' if len(lost) > 5 else ''}")
        out = torch.empty(shapes[k], dtype=next(iter(got.values())).dtype)
        for (name, shape, (index, lo, hi)) in pieces:
            t = got[adapter.from_hf_stacked(name)[1:]]
            if tuple(t.shape) != tuple(shape):
                raise HFImportError(f"{where}: {name} has shape {tuple(t.shape)}, config implies {tuple(shape)}")
            out[index, lo:hi] = t
        state[k] = out
    if cfg.tie_word_embeddings:
        emb = state.get("model.embed_tokens.weight")
        head = state.pop("lm_head.weight", None)
        if emb is not None and head is not None and not torch.equal(head, emb):
            raise HFImportError(f"{where}: tie_word_embeddings=true but lm_head.weight differs from the embedding")
        if emb is not None:
            state["lm_head.weight"] = emb  # one tensor, as in the tied module
    missing = [k for k in shapes if k not in state]
    if missing:
        raise HFImportError(f"{where}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, t in state.items():
        if t.shape != shapes[k]:
            raise HFImportError(f"{where}: {k} has shape {tuple(t.shape)}, config implies {tuple(shapes[k])}")
    return state


def load_hf_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face model directory or an import_hf output directory -> (its family's config, state_dict)."""
    d = Path(path)
    if not d.is_dir():
        raise HFImportError(f"{d}: not a directory")
    init_meta = d / "lmforge_init.json"
    if init_meta.is_file():
        meta = read_json(init_meta, HFImportError)
        if meta.get("format") != INIT_FORMAT:
            raise HFImportError(f"{init_meta}: format {meta.get('format')!r}, expected {INIT_FORMAT!r}")
        try:
            cfg = config_from_dict(meta["model_config"])
        except ValueError as e:
            raise HFImportError(f"{init_meta}: {e}") from None
        weights = d / "model.safetensors"
        if sha256_file(weights) != meta["weights_sha256"]:
            raise HFImportError(f"{weights}: sha256 differs from {init_meta} (file modified or truncated)")
        return cfg, _read_state([weights], cfg, d)
    cfg_file = d / "config.json"
    hf_cfg = read_json(cfg_file, HFImportError, missing="not found (not a Hugging Face model directory)")
    cfg = model_config_from_hf(hf_cfg, str(cfg_file))
    return cfg, _read_state(_weight_files(d), cfg, d)


def verify_import(hf_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> list[str]:
    from .verify import LOGIT_ATOL, load_hf_model

    hf = load_hf_model(hf_dir, cfg)
    ours = build_model(cfg).eval()
    ours.load_state_dict({k: v.float() for k, v in state.items()})
    ids = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_position_embeddings)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
    return [] if diff <= LOGIT_ATOL else [f"logits differ from transformers: max abs diff {diff:.3g} > {LOGIT_ATOL}"]


def _tokenizer_files(src: Path, cfg: ModelConfig) -> list[Path]:
    """The source's tokenizer files to copy (module docstring), each checked to fit the model's vocabulary."""
    from lmforge.common.tokenizer_files import (
        HF,
        SENTENCEPIECE,
        SP_FILE,
        TokenizerError,
        TokenizerFiles,
        resolve_tokenizer,
    )
    from lmforge.data_pipeline import hf_tokenizer
    from lmforge.data_pipeline.tokenizer import load_processor

    found: list[TokenizerFiles] = []
    if (src / SP_FILE).is_file():
        found.append(TokenizerFiles(SENTENCEPIECE, src / SP_FILE))
    try:
        files = resolve_tokenizer(src)
    except TokenizerError:  # no tokenizer: weights only
        files = None
    if files is not None and files.kind == HF:
        found.append(files)
    out = []
    for f in found:
        try:
            if f.kind == HF:
                n = hf_tokenizer.vocab_size(hf_tokenizer.load(f.path))
            else:
                n = load_processor(f.path).vocab_size()
        except TokenizerError as e:
            raise HFImportError(str(e)) from None
        if n > cfg.vocab_size:
            raise HFImportError(f"{f.path}: {n} token ids, more than the model's vocab_size {cfg.vocab_size} "
                                f"({src / 'config.json'})")
        out += [p for p, _ in f.all_files()]
    return out


def import_hf(model_dir: str | Path, output_dir: str | Path, verify: bool = True, overwrite: bool = False) -> Path:
    src = Path(model_dir).resolve()
    out = Path(output_dir).resolve()
    if out.exists() and not overwrite:
        raise HFImportError(f"{out} already exists (pass --overwrite to replace it)")
    cfg, state = load_hf_weights(src)
    tokenizer_files = _tokenizer_files(src, cfg)
    if verify:
        problems = verify_import(src, cfg, state)
        if problems:
            raise CheckFailed("verification failed: " + "; ".join(problems))
    with atomic_dir(out) as tmp:
        files = {k: v for k, v in state.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        save_file({k: v.contiguous() for k, v in files.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for f in tokenizer_files:
            shutil.copyfile(f, tmp / f.name)
        meta = {
            "format": INIT_FORMAT, "model_config": cfg.to_dict(), "source": str(src),
            "source_sha256": {p.name: sha256_file(p) for p in sorted(src.iterdir()) if p.is_file()},
            "weights_sha256": sha256_file(tmp / "model.safetensors"),
            "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in files.values()}),
        }
        (tmp / "lmforge_init.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lmforge.trainer.import_hf",
        description="Turn a local Hugging Face directory (safetensors; LlamaForCausalLM, MistralForCausalLM or "
                    "Qwen3ForCausalLM) into lmforge initial "
                    "weights (use the output, or the HF directory itself, as model.init_from_hf). Exit status: "
                    "0 imported, 1 logits differ from transformers, 2 unusable directory or arguments.")
    p.add_argument("--model", required=True, type=Path, help="local Hugging Face model directory")
    p.add_argument("--output", required=True, type=Path, help="directory to create")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the fp32 logits comparison with transformers")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def body() -> int:
        out = import_hf(a.model, a.output, verify=a.verify, overwrite=a.overwrite)
        print(f"imported {a.model} -> {out}")
        return 0

    return run_cli(body, prog="import_hf")


if __name__ == "__main__":
    sys.exit(main())

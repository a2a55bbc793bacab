"""Import a local Hugging Face Llama-family model as initial weights for continued pretraining.

    python -m trainer.import_hf --model HF_DIR --output INIT_DIR [--no-verify] [--overwrite]

INIT_DIR gets ``model.safetensors`` in lmforge's parameter names (identical to HF's, tied
``lm_head.weight`` omitted) and ``lmforge_init.json`` (model_config, source directory, sha256 of every
source file and of the written weights), plus the source's tokenizer files: ``tokenizer.model`` and a
Hugging Face ``tokenizer.json`` with its ``tokenizer_config.json``/``special_tokens_map.json``, whichever it
has, so that INIT_DIR (or the tokenizer.json in it) is the ``--tokenizer`` of preprocess and the trainer's
``tokenizer:`` for continued pretraining. A tokenizer with more ids than the model's vocabulary is refused.
Weights keep their stored dtype, so lmforge -> HF -> lmforge is bit-exact.

``load_hf_weights(path)`` accepts either an HF directory or an INIT_DIR and returns
``(ModelConfig, state_dict)`` for ``LlamaForCausalLM.load_state_dict`` (the trainer's
``model.init_from_hf``). Unsupported architectures fail with the config key that rules them out.
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

from data_pipeline.common.errors import CheckFailed, InputError, run_cli
from data_pipeline.common.files import atomic_dir, read_json, sha256_file
from model import ModelConfig, parameter_shapes

INIT_FORMAT = "lmforge-init-v1"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


class HFImportError(InputError):
    """The Hugging Face directory cannot be imported (exit 2); the message says which file/key and why."""


def model_config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    """HF config.json dict -> ModelConfig; raises HFImportError for anything our model cannot represent."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise HFImportError(f"{where}: model_type {mt!r} is not supported (need one of {SUPPORTED_MODEL_TYPES})")
    if mt == "mistral" and d.get("sliding_window") is not None:
        raise HFImportError(f"{where}: sliding_window={d['sliding_window']} attention is not supported")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise HFImportError(f"{where}: {key}=true is not supported (lmforge's Llama has no biases)")
    if d.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (need 'silu')")
    rope_params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for spec in (rope_params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in (None, "default"):
            raise HFImportError(f"{where}: rope scaling {kind!r} is not supported (only the default rotary)")
    theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    if head_dim * heads != d["hidden_size"]:
        raise HFImportError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {d['hidden_size']}")
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048), rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise HFImportError(f"{where}: missing required key {e}") from e
    except ValueError as e:
        raise HFImportError(f"{where}: {e}") from e


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
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise HFImportError(f"{f}: listed in the index but missing")
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.endswith("rotary_emb.inv_freq"):
                    continue  # derived from rope_theta; old exports carried it
                if k not in shapes:
                    raise HFImportError(f"{f}: tensor {k} has no counterpart in lmforge's Llama")
                state[k] = sf.get_tensor(k)
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
    """An HF Llama directory or an import_hf output directory -> (ModelConfig, state_dict)."""
    d = Path(path)
    if not d.is_dir():
        raise HFImportError(f"{d}: not a directory")
    init_meta = d / "lmforge_init.json"
    if init_meta.is_file():
        meta = read_json(init_meta, HFImportError)
        if meta.get("format") != INIT_FORMAT:
            raise HFImportError(f"{init_meta}: format {meta.get('format')!r}, expected {INIT_FORMAT!r}")
        cfg = ModelConfig.from_dict(meta["model_config"])
        weights = d / "model.safetensors"
        if sha256_file(weights) != meta["weights_sha256"]:
            raise HFImportError(f"{weights}: sha256 differs from {init_meta} (file modified or truncated)")
        return cfg, _read_state([weights], cfg, d)
    cfg_file = d / "config.json"
    hf_cfg = read_json(cfg_file, HFImportError, missing="not found (not a Hugging Face model directory)")
    cfg = model_config_from_hf(hf_cfg, str(cfg_file))
    return cfg, _read_state(_weight_files(d), cfg, d)


def verify_import(hf_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> list[str]:
    from model import LlamaForCausalLM

    from .verify import LOGIT_ATOL, load_hf_model

    hf = load_hf_model(hf_dir)
    ours = LlamaForCausalLM(cfg).eval()
    ours.load_state_dict({k: v.float() for k, v in state.items()})
    ids = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_position_embeddings)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
    return [] if diff <= LOGIT_ATOL else [f"logits differ from transformers: max abs diff {diff:.3g} > {LOGIT_ATOL}"]


def _tokenizer_files(src: Path, cfg: ModelConfig) -> list[Path]:
    """The source's tokenizer files to copy (module docstring), each checked to fit the model's vocabulary."""
    from data_pipeline import hf_tokenizer
    from data_pipeline.tokenizer import (
        HF,
        SENTENCEPIECE,
        SP_FILE,
        TokenizerError,
        TokenizerFiles,
        load_processor,
        resolve_tokenizer,
    )

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
        prog="python -m trainer.import_hf",
        description="Turn a local Hugging Face Llama-family directory (safetensors) into lmforge initial "
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

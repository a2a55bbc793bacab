"""Checks that an exported Hugging Face directory is the checkpoint it came from (see ``export.py``).

Returns a list of human-readable problems; empty means verified. Memory: the HF model and lmforge's
model are both held in fp32 here (2x the fp32 model), unlike the streaming export itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.model import ModelConfig, build_model, family_of

# Logit bound for fp32 parity. Both sides run the same fp32 weights through the same operations; they
# differ only in kernel choice (HF may pick eager/SDPA attention, different matmul blocking), which
# reorders fp32 sums: relative error ~1e-6 on logits of magnitude <~30 gives <~3e-5. Every real
# conversion bug we guard against (head order, GQA mapping, RMSNorm epsilon, rope theta, tying, a
# transposed or missing weight) moves logits by >1e-3, so 1e-4 separates the two with margin.
LOGIT_ATOL = 1e-4


def load_hf_model(model_dir: Path, cfg: ModelConfig):
    """The export (or an import's source) loaded with the ``transformers`` class of ``cfg``'s family, in fp32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cls = family_of(cfg).hf.transformers_model_class()
    try:
        return cls.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    except TypeError:  # transformers 4 spells it torch_dtype
        return cls.from_pretrained(str(model_dir), torch_dtype=torch.float32, local_files_only=True).eval()


def _check_config(hf_cfg, cfg: ModelConfig) -> list[str]:
    """Every ``config.json`` field the family's adapter wrote, as ``transformers`` read it back."""
    problems = []
    for k, want in family_of(cfg).hf.to_hf_config(cfg).items():
        got = getattr(hf_cfg, k, None)
        if k == "rope_theta" and got is None:  # transformers 5 keeps it in rope_parameters only
            got = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta")
        if got != want:
            problems.append(f"config.json {k}: transformers reads {got!r}, the checkpoint's model has {want!r}")
    if getattr(hf_cfg, "head_dim", cfg.head_dim) != cfg.head_dim:
        problems.append(f"config.json head_dim {hf_cfg.head_dim} != {cfg.head_dim}")
    return problems


def _check_special_ids(model_dir: Path, hf, hf_tokenizer_json: bool = False) -> list[str]:
    """config.json / generation_config.json special ids must be the tokenizer's, or generation never
    stops (eos) or starts from the wrong token (bos). The tokenizer: the export's tokenizer.model, or for a
    Hugging Face tokenizer.json the special ids ``transformers``' AutoTokenizer reads from the export's
    tokenizer_config.json (what its users get; the export wrote the run's end of document there, which
    need not be the one ``choose_eod`` would pick, e.g. after ``preprocess --eod-token``)."""
    from lmforge.common.tokenizer_files import resolve_tokenizer
    from lmforge.data_pipeline.tokenizer import tokenizer_info

    name = "tokenizer.json" if hf_tokenizer_json else "tokenizer.model"
    if hf_tokenizer_json:
        from transformers import AutoTokenizer

        from lmforge.data_pipeline import hf_tokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        info = {"vocab_size": hf_tokenizer.vocab_size(hf_tokenizer.load(model_dir / name))}
        for k in ("bos", "eos", "pad"):
            i = getattr(tok, f"{k}_token_id", None)
            info[f"{k}_id"] = -1 if i is None else i
        name = "tokenizer_config.json (read by AutoTokenizer)"
    else:
        info = tokenizer_info(resolve_tokenizer(model_dir / name))
    problems = []
    if info["vocab_size"] > hf.config.vocab_size:
        problems.append(f"{name} has {info['vocab_size']} ids but vocab_size is {hf.config.vocab_size}")
    for key, want in (("bos_token_id", info["bos_id"]), ("eos_token_id", info["eos_id"]),
                      ("pad_token_id", info["pad_id"])):
        want = want if want >= 0 else None
        for where, c in (("config.json", hf.config), ("generation_config.json", hf.generation_config)):
            got = getattr(c, key, None)
            if got != want:
                problems.append(f"{where} {key} is {got}, {name} says {want}")
    return problems


def verify_export(model_dir: Path, cfg: ModelConfig, getters: dict[str, Callable[[], torch.Tensor]],
                  dtype: torch.dtype, extra_texts: list[str] = (), tokenizer_file: Path | None = None) -> list[str]:
    """``tokenizer_file``: the run's tokenizer (the checkpoint's copy); a Hugging Face tokenizer.json is
    the reference of the HF parity check. Without it (or for a SentencePiece model) the export's
    tokenizer.model is the reference."""
    from lmforge.common.tokenizer_files import HF, resolve_tokenizer

    from .tokenizer import PARITY_TEXTS, check_hf_tokenizer_parity, check_tokenizer_parity

    hf_json = tokenizer_file is not None and resolve_tokenizer(tokenizer_file).kind == HF

    problems: list[str] = []
    try:
        hf = load_hf_model(model_dir, cfg)
    except Exception as e:  # any load failure is the finding
        return [f"transformers cannot load the export: {type(e).__name__}: {e}"]
    problems += _check_config(hf.config, cfg)
    problems += _check_special_ids(model_dir, hf, hf_json)

    # Reference: lmforge's own model with the checkpoint's weights, rounded to the export dtype exactly
    # as the files were, so the logit comparison isolates the architecture mapping from the cast.
    ours = build_model(cfg).eval()
    ours_sd = ours.state_dict()
    hf_sd = hf.state_dict()
    to_hf = family_of(cfg).hf.to_hf_name
    with torch.no_grad():
        for k, get in getters.items():
            ref = get().to(dtype).float()
            ours_sd[k].copy_(ref)
            name = to_hf(k)
            if name not in hf_sd:
                problems.append(f"weight {name}: missing from the transformers model")
            elif hf_sd[name].shape != ref.shape or not torch.equal(hf_sd[name], ref):
                problems.append(f"weight {name}: differs from the checkpoint after loading with transformers")
            del ref
    if cfg.tie_word_embeddings and not torch.equal(hf.get_output_embeddings().weight,
                                                   hf.get_input_embeddings().weight):
        problems.append("lm_head is not tied to embed_tokens in the transformers model")
    if problems:
        return problems  # logits would only restate a weight/config problem

    gen = torch.Generator().manual_seed(1234)
    t = min(64, cfg.max_position_embeddings)
    batches = [torch.randint(0, cfg.vocab_size, (2, t), generator=gen),
               torch.randint(0, cfg.vocab_size, (1, min(256, cfg.max_position_embeddings)), generator=gen)]
    with torch.no_grad():
        for i, ids in enumerate(batches):
            diff = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
            if not diff <= LOGIT_ATOL:  # also catches NaN
                problems.append(f"logits batch {i} {tuple(ids.shape)}: max abs diff {diff:.3g} > {LOGIT_ATOL}")

    texts = list(PARITY_TEXTS) + list(extra_texts)
    if hf_json:
        problems += check_hf_tokenizer_parity(model_dir, tokenizer_file, texts)
    else:
        problems += check_tokenizer_parity(model_dir, texts)

    # generate() runs (and exercises HF's KV-cache path): every greedy token must be an argmax of our
    # full-sequence logits up to the logit tolerance (a tie within 1e-4 may legitimately go either way).
    prompt = torch.tensor([[max(hf.config.bos_token_id or 0, 0), 5, 6, 7]])
    n_new = 8
    try:
        with torch.no_grad():
            out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                              min_new_tokens=n_new, do_sample=False)
    except Exception as e:
        return problems + [f"generate() failed: {type(e).__name__}: {e}"]
    if out.shape != (1, prompt.shape[1] + n_new):
        return problems + [f"generate() returned shape {tuple(out.shape)}"]
    with torch.no_grad():
        logits = ours(out)[0]
    for j in range(prompt.shape[1], out.shape[1]):
        row = logits[j - 1]
        eos = hf.config.eos_token_id
        if eos is not None and eos >= 0:
            row = row.clone()
            row[eos] = -float("inf")  # min_new_tokens suppresses EOS in HF's sampling
        if row.max() - row[out[0, j]] > LOGIT_ATOL:
            problems.append(f"generate() token {j} ({int(out[0, j])}) is not the greedy choice of lmforge's model")
            break
    return problems

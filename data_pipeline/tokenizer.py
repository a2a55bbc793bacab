"""Tokenizers: SentencePiece training from a bounded-memory sample of a document stream (``sampling``), and
what the pipeline and the trainer do with either kind they accept.

Ids are Llama-compatible: unk 0, bos 1, eos 2, pad optional (-1 = none). ``tokenizer.json`` next to the
model records the settings, the sample statistics and the corpus fingerprint.

``--tokenizer`` (preprocess) and the trainer's ``tokenizer:`` name either a SentencePiece model or a
Hugging Face ``tokenizer.json`` (``hf_tokenizer``), or a directory holding one; which one a path is, is
``lmforge.common.tokenizer_files.resolve_tokenizer`` (``TokenizerFiles``). Here: ``tokenizer_info`` gives
what the manifest and checkpoints record of either; ``copy_tokenizer`` puts its files beside shards or
checkpoints; ``Decoder`` turns ids back into text.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

from lmforge.common.files import atomic_copy, atomic_write_bytes, atomic_write_json, sha256_file
from lmforge.common.tokenizer_files import (
    HF,
    HF_FILE,
    TokenizerError,
    TokenizerFiles,
    json_kind,
    resolve_tokenizer,
)

from . import hf_tokenizer
from .readers import ReadOptions, expand_inputs, fingerprint
from .sampling import sample_sentences


def train_tokenizer(
    inputs: list[str],
    output_dir: str,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    seed: int = 1234,
    sample_sentences_max: int = 2_000_000,
    sample_bytes_max: int = 1 << 30,
    user_symbols: list[str] | None = None,
    pad: bool = False,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
    read_opts: ReadOptions | None = None,
    fmt: str = "auto",
    wiki_indexes: Sequence[str] = (),
) -> Path:
    import sentencepiece as spm

    if (Path(output_dir) / HF_FILE).is_file() and json_kind(Path(output_dir) / HF_FILE)[0] == "hf":
        raise TokenizerError(f"{output_dir} holds a Hugging Face tokenizer ({HF_FILE}); choose another --output")
    opts = read_opts or ReadOptions()
    sources = expand_inputs(inputs, fmt, wiki_indexes)
    try:
        sentences, stats = sample_sentences(sources, opts, sample_sentences_max, sample_bytes_max, seed)
    except UnicodeEncodeError as e:  # a lone surrogate (a JSON "\ud800" escape): SentencePiece takes UTF-8
        raise TokenizerError(str(e)) from None
    if not sentences:
        raise TokenizerError("no text found in the inputs to train a tokenizer on")
    settings = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "byte_fallback": True,
        "split_digits": True,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3 if pad else -1,
        "user_defined_symbols": list(user_symbols or []),
        "character_coverage": character_coverage,
        # Llama-style: keep whitespace and text exactly (no NFKC, no collapsing of runs of spaces).
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "max_sentence_length": 4192,
        "input_sentence_size": 0,  # we already sampled; let the trainer use all of it
        "shuffle_input_sentence": False,
        "hard_vocab_limit": True,
    }
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
            **settings,
        )
    except RuntimeError as e:  # SentencePiece reports bad settings as RuntimeError("INTERNAL: ...")
        raise TokenizerError(f"SentencePiece training failed: {e}") from None
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = model.getvalue()
    atomic_write_bytes(out / "tokenizer.model", blob)
    meta = {
        "format": "lmforge-tokenizer-v1",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "settings": settings,
        "seed": seed,
        "sample": {**stats, "max_sentences": sample_sentences_max, "max_bytes": sample_bytes_max},
        "sources": [{"path": s.path, "size": s.size, "fingerprint": fingerprint(s)} for s in sources],
        "corpus_fingerprint": hashlib.sha256(
            "".join(fingerprint(s) for s in sources).encode()
        ).hexdigest(),
    }
    atomic_write_json(out / "tokenizer.json", meta, indent=2)
    return out / "tokenizer.model"


_LOADED: dict = {}


def load_processor(model_path: str):
    """A SentencePieceProcessor for ``model_path``, loaded once per process (and file version): preprocess
    asks for it for the manifest and again for tokenizing, and forked workers inherit it."""
    import sentencepiece as spm

    st = os.stat(model_path)
    key = (os.path.realpath(model_path), st.st_size, st.st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        try:
            _LOADED[key] = spm.SentencePieceProcessor(model_file=str(model_path))
        except RuntimeError as e:  # SentencePiece's "Internal: ... ParseFromArray failed" and the like
            raise TokenizerError(f"{model_path}: not a SentencePiece model ({e})") from None
    return _LOADED[key]


def _sp_info(model_path: str | os.PathLike, eod_token: str | None = None) -> dict:
    sp = load_processor(model_path)
    eos, source = sp.eos_id(), "tokenizer.model eos_id"
    if eod_token is not None:
        eos, source = sp.piece_to_id(eod_token), "--eod-token"
        if eos == sp.unk_id() and eod_token != sp.id_to_piece(sp.unk_id()):
            raise TokenizerError(f"--eod-token {eod_token!r} is not a piece of {model_path}")
    return {
        "sha256": sha256_file(model_path),
        "vocab_size": sp.vocab_size(),
        "eos_id": eos,
        "bos_id": sp.bos_id(),
        "unk_id": sp.unk_id(),
        "pad_id": sp.pad_id(),
        "path": str(model_path),
        "eod_token": sp.id_to_piece(eos) if eos >= 0 else None,
        "eod_source": source if eos >= 0 else "none: the model has no eos piece",
    }


# --------------------------------------------------------------------------------------------------
# Either kind: SentencePiece or Hugging Face


def tokenizer_info(model_path: str | os.PathLike | TokenizerFiles, eod_token: str | None = None) -> dict:
    """sha256, vocab size (largest id + 1) and special ids (-1 = none) of either kind of tokenizer: what
    the manifest records. ``eos_id`` is the end-of-document id appended to every document: ``eod_token``
    when given, else the tokenizer's own choice (``hf_tokenizer.choose_eod``; a SentencePiece model's eos
    piece); ``eod_token``/``eod_source`` say which token that is and where the choice came from."""
    files = resolve_tokenizer(model_path)
    if files.kind == HF:
        return hf_tokenizer.info(files.path, eod_token)
    try:
        return _sp_info(files.path, eod_token)
    except TokenizerError as e:  # say that the other kind was considered too
        raise TokenizerError(f"{e}; nor is it a Hugging Face tokenizer.json (not JSON)") from None


def copy_tokenizer(files: TokenizerFiles, dst_dir: str | os.PathLike, sha256: str) -> None:
    """The tokenizer's files into ``dst_dir`` (``files.name`` and the companions' names), atomically, each
    unless already there with the same bytes; ValueError if the tokenizer no longer has ``sha256``."""
    dst_dir = Path(dst_dir)
    for src, name in files.all_files():
        dst = dst_dir / name
        want = sha256 if src == files.path else sha256_file(src)
        if dst.exists() and sha256_file(dst) == want:
            continue
        atomic_copy(src, dst, expect_sha256=want)


class Decoder:
    """ids -> text and id -> piece for either kind (``inspect``)."""

    def __init__(self, files: TokenizerFiles):
        if files.kind == HF:
            tok = hf_tokenizer.load(files.path)
            self.decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # as SentencePiece does
            self.id_to_piece = tok.id_to_token
        else:
            sp = load_processor(files.path)
            self.decode, self.id_to_piece = sp.decode, sp.id_to_piece

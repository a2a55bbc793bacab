"""Tokenizers: SentencePiece training from a bounded-memory sample of a document stream, and loading either
kind the pipeline and the trainer accept (``resolve_tokenizer``).

The stream (any format ``data_pipeline.readers`` reads) is cut into lines; lines longer than SentencePiece's
``max_sentence_length`` are split at whitespace so nothing is silently dropped by the trainer; a
seeded reservoir sample (Algorithm R) of at most ``sample_sentences`` lines and ``sample_bytes`` bytes
is kept, so memory is bounded whatever the corpus size. Ids are Llama-compatible: unk 0, bos 1, eos 2,
pad optional (-1 = none). ``tokenizer.json`` next to the model records the settings, the sample
statistics and the corpus fingerprint.

``--tokenizer`` (preprocess) and the trainer's ``tokenizer:`` name either a SentencePiece model or a
Hugging Face ``tokenizer.json`` (``hf_tokenizer``: recognised by content, since the training record above
shares that name), or a directory holding one (its Hugging Face tokenizer.json if it has one, else its
tokenizer.model). ``resolve_tokenizer`` says which (``TokenizerFiles``); ``tokenizer_info`` gives what the
manifest and checkpoints record of either; ``copy_tokenizer`` puts its files beside shards or checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .common.errors import InputError
from .common.files import atomic_copy, atomic_write_bytes, atomic_write_json, sha256_file
from .readers import DOC, LAST, PART, ReadOptions, Source, expand_inputs, fingerprint, iter_documents

MAX_SENTENCE_BYTES = 4000  # SentencePiece's default max_sentence_length is 4192 bytes
SENTENCEPIECE, HF = "sentencepiece", "hf"
SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"


class TokenizerError(InputError):
    """Nothing to train on, settings a trainer rejects, or a file that is not a tokenizer (file and reason)."""


def split_long_line(line: str, limit: int = MAX_SENTENCE_BYTES) -> list[str]:
    """Split ``line`` into pieces of at most ``limit`` UTF-8 bytes, preferring whitespace cuts."""
    if len(line.encode("utf-8")) <= limit:
        return [line]
    out = []
    while line:
        # Take at most `limit` bytes' worth of characters (<= limit chars; chars can be 1-4 bytes).
        cut = limit
        while len(line[:cut].encode("utf-8")) > limit:
            cut = cut * 3 // 4
        if cut < len(line):
            space = line.rfind(" ", cut // 2, cut)
            if space > 0:
                cut = space
        out.append(line[:cut])
        line = line[cut:].lstrip(" ")
    return [p for p in out if p.strip()]


def sample_sentences(
    sources: list[Source],
    opts: ReadOptions,
    max_sentences: int,
    max_bytes: int,
    seed: int,
) -> tuple[list[str], dict]:
    """Reservoir-sample lines from the stream. Deterministic for a seed and input order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    res_bytes = 0
    seen = 0
    docs = 0
    for src in sources:
        for kind, text, _loc in iter_documents(src, opts):
            if kind not in (DOC, PART, LAST):
                continue
            docs += kind != PART
            for line in text.split("\n"):
                if not line.strip():
                    continue
                for piece in split_long_line(line):
                    seen += 1
                    if len(reservoir) < max_sentences and res_bytes < max_bytes:
                        reservoir.append((seen, piece))
                        res_bytes += len(piece)
                    else:
                        j = rng.randrange(seen)
                        if j < len(reservoir):
                            res_bytes += len(piece) - len(reservoir[j][1])
                            reservoir[j] = (seen, piece)
    reservoir.sort()  # stream order: a sample that reads like the corpus, independent of hash order
    stats = {"documents": docs, "lines_seen": seen, "lines_sampled": len(reservoir), "sample_chars": res_bytes}
    return [s for _, s in reservoir], stats


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
) -> Path:
    import sentencepiece as spm

    from .hf_tokenizer import json_kind

    if (Path(output_dir) / HF_FILE).is_file() and json_kind(Path(output_dir) / HF_FILE)[0] == "hf":
        raise TokenizerError(f"{output_dir} holds a Hugging Face tokenizer ({HF_FILE}); choose another --output")
    opts = read_opts or ReadOptions()
    sources = expand_inputs(inputs, fmt)
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


def _sp_info(model_path: str | os.PathLike) -> dict:
    sp = load_processor(model_path)
    return {
        "sha256": sha256_file(model_path),
        "vocab_size": sp.vocab_size(),
        "eos_id": sp.eos_id(),
        "bos_id": sp.bos_id(),
        "unk_id": sp.unk_id(),
        "pad_id": sp.pad_id(),
        "path": str(model_path),
    }


# --------------------------------------------------------------------------------------------------
# Either kind: SentencePiece or Hugging Face


@dataclass(frozen=True)
class TokenizerFiles:
    """A tokenizer on disk: ``kind`` (SENTENCEPIECE or HF), ``path`` the file that is fingerprinted
    (sha256) and copied under ``name``, and for HF the ``companions`` beside it that name its special
    tokens (tokenizer_config.json, special_tokens_map.json), copied with it under their own names."""

    kind: str
    path: Path
    companions: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        return SP_FILE if self.kind == SENTENCEPIECE else HF_FILE

    def all_files(self) -> list[tuple[Path, str]]:
        """(source, name to copy it to) for the tokenizer and its companions."""
        return [(self.path, self.name)] + [(c, c.name) for c in self.companions]


def resolve_tokenizer(path: str | os.PathLike | TokenizerFiles) -> TokenizerFiles:
    """Which tokenizer ``path`` is (module docstring); TokenizerError naming the file and the reason if it
    is neither kind. A SentencePiece model is only recognised here (not JSON); loading it checks it."""
    from . import hf_tokenizer as hf

    if isinstance(path, TokenizerFiles):
        return path
    p = Path(path)
    if p.is_dir():
        why = ""
        if (p / HF_FILE).is_file():
            kind, why = hf.json_kind(p / HF_FILE)
            if kind == "hf":
                return TokenizerFiles(HF, p / HF_FILE, hf.companions(p / HF_FILE))
        if (p / SP_FILE).is_file():
            return TokenizerFiles(SENTENCEPIECE, p / SP_FILE)
        raise TokenizerError(f"{p}: a directory without a Hugging Face {HF_FILE} or a SentencePiece {SP_FILE}"
                             + (f" ({p / HF_FILE}: {why})" if why else ""))
    if not p.is_file():
        raise TokenizerError(f"{p}: no such file or directory")
    with open(p, "rb") as f:
        head = f.read(256).removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"{"):  # a SentencePiece model is a protobuf: never starts with "{"
        kind, why = hf.json_kind(p)
        if kind != "hf":
            raise TokenizerError(f"{p}: not a tokenizer: {why}")
        return TokenizerFiles(HF, p, hf.companions(p))
    return TokenizerFiles(SENTENCEPIECE, p)


def tokenizer_info(model_path: str | os.PathLike | TokenizerFiles) -> dict:
    """sha256, vocab size (largest id + 1) and special ids (-1 = none) of either kind of tokenizer: what
    the manifest records. ``eos_id`` is the end-of-document id appended to every document."""
    files = resolve_tokenizer(model_path)
    if files.kind == HF:
        from . import hf_tokenizer

        return hf_tokenizer.info(files.path)
    try:
        return _sp_info(files.path)
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
            from . import hf_tokenizer

            tok = hf_tokenizer.load(files.path)
            self.decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # as SentencePiece does
            self.id_to_piece = tok.id_to_token
        else:
            sp = load_processor(files.path)
            self.decode, self.id_to_piece = sp.decode, sp.id_to_piece

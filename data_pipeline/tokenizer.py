"""The SentencePiece tokenizer: training from a bounded-memory sample of a document stream, and loading.

The stream (any format ``data_pipeline.readers`` reads) is cut into lines; lines longer than SentencePiece's
``max_sentence_length`` are split at whitespace so nothing is silently dropped by the trainer; a
seeded reservoir sample (Algorithm R) of at most ``sample_sentences`` lines and ``sample_bytes`` bytes
is kept, so memory is bounded whatever the corpus size. Ids are Llama-compatible: unk 0, bos 1, eos 2,
pad optional (-1 = none). ``tokenizer.json`` next to the model records the settings, the sample
statistics and the corpus fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

from .common.errors import InputError
from .common.files import atomic_write_bytes, atomic_write_json, sha256_file
from .readers import DOC, LAST, PART, ReadOptions, Source, expand_inputs, fingerprint, iter_documents

MAX_SENTENCE_BYTES = 4000  # SentencePiece's default max_sentence_length is 4192 bytes


class TokenizerError(InputError):
    """Nothing to train on, settings SentencePiece rejects, or a file that is not a SentencePiece model."""


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


def tokenizer_info(model_path: str) -> dict:
    """sha256, vocab size and special ids of a SentencePiece model (what the manifest records)."""
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

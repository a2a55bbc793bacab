"""Which tokenizer a path is: a SentencePiece model or a Hugging Face ``tokenizer.json``, or a directory
holding one (its Hugging Face tokenizer.json if it has one, else its tokenizer.model).

Every stage asks this question (preprocess for ``--tokenizer``, the trainer for ``tokenizer:``, import and
export for the files beside a model), so it lives with the foundations; loading, encoding and training
either kind is the data pipeline's (``data_pipeline.tokenizer``, ``data_pipeline.hf_tokenizer``).

Recognised by content, never by name alone: lmforge's SentencePiece training writes a ``tokenizer.json`` of
its own beside ``tokenizer.model`` (the record of that training run, format ``lmforge-tokenizer-v1``), while
a Hugging Face one is a JSON object with a ``model`` object and an ``added_tokens`` list.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

SENTENCEPIECE, HF = "sentencepiece", "hf"
SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
# Files beside a tokenizer.json that say which of its tokens are special: copied with it everywhere.
COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(InputError):
    """Nothing to train on, settings a trainer rejects, or a file that is not a tokenizer (file and reason)."""


_PARSED: dict = {}


def read_json_cached(path: str | os.PathLike):
    """The parsed JSON of ``path``, once per process and file version (a tokenizer.json of a 128k vocabulary
    is ~10 MB, and recognising, loading and inspecting it would each parse it again)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _PARSED:
        _PARSED.clear()
        _PARSED[key] = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    return _PARSED[key]


def json_kind(path: str | os.PathLike) -> tuple[str, str]:
    """("hf", "") for a Hugging Face tokenizer.json, ("lmforge-record", why) for lmforge's SentencePiece
    training record, ("other", why) for anything else (not JSON, or JSON of another shape)."""
    try:
        d = read_json_cached(path)
    except UnicodeDecodeError:
        return "other", "not UTF-8 text"
    except ValueError as e:
        return "other", f"not valid JSON ({e})"
    if isinstance(d, dict) and d.get("format") == "lmforge-tokenizer-v1":
        return "lmforge-record", ("lmforge's record of a SentencePiece training run, not a tokenizer; pass the "
                                  "tokenizer.model beside it (or the directory)")
    if isinstance(d, dict) and isinstance(d.get("model"), dict) and isinstance(d.get("added_tokens"), list):
        return "hf", ""
    return "other", "JSON, but not a Hugging Face tokenizer.json (no 'model' object and 'added_tokens' list)"


def companions(tokenizer_json: Path) -> tuple[Path, ...]:
    return tuple(p for p in (tokenizer_json.parent / n for n in COMPANIONS) if p.is_file())



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
    if isinstance(path, TokenizerFiles):
        return path
    p = Path(path)
    if p.is_dir():
        why = ""
        if (p / HF_FILE).is_file():
            kind, why = json_kind(p / HF_FILE)
            if kind == "hf":
                return TokenizerFiles(HF, p / HF_FILE, companions(p / HF_FILE))
        if (p / SP_FILE).is_file():
            return TokenizerFiles(SENTENCEPIECE, p / SP_FILE)
        raise TokenizerError(f"{p}: a directory without a Hugging Face {HF_FILE} or a SentencePiece {SP_FILE}"
                             + (f" ({p / HF_FILE}: {why})" if why else ""))
    if not p.is_file():
        raise TokenizerError(f"{p}: no such file or directory")
    with open(p, "rb") as f:
        head = f.read(256).removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"{"):  # a SentencePiece model is a protobuf: never starts with "{"
        kind, why = json_kind(p)
        if kind != "hf":
            raise TokenizerError(f"{p}: not a tokenizer: {why}")
        return TokenizerFiles(HF, p, companions(p))
    return TokenizerFiles(SENTENCEPIECE, p)

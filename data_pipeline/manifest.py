"""The ``manifest.json`` contract between the data pipeline and the trainer.

``manifest["splits"][split]`` is a list of shards in order; each has ``prefix`` (relative to the
manifest's directory, Megatron-style: ``prefix + ".bin"``/``".idx"``), ``documents``, ``sequences``,
``tokens``, ``sha256_bin`` and ``sha256_idx``. ``manifest["tokenizer"]`` has ``sha256``, ``vocab_size``,
``eos_id`` (the EOD appended to every document), ``bos_id``; ``manifest["dtype"]`` is the token dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_write_json

MANIFEST_NAME = "manifest.json"
FORMAT = "lmforge-shards-v1"


class ManifestError(ValueError):
    pass


def _manifest_path(path_or_dir: str | os.PathLike) -> Path:
    p = Path(path_or_dir)
    return p / MANIFEST_NAME if p.is_dir() else p


def load_manifest(path_or_dir: str | os.PathLike) -> dict:
    """Read and sanity-check ``manifest.json`` (given the file or the output directory)."""
    p = _manifest_path(path_or_dir)
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{p}: no manifest (did preprocess finish?)") from None
    except ValueError as e:
        raise ManifestError(f"{p}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT:
        raise ManifestError(f"{p}: format {m.get('format')!r}, expected {FORMAT!r}")
    for key in ("tokenizer", "splits"):
        if key not in m:
            raise ManifestError(f"{p}: missing {key!r}")
    return m


def shard_prefixes(path_or_dir: str | os.PathLike, split: str = "train") -> list[str]:
    """Absolute shard prefixes of ``split`` (empty list when the split has no shards)."""
    p = _manifest_path(path_or_dir)
    m = load_manifest(p)
    if split not in m["splits"]:
        raise ManifestError(f"{p}: no split {split!r} (have {sorted(m['splits'])})")
    return [str((p.parent / s["prefix"]).resolve()) for s in m["splits"][split]]


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    atomic_write_json(path, obj, indent=1)

"""Local ``hf:`` datasets for tests: a directory of JSON-lines files made from the test corpora's
documents (no hub access: ``datasets`` loads a local directory with its packaged json builder, one shard
per file)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.data_pipeline.readers import DOC, ReadOptions, expand_inputs, iter_documents


def corpus_documents(inputs: list[Path]) -> list[str]:
    """The documents the pipeline reads from ``inputs``, in order."""
    return [t for s in expand_inputs([str(p) for p in inputs]) for k, t, _ in iter_documents(s, ReadOptions())
            if k == DOC]


def write_jsonl_dir(dst: Path, records: list[dict], files: int) -> list[Path]:
    """``records`` as ``files`` non-empty JSON-lines files ``part-NNNNN.jsonl`` of about equal size
    (consecutive records, in order) in the new directory ``dst`` (needs at least ``files`` records)."""
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]
    dst.mkdir(parents=True)
    target = sum(map(len, lines)) / files
    paths, cur, size = [], [], 0
    for i, line in enumerate(lines):
        cur.append(line)
        size += len(line)
        left_files, left_lines = files - len(paths) - 1, len(lines) - i - 1
        if 0 < left_files <= left_lines and (size >= target or left_lines == left_files):
            paths.append(dst / f"part-{len(paths):05d}.jsonl")
            paths[-1].write_bytes(b"".join(cur))
            cur, size = [], 0
    paths.append(dst / f"part-{len(paths):05d}.jsonl")
    paths[-1].write_bytes(b"".join(cur))
    return paths

"""``inspect``, ``verify`` and ``merge`` of preprocess outputs (through the manifest API)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmforge.common.files import atomic_copy, sha256_file

from .indexed_dataset import IndexedDataset, IndexedDatasetError
from .manifest import (
    MANIFEST_NAME,
    ManifestError,
    assemble_merged,
    load_manifest,
    shard_files,
    write_manifest,
)


def _root(out: str | os.PathLike) -> Path:
    """The output directory, given it or its manifest.json."""
    p = Path(out)
    return p.parent if p.name == MANIFEST_NAME else p


def verify(out: str | os.PathLike) -> list[str]:
    """Recompute every checksum and re-read every index; returns the problems found (empty = OK)."""
    root = _root(out)
    m = load_manifest(root)
    problems = []
    for shards in m["splits"].values():
        for sh in shards:
            base = root / sh["prefix"]
            for f, sha in shard_files(root, sh):
                if not f.exists():
                    problems.append(f"{f}: missing")
                elif sha256_file(f) != sha:
                    problems.append(f"{f}: sha256 mismatch (file changed or corrupt)")
            if any(p.startswith(str(base)) for p in problems):
                continue
            try:
                ds = IndexedDataset(base)
            except IndexedDatasetError as e:
                problems.append(str(e))
                continue
            if ds.num_documents != sh["documents"] or ds.num_tokens != sh["tokens"]:
                problems.append(f"{base}: {ds.num_documents} documents / {ds.num_tokens} tokens, manifest says "
                                f"{sh['documents']} / {sh['tokens']}")
            vocab = m["tokenizer"]["vocab_size"]
            if ds.num_tokens and int(ds.tokens.max()) >= vocab:
                problems.append(f"{base}: token id {int(ds.tokens.max())} >= vocab size {vocab}")
    tok = root / m["tokenizer"].get("file", "tokenizer.model")
    if tok.exists() and sha256_file(tok) != m["tokenizer"]["sha256"]:
        problems.append(f"{tok}: sha256 differs from the manifest's tokenizer")
    return problems


def inspect(out: str | os.PathLike, samples: int = 3, chars: int = 300) -> str:
    """A report: records and skips, per split the document-length percentiles, the token histogram's
    head, and decoded sample documents."""
    root = _root(out)
    m = load_manifest(root)
    tk = m["tokenizer"]
    lines = [f"{root}: {m['format']}, tokenizer sha256 {tk['sha256'][:16]}..., vocab {tk['vocab_size']}, "
             f"eod {tk['eos_id']}, dtype {m.get('dtype')}"]
    if tk.get("eod_token") is not None:
        lines.append(f"end of document: {tk['eod_token']!r} (id {tk['eos_id']}), from {tk.get('eod_source', '?')}")
    r = m.get("records", {})
    if r:
        lines.append(f"records read {r['read']:,} = written {r['written']:,} + skipped {r['skipped']:,}")
    for reason, n in m.get("skipped", {}).items():
        lines.append(f"  skipped {reason}: {n:,} (e.g. {', '.join(m.get('skip_examples', {}).get(reason, [])[:3])})")
    sp = None
    tok_path = root / tk.get("file", "tokenizer.model")
    if tok_path.exists():
        from lmforge.common.tokenizer_files import resolve_tokenizer

        from .tokenizer import Decoder

        sp = Decoder(resolve_tokenizer(tok_path))
    for split, shards in m["splits"].items():
        if not shards:
            lines.append(f"[{split}] no shards")
            continue
        doc_lens = []
        counts = np.zeros(tk["vocab_size"], dtype=np.int64)
        for sh in shards:
            ds = IndexedDataset(root / sh["prefix"])
            di = ds.document_indices
            cum = np.concatenate(([0], np.cumsum(ds.sequence_lengths, dtype=np.int64)))
            doc_lens.append(cum[di[1:]] - cum[di[:-1]])
            if ds.num_tokens:
                counts += np.bincount(ds.tokens, minlength=tk["vocab_size"])[: tk["vocab_size"]]
        lens = np.concatenate(doc_lens)
        total = int(lens.sum())
        pct = np.percentile(lens, [0, 50, 90, 99, 100]).astype(int) if len(lens) else [0] * 5
        lines.append(f"[{split}] {len(shards)} shard(s), {len(lens):,} documents, {total:,} tokens; "
                     f"doc length min/p50/p90/p99/max {'/'.join(map(str, pct))}")
        used = int((counts > 0).sum())
        top = np.argsort(-counts)[:10]
        top_s = ", ".join(f"{sp.id_to_piece(int(t)) if sp else int(t)!r}:{counts[t] / max(total, 1):.1%}"
                          for t in top if counts[t])
        lines.append(f"  token ids used {used:,}/{tk['vocab_size']:,}; top: {top_s}")
        if sp is not None:
            ds = IndexedDataset(root / shards[0]["prefix"])
            for i in range(min(samples, len(ds))):
                text = sp.decode(ds[i].tolist())
                lines.append(f"  sample {i}: {text[:chars]!r}{'...' if len(text) > chars else ''}")
    return "\n".join(lines)


def merge(inputs: list[str], output: str) -> dict:
    """Copy shards of several outputs (same tokenizer and dtype) into ``output`` with one manifest."""
    parts = [(Path(p), load_manifest(p)) for p in inputs]
    ref_path, ref = parts[0]
    for p, m in parts[1:]:
        if m["tokenizer"]["sha256"] != ref["tokenizer"]["sha256"] or m.get("dtype") != ref.get("dtype"):
            raise ManifestError(f"{p}: different tokenizer or dtype from {ref_path}; cannot merge")
    out = Path(output)
    if (out / MANIFEST_NAME).exists():
        raise ManifestError(f"{out}: already holds a manifest; choose a new directory")
    splits: dict[str, list[dict]] = {}
    for k, (p, m) in enumerate(parts):
        root = _root(p)
        for split, shards in m["splits"].items():
            merged = splits.setdefault(split, [])
            for sh in shards:
                new = {**sh, "prefix": f"{split}/m{k:03d}_{Path(sh['prefix']).name}"}
                for (src, sha), (dst, _) in zip(shard_files(root, sh), shard_files(out, new)):
                    try:
                        atomic_copy(src, dst, expect_sha256=sha)
                    except ValueError:  # the copy's checksum is not the recorded one
                        raise ManifestError(f"{src}: checksum mismatch; run verify on {root}") from None
                merged.append(new)
    from lmforge.common.tokenizer_files import resolve_tokenizer

    name = ref["tokenizer"].get("file", "tokenizer.model")
    for src, dst in resolve_tokenizer(_root(ref_path) / name).all_files():  # with an HF tokenizer's companions
        atomic_copy(src, out / dst)
    manifest = assemble_merged([(str(p), m) for p, m in parts], splits)
    write_manifest(out, manifest)
    return manifest

"""``manifest.json``, the contract between the data pipeline and the trainer: the one module that builds,
writes, reads and checks it (``preprocess`` and ``merge`` write it; ``inspect``, ``verify``, the trainer's
datasets and its summaries read it).

``manifest["splits"][split]`` is a list of shards in order; each has ``prefix`` (relative to the
manifest's directory, Megatron-style: ``prefix + ".bin"``/``".idx"``), ``documents``, ``sequences``,
``tokens``, ``sha256_bin`` and ``sha256_idx``. ``manifest["tokenizer"]`` has ``sha256``, ``vocab_size``,
``eos_id`` (the EOD appended to every document; ``eod_token`` and ``eod_source`` say which token and where
the choice came from: a file and key, the vocabulary, or ``--eod-token``), ``bos_id`` and ``file``, the
tokenizer's copy beside the
manifest: ``tokenizer.model`` (SentencePiece) or ``tokenizer.json`` (Hugging Face, with its
``tokenizer_config.json``/``special_tokens_map.json`` when it had them); ``manifest["dtype"]`` is the
token dtype.
``totals`` sums each split (``split_totals``); ``records``/``skipped``/``skip_examples`` account for
every input record (read = written + skipped); ``duplicate_examples`` (only with ``--dedup``) pairs
example duplicates with the documents they duplicate (``{"loc": ..., "kept": ...}``); ``removed_lists``
(when a filter or ``--dedup`` removed any) names the files that list every removed document
(``{"filtered": [{"file": "filtered/unit_00003.tsv", "documents": 12}, ...], "duplicates": [...]}``,
paths relative to the manifest; each unit's rows are its documents skipped for ``filter-*`` or
``duplicate-*`` reasons); ``dedup`` (only with ``--dedup``) has ``streamed_exact_only``: the documents
streamed in pieces (longer than ``--max-doc-bytes``) that were deduplication candidates by their exact key
only, never near-duplicate (MinHash) ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.common.errors import InputError
from lmforge.common.files import atomic_write_json, sha256_file, sha256_json

from .indexed_dataset import IndexedDataset, exists

MANIFEST_NAME = "manifest.json"
FORMAT = "lmforge-shards-v1"
SPLITS = ("train", "valid")  # what preprocess writes (a merge keeps the splits of its inputs)
MAX_EXAMPLES = 5  # example locations kept per skip reason
# The lists of removed documents a preprocess output holds: directory -> the skip reasons it lists.
LISTS = {"filtered": "filter-", "duplicates": "duplicate-"}


class ManifestError(InputError):
    """A manifest that is missing, malformed, or names shards that are not there."""


def manifest_path(path_or_dir: str | os.PathLike) -> Path:
    """``DIR/manifest.json`` for an output directory, else the path itself."""
    p = Path(path_or_dir)
    return p / MANIFEST_NAME if p.is_dir() else p


# --------------------------------------------------------------------------------------------------
# Reading


def load_manifest(path_or_dir: str | os.PathLike) -> dict:
    """Read and sanity-check ``manifest.json`` (given the file or the output directory)."""
    p = manifest_path(path_or_dir)
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{p}: no manifest (did preprocess finish?)") from None
    except ValueError as e:  # the message names the line and column
        raise ManifestError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ManifestError(f"{p}: format {found!r}, expected {FORMAT!r}")
    for key in ("tokenizer", "splits"):
        if key not in m:
            raise ManifestError(f"{p}: missing {key!r}")
    if not isinstance(m["splits"], dict):
        raise ManifestError(f"{p}: no 'splits' object")
    return m


def shard_prefixes(path_or_dir: str | os.PathLike, split: str = "train") -> list[str]:
    """Absolute shard prefixes of ``split`` in order (empty when the split has no shards). Every prefix
    must have its ``.idx`` and ``.bin``: a manifest naming missing files is an incomplete copy."""
    p = manifest_path(path_or_dir)
    splits = load_manifest(p)["splits"]
    if split not in splits:
        raise ManifestError(f"{p}: no split {split!r}; it has {', '.join(sorted(splits)) or 'none'}")
    prefixes = []
    for i, shard in enumerate(splits[split]):
        if not isinstance(shard, dict) or "prefix" not in shard:
            raise ManifestError(f"{p}: splits.{split}[{i}] has no 'prefix'")
        prefix = os.path.abspath(p.parent / shard["prefix"])
        if not exists(prefix):
            raise ManifestError(f"{p}: splits.{split}[{i}]: {prefix}.idx/.bin missing (incomplete copy?)")
        prefixes.append(prefix)
    return prefixes


def split_totals(splits: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Shards, documents and tokens of each split, e.g. ``split_totals(load_manifest(d)["splits"])``."""
    return {
        split: {
            "shards": len(shards),
            "documents": sum(sh["documents"] for sh in shards),
            "tokens": sum(sh["tokens"] for sh in shards),
        }
        for split, shards in splits.items()
    }


def shard_files(root: str | os.PathLike, shard: dict) -> list[tuple[Path, str]]:
    """The shard's two files under ``root`` with the sha256 the manifest records for each."""
    base = Path(root) / shard["prefix"]
    return [(Path(f"{base}.bin"), shard["sha256_bin"]), (Path(f"{base}.idx"), shard["sha256_idx"])]


# --------------------------------------------------------------------------------------------------
# Writing


def shard_entry(root: str | os.PathLike, prefix: str) -> dict:
    """The manifest's record of the finished shard ``root/prefix``: counts read back from its index,
    checksums of both files."""
    base = Path(root) / prefix
    ds = IndexedDataset(base)
    return {
        "prefix": prefix,
        "documents": ds.num_documents,
        "sequences": len(ds),
        "tokens": ds.num_tokens,
        "sha256_bin": sha256_file(f"{base}.bin"),
        "sha256_idx": sha256_file(f"{base}.idx"),
    }


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    """``root/manifest.json``, atomically (a reader sees the old manifest or the new one, whole)."""
    atomic_write_json(Path(root) / MANIFEST_NAME, manifest, indent=1)


def _add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    for key, n in counts.items():
        total[key] = total.get(key, 0) + n


def line_bases(unit_records: list[dict]) -> dict[int, int]:
    """Unit -> the lines to add to its range-relative line numbers (a byte-range unit that counts from its
    range start: the line counts of the same file's earlier ranges); units counting file lines are absent.
    ``unit_records``: records (or ``writer.line_info``) of all units, in any order."""
    base: dict[int, int] = {}
    run: dict[int, int] = {}
    for rec in sorted(unit_records, key=lambda r: r["unit"]):
        segs = rec["segments"]
        if len(segs) != 1 or segs[0][2] < 0:
            continue
        src = segs[0][0]
        b = run.get(src, 0) if rec["relative_lines"] else 0
        if b:
            base[rec["unit"]] = b
        run[src] = b + rec["range_lines"]
    return base


def _absolute_examples(unit_records: list[dict]) -> None:
    """Rewrite the range-relative ``file:line`` examples of byte-range units to file lines, adding the
    line counts of the same file's earlier ranges."""
    base = line_bases(unit_records)
    for rec in unit_records:
        b = base.get(rec["unit"], 0)
        if b:
            for why, locs in rec["skip_examples"].items():
                rec["skip_examples"][why] = [f"{p}:{b + int(n)}" for p, _, n in (loc.rpartition(":") for loc in locs)]


def _removed_lists(unit_records: list[dict]) -> dict[str, list[dict]]:
    """The files that list every removed document, with how many each lists: ``filtered/unit_NNNNN.tsv``
    (quality rules, ``--min-tokens``) and ``duplicates/unit_NNNNN.tsv`` (``--dedup``), per unit that
    removed any."""
    lists: dict[str, list[dict]] = {}
    for rec in unit_records:
        for name, prefix in LISTS.items():
            n = sum(v for why, v in rec["skipped"].items() if why.startswith(prefix))
            if n:
                lists.setdefault(name, []).append({"file": f"{name}/unit_{rec['unit']:05d}.tsv", "documents": n})
    return lists


def assemble(config: dict, unit_records: list[dict], tokenizer_path: str,
             tokenizer_file: str = "tokenizer.model", eod: dict | None = None) -> dict:
    """The manifest of a preprocess run from its configuration and the records of all its units (any
    order: listed by unit, which is what makes the output independent of ranks and workers)."""
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    dups: dict[str, list[dict]] = {}  # duplicate examples with the document each duplicates
    read = written = 0
    unit_records = sorted(unit_records, key=lambda r: r["unit"])
    _absolute_examples(unit_records)
    for rec in unit_records:
        for s in SPLITS:
            splits[s].extend(rec["shards"][s])
        read += rec["records_read"]
        written += rec["documents_written"]
        _add_counts(skipped, rec["skipped"])
        for why in rec["skipped"]:
            ex = examples.setdefault(why, [])
            taken = rec["skip_examples"][why][: MAX_EXAMPLES - len(ex)]
            kept = rec.get("duplicate_of", {}).get(why)
            if kept:
                dups.setdefault(why, []).extend({"loc": loc, "kept": k} for loc, k in zip(taken, kept))
            ex.extend(taken)
    lists = _removed_lists(unit_records)
    dedup = None
    if config["settings"].get("dedup"):
        dedup = {"streamed_exact_only": sum(rec.get("streamed_candidates", 0) for rec in unit_records)}
    return {
        "format": FORMAT,
        "tokenizer": {**config["tokenizer"], "file": tokenizer_file, "source_path": str(tokenizer_path),
                      **(eod or {})},
        "dtype": config["dtype"],
        "fingerprint_method": config["fingerprint_method"],
        "splits": splits,
        "totals": split_totals(splits),
        "records": {"read": read, "written": written, "skipped": sum(skipped.values())},
        "skipped": dict(sorted(skipped.items())),
        "skip_examples": dict(sorted(examples.items())),
        **({"duplicate_examples": dict(sorted(dups.items()))} if dups else {}),
        **({"removed_lists": lists} if lists else {}),
        **({"dedup": dedup} if dedup is not None else {}),
        "sources": config["sources"],
        "settings": config["settings"],
        "config_sha256": sha256_json(config),
    }


def assemble_merged(inputs: list[tuple[str, dict]], splits: dict[str, list[dict]]) -> dict:
    """The manifest of ``merge``: ``inputs`` are (path as given, manifest) in merge order, ``splits``
    their shards under the merged output's prefixes."""
    ref = inputs[0][1]
    skipped: dict[str, int] = {}
    records = {"read": 0, "written": 0, "skipped": 0}
    for _, m in inputs:
        _add_counts(skipped, m.get("skipped", {}))
        _add_counts(records, {key: m.get("records", {}).get(key, 0) for key in records})
    return {
        "format": ref["format"],
        "tokenizer": ref["tokenizer"],
        "dtype": ref.get("dtype"),
        "splits": splits,
        "totals": split_totals(splits),
        "records": records,
        "skipped": dict(sorted(skipped.items())),
        "skip_examples": {},
        "sources": [src for _, m in inputs for src in m.get("sources", [])],
        "settings": {"merged_from": [p for p, _ in inputs]},
        "merged_from": [{"path": p, "config_sha256": m.get("config_sha256")} for p, m in inputs],
        "config_sha256": sha256_json([m.get("config_sha256") for _, m in inputs]),
    }

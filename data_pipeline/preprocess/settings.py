"""What a preprocess run is asked to do: ``Settings`` (everything the output bytes depend on), ``RunOptions``
(how to run: never changes the output) and ``PipelineError`` (a condition that stops the run)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from lmforge.common.errors import InputError

from ..readers import ReadOptions


class PipelineError(InputError):
    """A condition that stops the run with a clear message (bad input in fail mode, changed inputs)."""


# The meaning of the dedup resume state (unit records and signature files of a run with --dedup), in their
# stamps' versions: 2 = documents streamed in pieces (over --max-doc-bytes) are exact-dedup candidates, numbered
# among the others. State of version 1 (none recorded) did not number them and wrote a streamed duplicate.
DEDUP_STATE_VERSION = 2
VERSIONS_KEY = "versions"
_VERSION_NAMES = {  # how a difference is named: what differs, and why it matters
    "dedup_state": ("dedup state version", ": documents streamed over --max-doc-bytes are exact-dedup candidates "
                                           "since version 2"),
    "filters": ("filter rules version", ""),
    "minhash": ("MinHash algorithm", ""),
}


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output bytes (worker and rank counts deliberately excluded).

    Recorded in ``.state/config.json`` and the manifest: a rerun with other settings is refused instead of
    mixing shards of two configurations."""

    text_key: str = "text"
    format: str = "auto"
    strip_gutenberg: bool = False
    keep_empty: bool = False
    max_doc_bytes: int = 8 << 20
    max_line_bytes: int = 64 << 20
    titles: bool = True  # --no-titles: wikidoc and mediawiki documents without their title line
    append_eod: bool = True
    eod_token: str | None = None  # --eod-token: the end-of-document token, instead of the tokenizer's choice
    valid_fraction: float = 0.01
    max_shard_bytes: int = 1 << 30
    unit_bytes: int = 64 << 20
    filters: tuple[str, ...] = ()  # quality rules (quality.py), off by default
    min_tokens: int = 0  # documents with fewer tokens are skipped (filter-min_tokens); 0 = off
    dedup: tuple[str, ...] = ()  # "exact" and/or "minhash" (dedup.py), off by default
    minhash_ngram: int = 5  # word n-grams (shingles) for --dedup minhash
    minhash_bands: int = 14  # LSH bands x rows = MinHash values per document (FineWeb's 14 x 8)
    minhash_rows: int = 8

    def stamp(self) -> dict:
        """The settings as recorded in every piece of resume state (unit records, signature files), with the
        versions of what that state means beyond them (``versions``)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        d[VERSIONS_KEY] = self.versions()
        return d

    def versions(self) -> dict:
        """What the resume state depends on beyond the settings: the meaning of dedup state
        (``DEDUP_STATE_VERSION``), the filter rules' version and the MinHash algorithm (also in the config)."""
        from . import quality

        v: dict = {}
        if self.dedup:
            v["dedup_state"] = DEDUP_STATE_VERSION
        if self.filters:
            v["filters"] = quality.VERSION
        if "minhash" in self.dedup:
            v["minhash"] = algorithm_record(self)
        return v

    def differences(self, stamp: dict | None) -> list[str]:
        """The settings (``--option`` names) and versions in which ``stamp`` differs from these ones, each with
        its old and new value; ``["(none recorded)"]`` for state written before stamps existed. A setting
        missing from ``stamp`` is its default: state written before the setting existed was made the way its
        default makes it (``--no-titles`` came later: such state is reused when titles are kept)."""
        if stamp is None:
            return ["(none recorded)"]
        mine, default = self.stamp(), _DEFAULT_STAMP
        old = {k: stamp.get(k, default[k]) for k in mine if k != VERSIONS_KEY}
        out = [f"--{k.replace('_', '-')} {old[k]!r} -> {mine[k]!r}" for k in old if old[k] != mine[k]]
        versions = stamp.get(VERSIONS_KEY) or {}
        for k, v in mine[VERSIONS_KEY].items():
            if versions.get(k) != v:
                name, why = _VERSION_NAMES[k]
                out.append(f"{name} {repr(versions[k]) if k in versions else 'none'} -> {v!r}{why}")
        return out

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            text_key=self.text_key,
            strip_gutenberg=self.strip_gutenberg,
            keep_empty=self.keep_empty,
            max_doc_bytes=self.max_doc_bytes,
            max_line_bytes=self.max_line_bytes,
            titles=self.titles,
        )


# What a setting missing from an old stamp was (``Settings.differences``): its default, as stamped.
_DEFAULT_STAMP = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(Settings)}


@dataclass
class RunOptions:
    """How to run (does not change the output)."""

    workers: int = max(1, os.cpu_count() or 1)
    threads_per_worker: int = 1
    batch_chars: int = 1 << 20
    on_error: str = "skip"
    overwrite: bool = False
    progress: bool = True
    fingerprint: str = "sampled"  # or "full": sha256 of every input file (recorded in the manifest)
    backend: str = "auto"  # tokenizer workers: "thread", "process" or "auto" (see encode.resolve_backend)
    # --wiki-index: the indexes of the MediaWiki .xml.bz2 dumps among the inputs, in input order
    # (readers.expand_inputs). Not a setting: an index decides where a dump's units are cut, never the documents,
    # and is recorded with its dump in the sources (and its fingerprint), like an index found beside the dump.
    wiki_indexes: tuple[str, ...] = ()


# What the near-duplicate decisions depend on beyond the settings (here, not in dedup.py, because every stamp
# of resume state records it and dedup.py imports this module).
MINHASH_SEED = 1
MAX_ROUNDS = 4  # near-duplicate verification rounds (the members left after them are kept)


def jaccard_bound(settings: Settings) -> float:
    """The true Jaccard similarity a near duplicate must have with the document kept for it: the 50%
    point (1/bands)^(1/rows) of the LSH settings, i.e. the ``--minhash-threshold`` they were chosen for
    (0.719 for the default 14 x 8)."""
    return (1.0 / settings.minhash_bands) ** (1.0 / settings.minhash_rows)


def minhash_version() -> int:
    import rensa

    return int(rensa.RMinHash.ALGORITHM_VERSION)


def algorithm_record(settings: Settings) -> str:
    """What the near-duplicate decisions depend on beyond the settings, as recorded with them."""
    from . import quality

    return (f"rensa.RMinHash v{minhash_version()} seed {MINHASH_SEED}; shingle words v{quality.VERSION}; "
            f"removed at true Jaccard >= {jaccard_bound(settings):.4f} with the kept document, "
            f"{MAX_ROUNDS} rounds")

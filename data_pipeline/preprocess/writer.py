"""One unit's output: ``UnitWriter`` turns its tokenized documents into shards and a ``UnitRecord``, and the
resume state of finished units lives here too.

A shard is closed when the next document would push it past ``--max-shard-bytes``, so every shard's
bytes depend only on the unit's documents and the tokenizer. The train/valid split is by a hash of each
document's text (``--valid-fraction``). A document streamed in pieces that turns out bad after some
pieces were written is rolled back from its shard: a document is written whole or not at all.

Resume: a finished unit writes ``.state/unit_NNNNN.json`` (its record) atomically after its shards are
renamed into place. A rerun keeps a recorded unit whose shards all still match their checksums and
redoes any other unit from scratch, so kill -9 at any moment loses at most the units in flight.

Every document a quality rule (or ``--min-tokens``) removed is listed in ``OUT/filtered/unit_NNNNN.tsv``,
one ``reason<TAB>file:line<TAB>detail`` line each in input order (the detail: what the rule measured,
``quality.judge``), as ``OUT/duplicates/`` lists the duplicates. A finished unit first writes its list to
``.state/filtered/`` (atomically, its sha256 in the unit's record, so a resumed run trusts it only
intact); at the end of the run every rank writes the final lists of its units (``write_filtered_lists``):
a byte-range unit counts lines from its range start, and only then are the earlier ranges' line counts
known to make them file lines. The lists are the same bytes for any number of workers and ranks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmforge.common.files import atomic_write_bytes, atomic_write_json, remove_temp_files, sha256_file

from ..indexed_dataset import IndexedDatasetWriter
from ..manifest import MAX_EXAMPLES, SPLITS, line_bases, shard_entry, shard_files
from ..readers import DOC, LAST
from .plan import Segment, shard_prefix, unit_shard_glob
from .settings import Settings

FILTERED_DIR = "filtered"  # OUT/filtered/unit_NNNNN.tsv: every document a filter removed, and why
FILTER_PREFIX = "filter-"  # the skip reasons of filters (quality rules, --min-tokens)


def doc_hash(text: bytes) -> int:
    """64-bit hash of a whole document's UTF-8 bytes: it picks the document's split."""
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


@dataclass
class UnitRecord:
    """What a finished unit wrote and read: its shards' manifest entries and its record accounting."""

    unit: int
    segments: list[Segment]
    shards: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    records_read: int = 0
    documents_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    # For duplicates (dedup): the kept document's location of each example, in the same order.
    duplicate_of: dict[str, list[str]] = field(default_factory=dict)
    # For a byte-range unit: the lines it owned, and whether its example line numbers count from the
    # range start (made absolute in the manifest).
    range_lines: int = 0
    relative_lines: bool = False
    # sha256 of the unit's list of filtered documents in .state/filtered/ ("" when it removed none).
    filtered_sha256: str = ""
    # Documents read from each input file of the unit (source index as a string -> count), before the
    # token-count filter: a file that yields none is named in a warning.
    documents_by_source: dict[str, int] = field(default_factory=dict)
    # With --dedup: documents streamed in pieces (longer than --max-doc-bytes) that were deduplication
    # candidates by their exact key only, never MinHash ones (the manifest's dedup.streamed_exact_only).
    streamed_candidates: int = 0


class UnitWriter:
    """Writes one unit's documents, in order, into its shards ``{split}/shard_{unit}_{part}``."""

    def __init__(self, out: Path, unit: int, segments: list[Segment], settings: Settings, dtype, eod: int):
        self.out, self.settings, self.dtype = out, settings, np.dtype(dtype)
        self.rec = UnitRecord(unit, segments)
        self.writers: dict[str, IndexedDatasetWriter | None] = {s: None for s in SPLITS}
        self.parts = {s: 0 for s in SPLITS}
        self.eod = np.asarray([eod], dtype=self.dtype)
        # Fraction of the 64-bit hash space that goes to valid.
        self.valid_threshold = int(settings.valid_fraction * (1 << 64))
        self.doc_writer: IndexedDatasetWriter | None = None  # holds the streamed document in progress
        self.tokens = 0
        self.filtered: list[str] = []  # the lines of the unit's list of filtered documents

    def skip(self, reason: str, loc: str, kept: str = "") -> None:
        """A record not written, counted by ``reason``; ``kept`` is the document it duplicates, if any, or
        for a filter's removal (``filter-...``) what the filter measured."""
        if self.doc_writer is not None:
            # A SKIP instead of the LAST piece: the streamed document is abandoned; drop its pieces.
            self.tokens -= self.doc_writer.drop_open_document()
            self.doc_writer = None
        self.rec.records_read += 1
        self.rec.skipped[reason] = self.rec.skipped.get(reason, 0) + 1
        filtered = reason.startswith(FILTER_PREFIX)
        if filtered:
            self.filtered.append(f"{reason}\t{loc}\t{kept}\n")
        ex = self.rec.skip_examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(loc)
            if kept and not filtered:
                self.rec.duplicate_of.setdefault(reason, []).append(kept)

    def _split(self, text_hash: int) -> str:
        return "valid" if text_hash < self.valid_threshold else "train"

    def _writer(self, split: str, incoming_bytes: int) -> IndexedDatasetWriter:
        w = self.writers[split]
        if w is not None and w.num_documents and w.bytes_written() + incoming_bytes > self.settings.max_shard_bytes:
            self._close(split)
            w = None
        if w is None:
            prefix = self.out / shard_prefix(split, self.rec.unit, self.parts[split])
            w = self.writers[split] = IndexedDatasetWriter(prefix, self.dtype)
        return w

    def _close(self, split: str) -> None:
        w = self.writers[split]
        if w is None:
            return
        self.writers[split] = None
        if w.num_documents == 0:  # only held a rolled-back document
            w.abort()
            return
        w.finalize()
        prefix = shard_prefix(split, self.rec.unit, self.parts[split])
        self.rec.shards[split].append(shard_entry(self.out, prefix))
        self.parts[split] += 1

    def add(self, kind: int, tokens: np.ndarray, text_hash: int) -> None:
        """A DOC, or a PART/LAST piece of a streamed document; ``text_hash`` (of the whole document)
        picks the split."""
        eod = self.settings.append_eod
        if kind == DOC:
            if eod and len(tokens):
                tokens = np.concatenate((tokens, self.eod))
            w = self._writer(self._split(text_hash), tokens.nbytes)
            w.add_document(tokens)
            self.rec.records_read += 1
            self.rec.documents_written += 1
            self.tokens += len(tokens)
            return
        # A document streamed in pieces: all pieces go to one shard as consecutive sequences of one
        # document; the split (and the shard) is decided at the first piece, by its hash.
        w = self.doc_writer
        if w is None:
            w = self.doc_writer = self._writer(self._split(text_hash), tokens.nbytes)
        if kind == LAST and eod and (len(tokens) or w.open_document_tokens):
            tokens = np.concatenate((tokens, self.eod))
        if len(tokens):
            w.add_sequence(tokens)
        self.tokens += len(tokens)
        if kind == LAST:
            w.end_document()
            self.rec.records_read += 1
            self.rec.documents_written += 1
            self.doc_writer = None

    def finish(self) -> UnitRecord:
        if self.doc_writer is not None:
            raise RuntimeError(f"unit {self.rec.unit} ended inside a streamed document (a reader bug)")
        for split in SPLITS:
            self._close(split)
        state = filtered_state_path(self.out, self.rec.unit)
        if self.filtered:
            data = "".join(self.filtered).encode("utf-8")
            atomic_write_bytes(state, data)
            self.rec.filtered_sha256 = hashlib.sha256(data).hexdigest()
        else:
            state.unlink(missing_ok=True)
        return self.rec

    def abort(self) -> None:
        for w in self.writers.values():
            if w is not None:
                w.abort()


# --------------------------------------------------------------------------------------------------
# Resume state of finished units


def state_path(out: Path, unit: int) -> Path:
    return out / ".state" / f"unit_{unit:05d}.json"


def filtered_state_path(out: Path, unit: int) -> Path:
    """A finished unit's list of filtered documents, its byte-range locations not yet made file lines."""
    return out / ".state" / FILTERED_DIR / f"unit_{unit:05d}.tsv"


def filtered_list_path(out: Path, unit: int) -> Path:
    """Every document of a unit a filter removed: ``reason<TAB>file:line<TAB>detail`` lines."""
    return out / FILTERED_DIR / f"unit_{unit:05d}.tsv"


SETTINGS_KEY = "settings"  # the settings that made a unit record (not part of the record itself)


def save_done_unit(out: Path, rec: UnitRecord, settings: Settings) -> dict:
    """Record a finished unit (its shards are already in place), stamped with the settings that made it;
    returns the record as saved (without the stamp)."""
    saved = asdict(rec)
    atomic_write_json(state_path(out, rec.unit), {**saved, SETTINGS_KEY: settings.stamp()}, indent=1)
    return saved


def load_done_unit(out: Path, unit: int, settings: Settings, log=None,
                   segments: list[Segment] | None = None) -> dict | None:
    """A recorded unit made with these ``settings`` (and, when given, of these ``segments``) whose shards all
    exist and match their checksums, else None (then it is done again). A record made with other settings
    is rejected with a line naming them (``log``): a kill during ``--overwrite`` or a hand-copied ``.state``
    must not mix two configurations; one of other segments (a plan made by another version) likewise."""
    p = state_path(out, unit)
    if not p.exists():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    differs = settings.differences(rec.pop(SETTINGS_KEY, None))
    if differs:
        if log is not None:
            log(f"{p}: made with other settings ({'; '.join(differs)}): not reused, the unit is done again")
        return None
    if segments is not None and rec.get("segments") != [list(seg) for seg in segments]:
        if log is not None:
            log(f"{p}: made for other input segments ({rec.get('segments')} -> {[list(g) for g in segments]}): "
                "not reused, the unit is done again")
        return None
    for split in SPLITS:
        for sh in rec["shards"][split]:
            for f, sha in shard_files(out, sh):
                if not f.exists() or sha256_file(f) != sha:
                    return None
    listed = rec.get("filtered_sha256", "")
    if listed:
        f = filtered_state_path(out, unit)
        if not f.exists() or sha256_file(f) != listed:
            return None
    return rec


def clean_unit(out: Path, unit: int) -> None:
    """Remove finished or temporary shard files of an unfinished unit (left by a killed run)."""
    for split in SPLITS:
        for f in (out / split).glob(unit_shard_glob(unit)):
            f.unlink()
    remove_temp_files(out / ".state", state_path(out, unit).name)
    remove_temp_files(filtered_state_path(out, unit).parent, filtered_state_path(out, unit).name)


def line_info(rec: dict) -> dict:
    """What ``manifest.line_bases`` needs of a unit record (every rank shares it with every other)."""
    return {k: rec[k] for k in ("unit", "segments", "range_lines", "relative_lines")}


def write_filtered_lists(out: Path, records: list[dict], every_unit: list[dict]) -> None:
    """``OUT/filtered/unit_NNNNN.tsv`` of this rank's finished units (``records``) from their lists in
    ``.state/filtered/``, with file lines (``every_unit``: ``line_info`` of all units of the run); a unit
    that removed nothing has none. Rewritten on every run: the same bytes each time."""
    base = line_bases(every_unit)
    mine = {rec["unit"] for rec in records}
    for f in (out / FILTERED_DIR).glob(".unit_*.tsv.tmp.*"):  # a killed run's, of this rank's units only
        if int(f.name.split(".")[1][5:]) in mine:
            f.unlink(missing_ok=True)
    for rec in records:
        u = rec["unit"]
        final = filtered_list_path(out, u)
        if not rec.get("filtered_sha256"):
            final.unlink(missing_ok=True)
            continue
        data = filtered_state_path(out, u).read_bytes()
        b = base.get(u, 0)
        if b:
            rows = []
            for row in data.decode("utf-8").splitlines(keepends=True):
                why, loc, rest = row.split("\t", 2)
                path, _, line = loc.rpartition(":")
                rows.append(f"{why}\t{path}:{b + int(line)}\t{rest}")
            data = "".join(rows).encode("utf-8")
        atomic_write_bytes(final, data)

"""Document deduplication (``preprocess --dedup exact|minhash|exact,minhash``), deterministic across
inputs, workers and MPI ranks: of each set of duplicates the first document in input order is kept.

Two passes. The tokenizing pass must know, when it reaches a document, whether an earlier document in
*any* unit duplicates it, so a scan comes first:

1. **Scan** (per unit, resumable): every *candidate* - a whole document (``DOC``) that passed the
   ``--filter`` rules, or a document streamed in pieces that arrived whole (its ``LAST`` piece) - gets a
   signature, written with its location to ``.state/dedup/unit_NNNNN.npz`` (atomically; zip CRCs catch a
   damaged file, which is then scanned again; the file names the unit's segments and the scan's version,
   and one made for others is scanned again). A document's id is ``unit << 32 | k`` for the k-th candidate
   of its unit, so ids sort in input order. Ranks scan the units they will tokenize, so no rank needs
   another's files (no shared filesystem is assumed); units are scanned in parallel by ``--workers``
   processes (whole units each when there are enough, else a unit's sources, or the batches of a
   one-source unit while this process reads it).
2. **Exchange** (MPI collectives, only keys and ids, never texts): signatures are partitioned by key
   over the ranks (``alltoall``); each rank groups equal keys and emits an edge from every member of a
   group to its smallest id; the ranks join the edges into clusters together (``_connected_components``:
   min-label hooking with pointer jumping over ``alltoall`` rounds, numpy throughout, each rank holding its
   share of the documents and edges; no rank gathers the graph) and every non-smallest member of a cluster
   is a duplicate of the smallest, which is kept. Each rank receives its units' duplicates (``alltoall``).
   MinHash's LSH edges are grouped the same way, in rounds, for the Jaccard check (``_verified_near``):
   near duplicates are first checked by their true Jaccard similarity with the kept document (below).
3. The tokenizing pass skips them with the reason ``duplicate-exact`` or ``duplicate-near``; the
   manifest's ``duplicate_examples`` give a few duplicates' ``file:line`` with the kept document's, and
   ``OUT/duplicates/unit_NNNNN.tsv`` lists every one (``reason<TAB>file:line<TAB>kept file:line<TAB>
   Jaccard``, the true Jaccard measured, 1.0000 for exact ones), written by the rank that holds the unit.

**exact**: documents are equal after Unicode NFC normalisation, with whitespace runs collapsed to one
space and leading/trailing whitespace removed (case and punctuation count); the key is a 128-bit BLAKE2b
of the normalised UTF-8 (a chance collision among 10^12 documents has probability ~10^-15).

**minhash**: the Jaccard similarity of the documents' sets of word n-grams (shingles) is estimated with
MinHash (``rensa``'s ``RMinHash``, a maintained Rust implementation; ``ALGORITHM_VERSION`` and the seed
are recorded in the settings) and candidates are found by locality-sensitive hashing: the ``perm =
bands x rows`` MinHash values are cut into ``bands`` bands of ``rows`` values; two documents sharing
all values of any band are duplicates. Words are taken after NFC normalisation and lower-casing, as in
the quality rules (``quality.words``): whitespace-separated runs, except that each Han or kana character
is a word with the punctuation around it (so Chinese is shingled by characters, not as one "word"). A
document of fewer than n words is one shingle.
The probability that two documents of Jaccard similarity s are found is 1 - (1 - s^rows)^bands; the
default 14 bands x 8 rows over 5-grams (FineWeb's) has its 50% point at s = (1/14)^(1/8) = 0.72:

    s      0.3      0.5     0.6    0.7    0.75   0.8    0.85   0.9    0.95
    P   0.0009   0.053   0.21   0.56   0.75   0.92   0.99   0.9996  1.0

``--minhash-threshold T`` picks the bands x rows (within ``--minhash-perm``, default 112) whose 50%
point is closest to T.

**The Jaccard check** (``_verified_near``). LSH only proposes: template stubs share most 5-grams ("X
is a railway station of Hainan western ring railway located in Hainan, China.": Jaccard 0.58) and
collide in some band with probability 0.2-0.5 per pair, and LSH groups are transitive (A~B and B~C put
C with A however far apart they are), so without a check dozens of different articles became
"duplicates" of one. So every proposed removal is checked against the document kept for it, by the true
Jaccard similarity of the same shingle sets (``shingle_hashes``: 64-bit hashes, exact up to hash
collisions), and made only at ``jaccard_bound`` or more: the 50% point of the bands x rows, i.e. the
threshold they were chosen for (0.719 by default; the list records the value measured). The groups come
from the LSH edges (documents that share a band with the same smallest document are in its *star*; stars
sharing a document are one group); the first document of a group is kept and each other member is
removed if near it. The members left (not near it, however near some other member) are grouped again
among themselves, with their own first document kept, for up to ``MAX_ROUNDS`` rounds;
whatever is left then is kept. So a document is removed only if it is near the document named as kept
for it, and A~B~C never removes C for A unless C is near A. On the shared Wikipedia (13 MB) LSH proposed
98 removals, 60 of them below 0.719 (down to 0.45; 18 one-line surname stubs were "duplicates" of one);
38 are removed, all at >= 0.724.

The texts are *re-read* for the check, not stored: each rank re-reads, from its own units, just the
clustered candidates it holds, found by the location the scan recorded (the segments holding one are
read up to the last one wanted, without the quality rules, a unit per worker process), and keeps their
shingle sets in memory (8 bytes per shingle of the clustered documents only); a rank that needs a kept
document's set for its members gets it from the rank holding it (``alltoall``, arrays only), measures
the similarities and decides its members' removals. No rank gathers the edges or the pairs: each star is
held by one rank (by its centre's hash, ``_home``), each round's groups are the connected components of
the stars' alive members (``_connected_components``), each member's pair goes to the rank holding the
member, and whether a document is still in the running is asked of the rank holding it (``_near_rounds``).
Storing every candidate's shingle hashes in the scan instead would cost ~1.3x the corpus in ``.state``
for the few documents that cluster; re-reading costs a second read of the units holding them: on the
shared Wikipedia (2 workers) 0.13-0.18 s against the scan's 0.50-0.56 s (``benchmarks/dedup_quality.py
--cost``). Everything is decided from the edges (the same for any number of ranks) and the measured
similarities, so the result stays independent of workers and ranks.

``exact,minhash`` removes exact duplicates first (reason ``duplicate-exact``), then near duplicates
among the rest. Documents removed by ``--filter`` are never candidates; ``--min-tokens`` is applied after
deduplication.

**Streamed documents** (longer than ``--max-doc-bytes``, read in pieces and never held whole) are exact
candidates only: ``ExactKeyStream`` computes ``exact_key`` over the pieces as they stream past (equal to
the key of the whole text: the pieces are cut for normalisation only before ASCII whitespace, where NFC
of the parts is the NFC of the whole and a word cannot straddle the cut), so a long book and its copy
(or the same text held whole, e.g. one JSON record) are exact duplicates. They get no MinHash
signature (shingling tens of MB for LSH would hold the document's shingles; the near-duplicate check
would re-read it whole) and are never near-duplicate candidates: the manifest counts them
(``dedup.streamed_exact_only``). A streamed candidate is numbered when its last piece arrives, in both
passes; one that turns bad before it (a ``SKIP`` instead of ``LAST``) is no candidate. The tokenizing pass
knows at the first piece whether the document is a duplicate (it is the next number) and then writes none
of its pieces.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import time
import unicodedata
import zipfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.common.files import atomic_write_bytes

from ..readers import DOC, LAST, SKIP, ReadRange, Source, StreamPool, iter_documents, uses_stream_pool
from . import quality
from .plan import Segment
from .settings import (  # noqa: F401 (algorithm_record, minhash_version: used as dedup.*)
    MAX_ROUNDS,
    MINHASH_SEED,
    PipelineError,
    Settings,
    algorithm_record,
    jaccard_bound,
    minhash_version,
)
from .writer import doc_hash

MODES = ("exact", "minhash")
REASONS = {"exact": "duplicate-exact", "minhash": "duplicate-near"}
DEFAULT_PERM = 112
DEFAULT_THRESHOLD = 0.72
LIST_DIR = "duplicates"  # OUT/duplicates/unit_NNNNN.tsv: every removed duplicate and what it duplicates
SCAN_VERSION = 2  # of the signature files: 2 numbers streamed documents as candidates
_SIG_BATCH = 512  # documents per signature batch, at most
_SIG_BATCH_CHARS = 1 << 20  # characters per signature batch, at most (bounds the memory of a batch of books)


# --------------------------------------------------------------------------------------------------
# What a document is (shared with the tokenizing pass, which must count candidates identically)


def screen(kind: int, text: str, loc: str, filters: tuple[str, ...], hashed: bool = True
           ) -> tuple[int, str, int | str]:
    """An item as the pipeline treats it: ``(kind, text or skip reason, hash of the whole document)``.
    A document with unencodable text (lone surrogates from a JSON escape) or removed by a quality rule
    becomes a ``SKIP``; for a quality rule's, the last field is what the rule measured (``quality.judge``),
    else 0. Every ``DOC`` that comes out is a deduplication candidate. ``hashed=False``: the same verdicts
    without the hash (0), for the scan."""
    if kind == SKIP:
        return kind, text, 0
    try:
        raw = text.encode("utf-8")
        h = doc_hash(raw) if hashed else 0
    except UnicodeEncodeError:
        if kind != DOC:  # part of a streamed document: cannot drop just a piece
            raise PipelineError(f"{loc}: unencodable text inside a streamed document") from None
        return SKIP, "unencodable_text", 0
    if kind == DOC and filters:
        verdict = quality.judge(text, filters)
        if verdict is not None:
            return SKIP, verdict.reason, verdict.detail
    return kind, text, h


def parse_modes(spec: str) -> tuple[str, ...]:
    """``"exact"``, ``"minhash"`` or ``"exact,minhash"`` (any order; applied exact first) -> modes."""
    modes = {m.strip() for m in spec.split(",") if m.strip()}
    bad = modes - set(MODES)
    if bad:
        raise ValueError(f"unknown mode(s) {', '.join(sorted(bad))}; choose from {', '.join(MODES)}")
    return tuple(m for m in MODES if m in modes)


def normalize_exact(text: str) -> str:
    """NFC, whitespace runs -> one space, stripped: what "equal" means for ``--dedup exact``."""
    if not text.isascii():  # (ASCII is its own NFC)
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalize_exact(text).encode("utf-8"), digest_size=16).digest()


_CUT_SPACES = " \t\n\r\x0b\x0c"  # ASCII whitespace: NFC never joins across one, and it ends a word


class ExactKeyStream:
    """``exact_key`` of a text given in consecutive pieces (any cut), never holding the whole: each piece is
    normalised up to its last ASCII whitespace character and hashed, the rest carried to the next one. At
    such a cut NFC of the parts is NFC of the whole (an ASCII character has combining class 0 and composes
    with nothing before it), and the words either side are separate words, one space apart; so
    ``digest()`` equals ``exact_key`` of the concatenated pieces (``tests/data_pipeline/test_streamed_dedup.py``:
    random cuts through whitespace runs, combining marks and Hangul jamo)."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self._carry = ""
        self._words = False  # a word was hashed: the next one is preceded by a space

    def update(self, piece: str) -> None:
        buf = self._carry + piece if self._carry else piece
        cut = max(buf.rfind(c) for c in _CUT_SPACES)
        if cut <= 0:  # no cut before a whitespace character yet (or it is the first one): keep it all
            self._carry = buf
            return
        self._carry = buf[cut:]
        self._add(buf[:cut])

    def _add(self, text: str) -> None:
        words = normalize_exact(text)
        if words:
            self._hash.update(((" " if self._words else "") + words).encode("utf-8"))
            self._words = True

    def digest(self) -> bytes:
        self._add(self._carry)
        self._carry = ""
        return self._hash.digest()


def shingles(text: str, n: int) -> list[str]:
    """The word n-grams of ``text`` (NFC, lower case, CJK characters as words); at least one."""
    w = quality.words(unicodedata.normalize("NFC", text).lower())
    if len(w) <= n:
        return [" ".join(w)]
    return [" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]


_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection of the 64-bit integers


def _h64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """The set of ``shingles(text, n)`` as sorted unique 64-bit hashes (uint64), the exact set up to hash
    collisions (for two documents of 10^6 shingles each, a spurious match has probability ~10^-7): each
    distinct word is hashed once (BLAKE2b), an n-gram is the polynomial of its words' hashes."""
    w = quality.words(unicodedata.normalize("NFC", text).lower())
    if len(w) <= n:
        return np.array([_h64(" ".join(w))], np.uint64)
    index: dict[str, int] = {}
    ids = np.fromiter((index.setdefault(x, len(index)) for x in w), np.int64, len(w))
    wh = np.fromiter(map(_h64, index), np.uint64, len(index))[ids]
    m = len(w) - n + 1
    acc = wh[:m].copy()
    for j in range(1, n):  # wraps modulo 2^64 (numpy integer arrays do not raise on overflow)
        acc *= _MIX
        acc += wh[j : j + m]
    return np.unique(acc)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / |A | B| of two ``shingle_hashes`` sets."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / max(len(a) + len(b) - inter, 1)


def lsh_params(threshold: float, perm: int = DEFAULT_PERM) -> tuple[int, int]:
    """(bands, rows) for a Jaccard ``threshold``: for each rows r, bands = perm // r (every MinHash value
    used: the steeper the curve); the r whose 50% point (1/bands)^(1/rows) is closest to ``threshold``."""
    if not 0.0 < threshold < 1.0:
        raise PipelineError(f"--minhash-threshold must be between 0 and 1, not {threshold}")
    if perm < 2:
        raise PipelineError(f"--minhash-perm must be at least 2, not {perm}")
    r = min(range(1, perm // 2 + 1), key=lambda r: abs((1 / (perm // r)) ** (1 / r) - threshold))
    return perm // r, r


def detection_probability(s: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - s**rows) ** bands


# --------------------------------------------------------------------------------------------------
# Pass 1: signatures of one unit's candidates


def sig_path(out: Path, unit: int) -> Path:
    return out / ".state" / "dedup" / f"unit_{unit:05d}.npz"


def removed_list_path(out: Path, unit: int) -> Path:
    """Every duplicate a unit's documents lost, one ``reason<TAB>file:line<TAB>kept file:line<TAB>Jaccard``
    line each (the true Jaccard similarity with the kept document, 4 decimals; 1.0000 for exact ones)."""
    return out / LIST_DIR / f"unit_{unit:05d}.tsv"


@dataclass
class UnitSignatures:
    unit: int
    exact: np.ndarray | None  # (n, 2) uint64: 128-bit keys
    minhash: np.ndarray | None  # (n, perm) uint32
    path_index: np.ndarray  # (n,) int32 into paths
    line: np.ndarray  # (n,) int64 line (or row) of the location; range-relative for a byte-range unit
    paths: list[str]
    range_lines: int  # lines owned by a byte-range unit (its line counts are relative when range_start)
    relative: bool
    streamed: np.ndarray  # (n,) bool: a document streamed in pieces (exact key only; its MinHash row is 0)

    def __len__(self) -> int:
        return len(self.line)


def _iter_candidates(sources: list[Source], segments: list[Segment], settings: Settings,
                     ranges: list[ReadRange], streams: StreamPool | None = None) -> Iterator[tuple[str | bytes, str]]:
    """(text, location) of every candidate in order; a streamed document's is its exact key, computed over
    the pieces (``ExactKeyStream``; b"" without ``exact``), at its LAST piece. ``streams``: processes converting
    a MediaWiki dump's streams (``readers.StreamPool``)."""
    opts = settings.read_options()
    exact = "exact" in settings.dedup
    for si, lo, hi in segments:
        rng = ReadRange(lo, hi) if hi >= 0 else None
        if rng is not None:
            ranges.append(rng)
        stream: ExactKeyStream | None = None
        in_stream = False
        for kind, text, loc in iter_documents(sources[si], opts, rng, streams):
            kind, text, _ = screen(kind, text, loc, settings.filters, hashed=False)
            if kind == DOC:
                yield text, loc
            elif kind == SKIP:
                in_stream, stream = False, None  # a SKIP instead of LAST: the streamed document is dropped
            else:  # PART or LAST
                if not in_stream:
                    in_stream, stream = True, ExactKeyStream() if exact else None
                if stream is not None:
                    stream.update(text)
                if kind == LAST:
                    yield (stream.digest() if stream is not None else b""), loc
                    in_stream, stream = False, None


def _signature_batch(texts: list[str | bytes], exact: bool, ngram: int, perm: int
                     ) -> tuple[bytes, np.ndarray | None]:
    """The exact keys (concatenated) and MinHash signatures (n, perm) of a batch of candidates; a streamed
    document comes as its exact key (bytes) and gets a MinHash row of zeros (never used)."""
    keys = b"".join(t if isinstance(t, bytes) else exact_key(t) for t in texts) if exact else b""
    if not perm:
        return keys, None
    import rensa

    whole = [i for i, t in enumerate(texts) if isinstance(t, str)]
    sig = np.zeros((len(texts), perm), np.uint32)
    if whole:
        sets = [shingles(texts[i], ngram) for i in whole]
        rows = rensa.RMinHash.digest_matrix_from_token_sets(sets, perm, MINHASH_SEED).to_rows()
        sig[whole] = np.asarray(rows, dtype=np.uint32).reshape(len(whole), perm)
    return keys, sig


def _scan(sources: list[Source], segments: list[Segment], settings: Settings, pool=None, workers: int = 1,
          streams: StreamPool | None = None) -> dict:
    """The candidates of ``segments`` in order: their locations, exact keys and MinHash signatures. With
    a process ``pool`` this process reads and ``workers`` processes hash, batch by batch (bounded
    read-ahead); without, everything happens here. ``streams``: processes converting a MediaWiki dump's
    streams for the reading."""
    exact, minhash = "exact" in settings.dedup, "minhash" in settings.dedup
    perm = settings.minhash_bands * settings.minhash_rows if minhash else 0
    keys: list[bytes] = []
    sigs: list[np.ndarray] = []
    paths: dict[str, int] = {}
    pidx: list[int] = []
    lines: list[int] = []
    streamed: list[bool] = []
    ranges: list[ReadRange] = []
    inflight: deque = deque()
    args = (exact, settings.minhash_ngram, perm)

    def collect(result: tuple[bytes, np.ndarray | None]) -> None:
        keys.append(result[0])
        if result[1] is not None:
            sigs.append(result[1])

    def submit(batch: list[str]) -> None:
        if pool is None:
            collect(_signature_batch(batch, *args))
            return
        inflight.append(pool.apply_async(_signature_batch, (batch, *args)))
        while len(inflight) > 2 * workers:
            collect(inflight.popleft().get())

    batch: list[str | bytes] = []
    held = 0  # characters in the batch: bounds its memory
    for text, loc in _iter_candidates(sources, segments, settings, ranges, streams):
        path, _, line = loc.rpartition(":")
        pidx.append(paths.setdefault(path, len(paths)))
        lines.append(int(line))
        streamed.append(isinstance(text, bytes))
        batch.append(text)
        held += len(text)
        if len(batch) >= _SIG_BATCH or held >= _SIG_BATCH_CHARS:
            submit(batch)
            batch, held = [], 0
    if batch:
        submit(batch)
    while inflight:
        collect(inflight.popleft().get())
    return {"paths": list(paths), "pidx": pidx, "lines": lines, "streamed": streamed, "keys": b"".join(keys),
            "sigs": np.concatenate(sigs) if sigs else np.zeros((0, perm), np.uint32),
            "range_lines": ranges[0].lines if ranges else 0,
            "relative": bool(ranges and ranges[0].start > 0 and not ranges[0].absolute)}


def _scan_segment(args: tuple) -> dict:
    source, segment, settings = args
    return _scan([source], [(0, segment[1], segment[2])], settings)


def scan_unit(out: Path, sources: list[Source], unit: int, segments: list[Segment], settings: Settings,
              pool=None, workers: int = 1, streams: StreamPool | None = None) -> int:
    """Compute and save the signatures of ``unit``'s candidates; returns the input bytes scanned. With a
    process ``pool``, a unit of several sources is read and hashed a source per worker (results merged in
    order), a unit of one source is read here (a MediaWiki dump's streams converted on ``streams``) and
    hashed by the workers."""
    if pool is not None and len(segments) > 1:
        parts = pool.map(_scan_segment, [(sources[si], (si, lo, hi), settings) for si, lo, hi in segments])
        paths: dict[str, int] = {}
        r = {"pidx": [], "lines": [], "streamed": [], "keys": b"".join(p["keys"] for p in parts),
             "sigs": np.concatenate([p["sigs"] for p in parts]), "range_lines": 0, "relative": False}
        for p in parts:
            remap = [paths.setdefault(name, len(paths)) for name in p["paths"]]
            r["pidx"].extend(remap[i] for i in p["pidx"])
            r["lines"].extend(p["lines"])
            r["streamed"].extend(p["streamed"])
        r["paths"] = list(paths)
    else:
        r = _scan(sources, segments, settings, pool, workers, streams)
    n = len(r["lines"])
    arrays = {
        "path_index": np.asarray(r["pidx"], dtype=np.int32),
        "line": np.asarray(r["lines"], dtype=np.int64),
        "streamed": np.asarray(r["streamed"], dtype=bool).reshape(n),
        "meta": np.asarray(json.dumps({"paths": r["paths"], "range_lines": r["range_lines"],
                                       "relative": r["relative"], "candidates": n, "settings": settings.stamp(),
                                       "version": SCAN_VERSION, "segments": [list(g) for g in segments]})),
    }
    if "exact" in settings.dedup:
        arrays["exact"] = np.frombuffer(r["keys"], dtype=np.uint64).reshape(n, 2)
    if "minhash" in settings.dedup:
        arrays["minhash"] = r["sigs"]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(sig_path(out, unit), buf.getvalue())
    return sum(max(sources[si].size if hi < 0 else hi - lo, 1) for si, lo, hi in segments)


def load_signatures(out: Path, unit: int, settings: Settings, log=None,
                    segments: list[Segment] | None = None) -> UnitSignatures | None:
    """A unit's saved signatures, or None when missing, damaged, made with other settings (candidate
    numbering depends on ``--filter``, keys on ``--dedup`` and the MinHash parameters), by another version
    of the scan or (when given) for other ``segments``: then it is scanned again, and ``log`` gets a line
    naming the settings that differ."""
    p = sig_path(out, unit)
    if not p.exists():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            got = {k: z[k] for k in z.files}  # reading checks each member's CRC-32
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    differs = settings.differences(meta.get("settings"))
    if differs:
        if log is not None:
            log(f"{p}: made with other settings ({'; '.join(differs)}): scanned again")
        return None
    if meta.get("version") != SCAN_VERSION:
        if log is not None:
            log(f"{p}: made by another version of the scan ({meta.get('version')} -> {SCAN_VERSION}): scanned again")
        return None
    if segments is not None and meta.get("segments") != [list(g) for g in segments]:
        if log is not None:
            log(f"{p}: made for other input segments: scanned again")
        return None
    n = meta["candidates"]
    if len(got["line"]) != n or len(got.get("streamed", ())) != n:
        return None
    return UnitSignatures(unit, got.get("exact"), got.get("minhash"), got["path_index"], got["line"],
                          meta["paths"], meta["range_lines"], meta["relative"], got["streamed"])


def _scan_job(args: tuple) -> int:
    return scan_unit(*args)


def scan_units(out: Path, sources: list[Source], units: list[list[Segment]], mine: list[int],
               settings: Settings, workers: int, progress: bool, rank: int) -> None:
    """Scan this rank's units that have no valid signature file, ``workers`` units at a time."""
    def log(m: str) -> None:
        print(f"[rank {rank}] {m}", file=sys.stderr)

    todo = [u for u in mine if load_signatures(out, u, settings, log, units[u]) is None]
    if not todo:
        return
    total = sum(max(sources[si].size if hi < 0 else hi - lo, 1) for u in todo for si, lo, hi in units[u])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"dedup-scan[r{rank}]" if rank else "dedup-scan",
                   file=sys.stderr, mininterval=0.5)
    jobs = [(out, sources, u, units[u], settings) for u in todo]
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    try:
        if workers > 1 and len(todo) >= workers:  # units in parallel: each process reads and hashes one
            with ctx.Pool(workers) as pool:
                for n in pool.imap(_scan_job, jobs):
                    if bar is not None:
                        bar.update(n)
        else:  # fewer units than workers: the workers share each unit (by source, or by batch)
            # (a MediaWiki dump read here, a unit of one source, has its streams converted on as many
            # processes, started first)
            streams = StreamPool(workers) if workers > 1 and any(
                len(units[u]) == 1 and uses_stream_pool(sources[units[u][0][0]]) for u in todo) else None
            pool = None
            try:
                pool = ctx.Pool(workers) if workers > 1 else None
                for job in jobs:
                    n = scan_unit(*job, pool=pool, workers=workers, streams=streams)
                    if bar is not None:
                        bar.update(n)
            finally:
                if pool is not None:
                    pool.terminate()
                if streams is not None:
                    streams.close()
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------------
# Pass 2: the exchange


def _group_edges(keys: list[np.ndarray], gids: np.ndarray) -> np.ndarray:
    """Edges (member id, smallest id of its group) for every non-smallest member of a group of rows
    whose ``keys`` columns are all equal; (0, 2) int64 when there are none."""
    if len(gids) < 2:
        return np.zeros((0, 2), np.int64)
    order = np.lexsort([gids, *reversed(keys)])
    cols = [k[order] for k in keys]
    g = gids[order]
    same = np.ones(len(g), dtype=bool)
    same[0] = False
    for c in cols:
        same[1:] &= c[1:] == c[:-1]
    start = np.maximum.accumulate(np.where(same, 0, np.arange(len(g))))
    return np.stack([g[same], g[start[same]]], axis=1).astype(np.int64)


def _partitioned_edges(comm, keys: list[np.ndarray], gids: np.ndarray) -> np.ndarray:
    """Group equal keys across ranks: rows go to rank ``keys[0] % size``; returns that rank's edges."""
    if comm.size > 1:
        dest = (keys[0] % np.uint64(comm.size)).astype(np.int64)
        sends = [([k[dest == r] for k in keys], gids[dest == r]) for r in range(comm.size)]
        got = comm.alltoall(sends)
        keys = [np.concatenate([k[i] for k, _ in got]) for i in range(len(keys))]
        gids = np.concatenate([g for _, g in got])
    return _group_edges(keys, gids)


def _clusters(edges: np.ndarray) -> dict[int, int]:
    """Duplicate id -> kept id (the smallest of its connected component) for every non-smallest node."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while root in parent:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    return {x: find(x) for x in parent}


def _home(x: np.ndarray, size: int) -> np.ndarray:
    """The rank that holds document ``x``'s label in the cluster resolution: a multiplicative hash of the
    id, so consecutive ids (one unit's documents) spread over the ranks."""
    h = (x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (h % np.uint64(size)).astype(np.int64)


def _route(comm, dest: np.ndarray, *cols: np.ndarray) -> list[np.ndarray]:
    """Send row i of ``cols`` to rank ``dest[i]`` (one ``alltoall``); returns the columns received."""
    if comm.size == 1:
        return list(cols)
    order = np.argsort(dest, kind="stable")
    bounds = np.searchsorted(dest[order], np.arange(comm.size + 1))
    sends = [[c[order[bounds[r]:bounds[r + 1]]] for c in cols] for r in range(comm.size)]
    got = comm.alltoall(sends)
    return [np.concatenate([g[i] for g in got]) if got else cols[i][:0] for i in range(len(cols))]


def _index(nodes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``np.searchsorted(nodes, query)``, the query sorted first when large: numpy's binary search starts each
    key where the previous one ended, so sorted keys stay in cache (3x faster for 2*10^6 random ids)."""
    if len(query) < 1 << 15:
        return np.searchsorted(nodes, query)
    order = np.argsort(query)
    out = np.empty(len(query), np.intp)
    out[order] = np.searchsorted(nodes, query[order])
    return out


def _ask(comm, nodes: np.ndarray, labels: np.ndarray, query: np.ndarray, dest: np.ndarray | None = None
         ) -> np.ndarray:
    """The value (``labels``, any dtype) of every id in ``query``, held by the rank ``dest`` gives for it (its
    ``_home`` by default) in its sorted ``nodes``, which must hold every id asked of it (two ``alltoall``s)."""
    if comm.size == 1:
        return labels[_index(nodes, query)]
    if dest is None:
        dest = _home(query, comm.size)
    order = np.argsort(dest, kind="stable")
    bounds = np.searchsorted(dest[order], np.arange(comm.size + 1))
    asked = comm.alltoall([query[order[bounds[r]:bounds[r + 1]]] for r in range(comm.size)])
    answers = comm.alltoall([labels[_index(nodes, q)] for q in asked])
    out = np.empty(len(query), labels.dtype)
    out[order] = np.concatenate(answers)
    return out


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique`` of int64 ids by sorting (numpy 2's hash-based unique is several times slower here)."""
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _total(comm, n: int) -> int:
    return n if comm.size == 1 else sum(comm.allgather(n))


def _connected_components(comm, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distributed connected components of the graph whose edges the ranks hold between them (collective).
    Returns this rank's share of the documents (ids in ``edges`` anywhere, each held by ``_home``) and the
    smallest id of each one's component.

    Min-label hooking with pointer jumping, in numpy over ``alltoall`` rounds: every document holds a label
    (its own id at first); each round, every edge whose ends have different labels hooks the larger label
    onto the smaller (``np.minimum.at`` at the larger label's home), then labels jump to their label's label
    until none moves, and each edge is replaced by the pair of its ends' labels (so the edges contract to
    edges between components, duplicates and self-loops dropped). Labels only decrease and stay ids of the
    component, so at the end each is the component's smallest id: the document kept, as the first in
    input order. Rounds: about log2 of the longest chain of hooks (a few for duplicate clusters, whose
    exact-key groups are stars). Memory per rank: its share of the documents and of the edges."""
    edges = edges.reshape(-1, 2).astype(np.int64)
    ends = _sorted_unique(edges.reshape(-1))
    (nodes,) = _route(comm, _home(ends, comm.size), ends)
    nodes = _sorted_unique(nodes)
    labels = nodes.copy()
    while _total(comm, len(edges)):
        lu, lv = _ask(comm, nodes, labels, edges[:, 0]), _ask(comm, nodes, labels, edges[:, 1])
        live = lu != lv
        hi, lo = np.maximum(lu, lv)[live], np.minimum(lu, lv)[live]
        hi, lo = _route(comm, _home(hi, comm.size), hi, lo)
        np.minimum.at(labels, _index(nodes, hi), lo)
        active = np.arange(len(nodes))
        while True:  # pointer jumping: label <- label's label, until no label moves anywhere
            jumped = _ask(comm, nodes, labels, labels[active])
            moved = jumped != labels[active]
            labels[active] = jumped
            active = active[moved]  # one that did not move points at a root: it stays (roots do not move)
            if not _total(comm, len(active)):
                break
        pairs = np.stack([_ask(comm, nodes, labels, lu[live]), _ask(comm, nodes, labels, lv[live])], axis=1)
        pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1)
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
        edges = pairs[np.concatenate([[True], (pairs[1:] != pairs[:-1]).any(axis=1)])] if len(pairs) else pairs
    return nodes, labels


def _owners(owner_of_unit: dict[int, int]):
    """Ids -> the rank holding each one's unit (``id >> 32``), vectorised."""
    table = np.zeros(max(owner_of_unit, default=0) + 1, np.int64)
    table[list(owner_of_unit)] = list(owner_of_unit.values())
    return lambda ids: table[np.asarray(ids, np.int64) >> np.int64(32)]


def _resolve(comm, edges: np.ndarray, owner_of_unit: dict[int, int]) -> dict[int, int]:
    """Cluster the edges the ranks hold (``_connected_components``) and give every rank the duplicates in its
    units: duplicate id -> kept id (the smallest of its cluster). No rank gathers the whole graph."""
    nodes, labels = _connected_components(comm, edges)
    dup = nodes != labels
    d, k = nodes[dup], labels[dup]
    d, k = _route(comm, _owners(owner_of_unit)(d), d, k)
    return dict(zip(d.tolist(), k.tolist(), strict=True))


# --------------------------------------------------------------------------------------------------
# Near duplicates: every removal checked by its true Jaccard similarity with the document kept for it


def _near_stars(comm, edges: np.ndarray, owners) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The LSH *stars*, each complete on the ``_home`` rank of its centre (collective): an edge (member,
    smallest id of a bucket) puts the member in the star of that smallest id, the centre is in its own star
    (buckets of different bands with the same smallest id are one star): documents of one star share a band
    with its centre, so each pair of them is a candidate pair. Returns this rank's star rows (centre, member),
    sorted and unique, and the documents of any star held in this rank's units (sorted): the clustered ones."""
    edges = edges.reshape(-1, 2).astype(np.int64)
    member, centre = _route(comm, _home(edges[:, 1], comm.size), edges[:, 0], edges[:, 1])
    centres = _sorted_unique(centre)
    centre, member = np.concatenate([centre, centres]), np.concatenate([member, centres])
    order = np.lexsort((member, centre))
    centre, member = centre[order], member[order]
    new = np.ones(len(centre), bool)
    new[1:] = (centre[1:] != centre[:-1]) | (member[1:] != member[:-1])
    centre, member = centre[new], member[new]
    docs = _sorted_unique(member)
    (mine,) = _route(comm, owners(docs), docs)
    return centre, member, _sorted_unique(mine)


def _near_rounds(comm, centre: np.ndarray, member: np.ndarray, mine: np.ndarray, owners, measure, bound: float
                 ) -> tuple[dict[int, tuple[int, float]], int, int]:
    """The rounds of the Jaccard check over the star rows (``_near_stars``) the ranks hold (collective).
    ``mine``: this rank's clustered documents; ``measure(m, rep)``: the true Jaccard of each pair, called on
    every rank at once with the pairs whose member ``m`` is in this rank's units. Returns this rank's near
    duplicates (id -> (kept id, Jaccard)), the pairs of the first round (over all ranks) and the rounds that
    measured pairs.

    Each round the *alive* documents (at first every clustered one) form groups: the connected components of
    two or more alive documents, where the alive members of a star are joined to each other, i.e. each to
    the star's smallest alive member (its centre need not be alive), found by ``_connected_components``; the
    first (smallest) of a group is its representative, and every other member is paired with it. The next
    round's alive documents are the paired members the measure put below ``bound`` (representatives and
    lone members leave; alive documents only ever leave, so each star row whose member left is dropped).
    It stops after a round with no pairs or ``MAX_ROUNDS`` rounds. Per rank: its stars, its share of the
    groups' documents and edges, its units' clustered documents and pairs; numpy throughout."""
    alive = np.ones(len(mine), bool)  # of ``mine``: alive this round, held by the document's unit's rank
    found: dict[int, tuple[int, float]] = {}
    candidates = rounds = 0
    for rnd in range(MAX_ROUNDS):
        if rnd:
            live = _ask(comm, mine, alive, member, owners(member))
            centre, member = centre[live], member[live]
        first = np.ones(len(centre), bool)  # rows are sorted by (centre, member): a star's first alive row
        first[1:] = centre[1:] != centre[:-1]  # is its smallest alive member
        start = np.maximum.accumulate(np.where(first, np.arange(len(centre)), 0))
        nodes, labels = _connected_components(comm, np.stack([member[~first], member[start[~first]]], axis=1))
        paired = nodes != labels
        n = _total(comm, int(np.count_nonzero(paired)))
        if rnd == 0:
            candidates = n  # what transitive clusters would have removed
        if not n:
            break
        rounds += 1
        m, rep = _route(comm, owners(nodes[paired]), nodes[paired], labels[paired])
        order = np.argsort(m)
        m, rep = m[order], rep[order]
        j = np.asarray(measure(m, rep), np.float64)
        near = j >= bound
        found.update(zip(m[near].tolist(), zip(rep[near].tolist(), j[near].tolist(), strict=True), strict=True))
        alive[:] = False
        alive[np.searchsorted(mine, m[~near])] = True
    return found, candidates, rounds


def _fetch_sets(comm, sets: dict[int, np.ndarray], keys: np.ndarray, owners) -> dict[int, np.ndarray]:
    """The shingle sets of ``keys`` (sorted unique ids), each from the rank holding its unit (two ``alltoall``s:
    the ids, then per rank one flat array of the sets with their lengths)."""
    if comm.size == 1:
        return sets
    dest = owners(keys)
    order = np.argsort(dest, kind="stable")
    bounds = np.searchsorted(dest[order], np.arange(comm.size + 1))
    asks = [keys[order[bounds[r]:bounds[r + 1]]] for r in range(comm.size)]
    asked = comm.alltoall(asks)
    sends = []
    for ks in asked:
        got = [sets[k] for k in ks.tolist()]
        sends.append((np.array([len(x) for x in got], np.int64),
                      np.concatenate(got) if got else np.zeros(0, np.uint64)))
    theirs: dict[int, np.ndarray] = {}
    for ks, (lens, flat) in zip(asks, comm.alltoall(sends), strict=True):
        theirs.update(zip(ks.tolist(), np.split(flat, np.cumsum(lens)[:-1]) if len(ks) else [], strict=True))
    return theirs


def _reread(args: tuple, streams: StreamPool | None = None) -> dict[int, np.ndarray]:
    """The shingle sets of the wanted candidates of one unit, found by location ({(path, line): id}),
    reading its segments in order up to the last one wanted (a MediaWiki dump's streams converted on
    ``streams``). No quality rules: a location names one record, and the scan found a candidate there."""
    sources, segments, settings, wanted = args
    opts = settings.read_options()
    paths = {p for p, _ in wanted}
    found: dict[int, np.ndarray] = {}
    for si, lo, hi in segments:
        src = sources[si]
        if not src.is_hf and src.path not in paths:  # (a file's locations are its path)
            continue
        rng = ReadRange(lo, hi) if hi >= 0 else None
        for kind, text, loc in iter_documents(src, opts, rng, streams):
            if kind != DOC:
                continue
            path, _, line = loc.rpartition(":")
            x = wanted.get((path, int(line)))
            if x is not None:
                found[x] = shingle_hashes(text, settings.minhash_ngram)
                if len(found) == len(wanted):
                    return found
    return found


def _shingle_sets(ids: list[int], units: list[list[Segment]], sources: list[Source],
                  sigs: dict[int, UnitSignatures], settings: Settings, workers: int) -> dict[int, np.ndarray]:
    """The shingle sets of this rank's candidates ``ids``, re-read from their units (``workers``
    processes, a unit each)."""
    wanted: dict[int, dict[tuple[str, int], int]] = {}
    for x in ids:
        u, i = x >> 32, x & 0xFFFFFFFF
        s = sigs[u]
        wanted.setdefault(u, {})[(s.paths[s.path_index[i]], int(s.line[i]))] = x
    jobs = [(sources, units[u], settings, wanted[u]) for u in sorted(wanted)]
    sets: dict[int, np.ndarray] = {}
    if workers > 1 and len(jobs) > 1:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for got in pool.imap(_reread, jobs):
                sets.update(got)
    else:  # one unit (or one worker): read here, a MediaWiki dump's streams converted on the workers
        streams = StreamPool(workers) if workers > 1 and any(
            uses_stream_pool(sources[si]) for _, segs, _, _ in jobs for si, _, _ in segs) else None
        try:
            for job in jobs:
                sets.update(_reread(job, streams))
        finally:
            if streams is not None:
                streams.close()
    for want in wanted.values():
        for (path, line), x in want.items():
            if x not in sets:
                raise PipelineError(f"{path}:{line}: the near-duplicate candidate scanned there is gone "
                                    "(did the input change during the run?)")
    return sets


def _verified_near(comm, edges: np.ndarray, owner: dict[int, int], units: list[list[Segment]],
                   sources: list[Source], sigs: dict[int, UnitSignatures], settings: Settings,
                   workers: int) -> tuple[dict[int, tuple[int, float]], dict]:
    """The near duplicates of this rank's units, each with the document kept for it and their true
    Jaccard similarity (duplicate id -> (kept id, Jaccard)), and what the check did (totals over the ranks:
    ``clustered``, ``candidates``, ``rounds``, ``removed``; rank 0's ``reread_s`` and ``check_s``).

    Collective, and no rank gathers the graph or the pairs: the ranks hold the LSH stars by centre
    (``_near_stars``), each rank re-reads the shingle sets of the clustered documents in its units, and in
    rounds (``_near_rounds``) the documents connected through stars form groups (``_connected_components``);
    the first of each group is kept (its representative) and every other member whose true Jaccard with it,
    measured by the rank holding the member (the representative's set fetched from the rank holding it), is
    at least ``jaccard_bound`` is removed as its duplicate. The members left (below the bound: not near the
    representative, however near some other member) form new groups among themselves, with new
    representatives, for up to ``MAX_ROUNDS`` rounds; then the rest are kept. So A~B~C never removes C for A
    unless C itself is near A."""
    bound = jaccard_bound(settings)
    owners = _owners(owner)
    centre, member, mine = _near_stars(comm, edges, owners)
    t0 = time.perf_counter()
    err: BaseException | None = None
    try:
        sets = _shingle_sets(mine.tolist(), units, sources, sigs, settings, workers)
    except BaseException as e:  # every rank stops, none waits in a collective
        err, sets = e, {}
    failures = [f for f in comm.allgather(None if err is None else f"rank {comm.rank}: {err}") if f]
    if err is not None:
        raise err
    if failures:
        raise PipelineError("; ".join(failures))
    stats = {"clustered": _total(comm, len(mine)), "candidates": 0, "rounds": 0,
             "reread_s": time.perf_counter() - t0}

    def measure(m: np.ndarray, rep: np.ndarray) -> np.ndarray:
        theirs = _fetch_sets(comm, sets, _sorted_unique(rep), owners)
        return np.fromiter((jaccard(sets[a], theirs[b]) for a, b in zip(m.tolist(), rep.tolist(), strict=True)),
                           np.float64, len(m))

    found, stats["candidates"], stats["rounds"] = _near_rounds(comm, centre, member, mine, owners, measure, bound)
    stats["removed"] = _total(comm, len(found))
    stats["check_s"] = time.perf_counter() - t0
    return found, stats


@dataclass
class Drops:
    """This rank's duplicates: per unit, candidate index -> (reason, kept document's location or "");
    ``near`` (rank 0, with ``minhash``): what the Jaccard check did and its seconds (``_verified_near``)."""

    by_unit: dict[int, dict[int, tuple[str, str]]]
    counts: dict[str, int]
    near: dict | None = None


def _line_bases(units: list[list[Segment]], meta: dict[int, tuple[int, bool]]) -> dict[int, int]:
    """Per byte-range unit, the lines of the same file's earlier ranges (as in ``manifest``)."""
    base: dict[int, int] = {}
    run: dict[int, int] = {}
    for u, segs in enumerate(units):
        if len(segs) != 1 or segs[0][2] < 0 or u not in meta:
            continue
        lines, relative = meta[u]
        b = run.get(segs[0][0], 0) if relative else 0
        base[u] = b
        run[segs[0][0]] = b + lines
    return base


# Testing hook: LMFORGE_INJECT_DEDUP_ERROR=R makes rank R fail as it enters the exchange, while the other ranks
# wait in its first collective (tests/data_pipeline/test_resume_state.py: every rank must end promptly).
INJECT_ERROR_ENV = "LMFORGE_INJECT_DEDUP_ERROR"


def find_duplicates(out: Path, units: list[list[Segment]], assignment: list[list[int]], settings: Settings,
                    comm, sources: list[Source], workers: int = 1) -> Drops:
    """The exchange: every rank calls it after scanning its units; returns this rank's duplicates. The
    near-duplicate check re-reads this rank's clustered candidates from ``sources`` on ``workers``
    processes."""
    mine = assignment[comm.rank]
    if os.environ.get(INJECT_ERROR_ENV, "") == str(comm.rank):
        raise PipelineError(f"injected failure on rank {comm.rank} before the dedup exchange ({INJECT_ERROR_ENV})")
    owner = {u: r for r, us in enumerate(assignment) for u in us}
    sigs = {}
    for u in mine:
        s = load_signatures(out, u, settings, segments=units[u])
        if s is None:
            raise PipelineError(f"{sig_path(out, u)}: missing or damaged after the scan")
        sigs[u] = s

    def ids(u: int) -> np.ndarray:
        return (np.int64(u) << np.int64(32)) + np.arange(len(sigs[u]), dtype=np.int64)

    gids = np.concatenate([ids(u) for u in mine]) if mine else np.zeros(0, np.int64)
    removed: dict[int, tuple[str, int, float]] = {}  # duplicate id -> (reason, kept id, Jaccard)
    near_stats = None
    if "exact" in settings.dedup:
        ex = np.concatenate([sigs[u].exact for u in mine]) if mine else np.zeros((0, 2), np.uint64)
        edges = _partitioned_edges(comm, [ex[:, 0], ex[:, 1]], gids)
        removed.update((d, (REASONS["exact"], k, 1.0)) for d, k in _resolve(comm, edges, owner).items())
    if "minhash" in settings.dedup:
        r = settings.minhash_rows
        perm = settings.minhash_bands * r
        mh = np.concatenate([sigs[u].minhash for u in mine]) if mine else np.zeros((0, perm), np.uint32)
        # Not near-duplicate candidates: exact duplicates already removed, and streamed documents.
        keep = ~np.concatenate([sigs[u].streamed for u in mine]) if mine else np.zeros(0, bool)
        if removed:
            keep &= np.fromiter((g not in removed for g in gids.tolist()), bool, len(gids))
        cand, cand_ids = mh[keep], gids[keep]
        edges = [np.zeros((0, 2), np.int64)]
        for b in range(settings.minhash_bands):  # one band at a time: bounded memory per exchange
            band = cand[:, b * r : (b + 1) * r].astype(np.uint64)
            edges.append(_partitioned_edges(comm, [band[:, c] for c in range(r)], cand_ids))
        near, near_stats = _verified_near(comm, np.concatenate(edges), owner, units, sources, sigs, settings,
                                          workers)
        removed.update((d, (REASONS["minhash"], k, j)) for d, (k, j) in near.items())

    # Where each kept document is: asked of the rank that scanned its unit (alltoall both ways).
    meta = {u: (s.range_lines, s.relative) for u, s in sigs.items()}
    merged_meta: dict[int, tuple[int, bool]] = {}
    for m in comm.allgather(meta):
        merged_meta.update(m)
    base = _line_bases(units, merged_meta)

    def loc(k: int) -> str:
        u, i = k >> 32, k & 0xFFFFFFFF
        s = sigs[u]
        return f"{s.paths[s.path_index[i]]}:{base.get(u, 0) + int(s.line[i])}"

    asks: list[list[int]] = [[] for _ in range(comm.size)]
    for k in sorted({k for _, k, _ in removed.values()}):
        asks[owner[k >> 32]].append(k)
    asked = comm.alltoall(asks)
    answers = comm.alltoall([[loc(k) for k in ks] for ks in asked])
    kept_loc = {k: a for ks, ans in zip(asks, answers) for k, a in zip(ks, ans)}

    counts: dict[str, int] = {}
    result: dict[int, dict[int, tuple[str, str]]] = {u: {} for u in mine}
    listing: dict[int, list[str]] = {}
    for d, (why, k, j) in sorted(removed.items()):
        u, i = d >> 32, d & 0xFFFFFFFF
        result[u][i] = (why, kept_loc[k])
        counts[why] = counts.get(why, 0) + 1
        listing.setdefault(u, []).append(f"{why}\t{loc(d)}\t{kept_loc[k]}\t{j:.4f}\n")
    for u in mine:  # the full list, per unit (written on the node that holds the unit's shards)
        path = removed_list_path(out, u)
        if u in listing:
            atomic_write_bytes(path, "".join(listing[u]).encode("utf-8"))
        else:
            path.unlink(missing_ok=True)
    return Drops(result, counts, near_stats if comm.rank == 0 else None)

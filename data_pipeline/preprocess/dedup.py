"""Document deduplication (``preprocess --dedup exact|minhash|exact,minhash``), deterministic across
inputs, workers and MPI ranks: of each set of duplicates the first document in input order is kept.

Two passes. The tokenizing pass must know, when it reaches a document, whether an earlier document in
*any* unit duplicates it, so a scan comes first:

1. **Scan** (per unit, resumable): every *candidate* - a whole document (``DOC``) that passed the
   ``--filter`` rules - gets a signature, written with its location to ``.state/dedup/unit_NNNNN.npz``
   (atomically; zip CRCs catch a damaged file, which is then scanned again). A document's id is
   ``unit << 32 | k`` for the k-th candidate of its unit, so ids sort in input order. Ranks scan the
   units they will tokenize, so no rank needs another's files (no shared filesystem is assumed); units
   are scanned in parallel by ``--workers`` processes (whole units each when there are enough, else a
   unit's sources, or the batches of a one-source unit while this process reads it).
2. **Exchange** (MPI collectives, only keys and ids, never texts): signatures are partitioned by key
   over the ranks (``alltoall``); each rank groups equal keys and emits an edge from every member of a
   group to its smallest id; rank 0 joins the edges into clusters (union-find, memory bounded by the
   number of documents in a cluster) and every non-smallest member of a cluster is a duplicate of the
   smallest, which is kept. Each rank receives its units' duplicates (``scatter``).
3. The tokenizing pass skips them with the reason ``duplicate-exact`` or ``duplicate-near``; the
   manifest's ``duplicate_examples`` give a few duplicates' ``file:line`` with the kept document's, and
   ``OUT/duplicates/unit_NNNNN.tsv`` lists every one (``reason<TAB>file:line<TAB>kept file:line``),
   written by the rank that holds the unit.

**exact**: documents are equal after Unicode NFC normalisation, with whitespace runs collapsed to one
space and leading/trailing whitespace removed (case and punctuation count); the key is a 128-bit BLAKE2b
of the normalised UTF-8 (a chance collision among 10^12 documents has probability ~10^-15).

**minhash**: the Jaccard similarity of the documents' sets of word n-grams (shingles) is estimated with
MinHash (``rensa``'s ``RMinHash``, a maintained Rust implementation; ``ALGORITHM_VERSION`` and the seed
are recorded in the settings) and candidates are found by locality-sensitive hashing: the ``perm =
bands x rows`` MinHash values are cut into ``bands`` bands of ``rows`` values; two documents sharing
all values of any band are duplicates. Words are taken after NFC normalisation and lower-casing, as in
the quality rules: whitespace-separated runs, except that each CJK character is a word (so Chinese is
shingled by characters, not as one "word"). A document of fewer than n words is one shingle.
The probability that two documents of Jaccard similarity s are found is 1 - (1 - s^rows)^bands; the
default 14 bands x 8 rows over 5-grams (FineWeb's) has its 50% point at s = (1/14)^(1/8) = 0.72:

    s      0.3      0.5     0.6    0.7    0.75   0.8    0.85   0.9    0.95
    P   0.0009   0.053   0.21   0.56   0.75   0.92   0.99   0.9996  1.0

``--minhash-threshold T`` picks the bands x rows (within ``--minhash-perm``, default 112) whose 50%
point is closest to T. Clusters are transitive (A~B and B~C remove B and C, keeping A, even if A and C
differ more), as in datatrove and NeMo Curator.

``exact,minhash`` removes exact duplicates first (reason ``duplicate-exact``), then near duplicates
among the rest. Documents streamed in pieces (longer than ``--max-doc-bytes``) are never candidates,
nor are documents removed by ``--filter``; ``--min-tokens`` is applied after deduplication.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import sys
import unicodedata
import zipfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.common.files import atomic_write_bytes

from ..readers import DOC, SKIP, ReadRange, Source, iter_documents
from . import quality
from .plan import Segment
from .settings import PipelineError, Settings
from .writer import doc_hash

MODES = ("exact", "minhash")
REASONS = {"exact": "duplicate-exact", "minhash": "duplicate-near"}
MINHASH_SEED = 1
DEFAULT_PERM = 112
DEFAULT_THRESHOLD = 0.72
LIST_DIR = "duplicates"  # OUT/duplicates/unit_NNNNN.tsv: every removed duplicate and what it duplicates
_SIG_BATCH = 512  # documents per signature batch, at most
_SIG_BATCH_CHARS = 1 << 20  # characters per signature batch, at most (bounds the memory of a batch of books)


# --------------------------------------------------------------------------------------------------
# What a document is (shared with the tokenizing pass, which must count candidates identically)


def screen(kind: int, text: str, loc: str, filters: tuple[str, ...], hashed: bool = True) -> tuple[int, str, int]:
    """An item as the pipeline treats it: ``(kind, text or skip reason, hash of the whole document)``.
    A document with unencodable text (lone surrogates from a JSON escape) or removed by a quality rule
    becomes a ``SKIP``. Every ``DOC`` that comes out is a deduplication candidate. ``hashed=False``: the
    same verdicts without the hash (0), for the scan."""
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
        why = quality.check(text, filters)
        if why is not None:
            return SKIP, why, 0
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


def shingles(text: str, n: int) -> list[str]:
    """The word n-grams of ``text`` (NFC, lower case, CJK characters as words); at least one."""
    w = quality.words(unicodedata.normalize("NFC", text).lower())
    if len(w) <= n:
        return [" ".join(w)]
    return [" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]


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


def minhash_version() -> int:
    import rensa

    return int(rensa.RMinHash.ALGORITHM_VERSION)


# --------------------------------------------------------------------------------------------------
# Pass 1: signatures of one unit's candidates


def sig_path(out: Path, unit: int) -> Path:
    return out / ".state" / "dedup" / f"unit_{unit:05d}.npz"


def removed_list_path(out: Path, unit: int) -> Path:
    """Every duplicate a unit's documents lost, one ``reason<TAB>file:line<TAB>kept file:line`` line each."""
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

    def __len__(self) -> int:
        return len(self.line)


def _iter_candidates(sources: list[Source], segments: list[Segment], settings: Settings,
                     ranges: list[ReadRange]) -> Iterator[tuple[str, str]]:
    opts = settings.read_options()
    for si, lo, hi in segments:
        rng = ReadRange(lo, hi) if hi >= 0 else None
        if rng is not None:
            ranges.append(rng)
        for kind, text, loc in iter_documents(sources[si], opts, rng):
            kind, text, _ = screen(kind, text, loc, settings.filters, hashed=False)
            if kind == DOC:
                yield text, loc


def _signature_batch(texts: list[str], exact: bool, ngram: int, perm: int) -> tuple[bytes, np.ndarray | None]:
    """The exact keys (concatenated) and MinHash signatures (n, perm) of a batch of candidates."""
    keys = b"".join(exact_key(t) for t in texts) if exact else b""
    if not perm:
        return keys, None
    import rensa

    sets = [shingles(t, ngram) for t in texts]
    rows = rensa.RMinHash.digest_matrix_from_token_sets(sets, perm, MINHASH_SEED).to_rows()
    return keys, np.asarray(rows, dtype=np.uint32).reshape(len(texts), perm)


def _scan(sources: list[Source], segments: list[Segment], settings: Settings, pool=None, workers: int = 1) -> dict:
    """The candidates of ``segments`` in order: their locations, exact keys and MinHash signatures. With
    a process ``pool`` this process reads and ``workers`` processes hash, batch by batch (bounded
    read-ahead); without, everything happens here."""
    exact, minhash = "exact" in settings.dedup, "minhash" in settings.dedup
    perm = settings.minhash_bands * settings.minhash_rows if minhash else 0
    keys: list[bytes] = []
    sigs: list[np.ndarray] = []
    paths: dict[str, int] = {}
    pidx: list[int] = []
    lines: list[int] = []
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

    batch: list[str] = []
    held = 0  # characters in the batch: bounds its memory
    for text, loc in _iter_candidates(sources, segments, settings, ranges):
        path, _, line = loc.rpartition(":")
        pidx.append(paths.setdefault(path, len(paths)))
        lines.append(int(line))
        batch.append(text)
        held += len(text)
        if len(batch) >= _SIG_BATCH or held >= _SIG_BATCH_CHARS:
            submit(batch)
            batch, held = [], 0
    if batch:
        submit(batch)
    while inflight:
        collect(inflight.popleft().get())
    return {"paths": list(paths), "pidx": pidx, "lines": lines, "keys": b"".join(keys),
            "sigs": np.concatenate(sigs) if sigs else np.zeros((0, perm), np.uint32),
            "range_lines": ranges[0].lines if ranges else 0, "relative": bool(ranges and ranges[0].start > 0)}


def _scan_segment(args: tuple) -> dict:
    source, segment, settings = args
    return _scan([source], [(0, segment[1], segment[2])], settings)


def scan_unit(out: Path, sources: list[Source], unit: int, segments: list[Segment], settings: Settings,
              pool=None, workers: int = 1) -> int:
    """Compute and save the signatures of ``unit``'s candidates; returns the input bytes scanned. With a
    process ``pool``, a unit of several sources is read and hashed a source per worker (results merged in
    order), a unit of one source is read here and hashed by the workers."""
    if pool is not None and len(segments) > 1:
        parts = pool.map(_scan_segment, [(sources[si], (si, lo, hi), settings) for si, lo, hi in segments])
        paths: dict[str, int] = {}
        r = {"pidx": [], "lines": [], "keys": b"".join(p["keys"] for p in parts),
             "sigs": np.concatenate([p["sigs"] for p in parts]), "range_lines": 0, "relative": False}
        for p in parts:
            remap = [paths.setdefault(name, len(paths)) for name in p["paths"]]
            r["pidx"].extend(remap[i] for i in p["pidx"])
            r["lines"].extend(p["lines"])
        r["paths"] = list(paths)
    else:
        r = _scan(sources, segments, settings, pool, workers)
    n = len(r["lines"])
    arrays = {
        "path_index": np.asarray(r["pidx"], dtype=np.int32),
        "line": np.asarray(r["lines"], dtype=np.int64),
        "meta": np.asarray(json.dumps({"paths": r["paths"], "range_lines": r["range_lines"],
                                       "relative": r["relative"], "candidates": n})),
    }
    if "exact" in settings.dedup:
        arrays["exact"] = np.frombuffer(r["keys"], dtype=np.uint64).reshape(n, 2)
    if "minhash" in settings.dedup:
        arrays["minhash"] = r["sigs"]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(sig_path(out, unit), buf.getvalue())
    return sum(max(sources[si].size if hi < 0 else hi - lo, 1) for si, lo, hi in segments)


def load_signatures(out: Path, unit: int) -> UnitSignatures | None:
    """A unit's saved signatures, or None when missing or damaged (then it is scanned again)."""
    p = sig_path(out, unit)
    if not p.exists():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            got = {k: z[k] for k in z.files}  # reading checks each member's CRC-32
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    n = meta["candidates"]
    if len(got["line"]) != n:
        return None
    return UnitSignatures(unit, got.get("exact"), got.get("minhash"), got["path_index"], got["line"],
                          meta["paths"], meta["range_lines"], meta["relative"])


def _scan_job(args: tuple) -> int:
    return scan_unit(*args)


def scan_units(out: Path, sources: list[Source], units: list[list[Segment]], mine: list[int],
               settings: Settings, workers: int, progress: bool, rank: int) -> None:
    """Scan this rank's units that have no valid signature file, ``workers`` units at a time."""
    todo = [u for u in mine if load_signatures(out, u) is None]
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
            pool = ctx.Pool(workers) if workers > 1 else None
            try:
                for job in jobs:
                    n = scan_unit(*job, pool=pool, workers=workers)
                    if bar is not None:
                        bar.update(n)
            finally:
                if pool is not None:
                    pool.terminate()
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


def _resolve(comm, edges: np.ndarray, owner_of_unit: dict[int, int]) -> dict[int, int]:
    """Gather edges at rank 0, cluster them, and give every rank the duplicates in its units."""
    everything = comm.gather(edges, root=0)
    parts = None
    if comm.rank == 0:
        dup = _clusters(np.concatenate(everything) if everything else np.zeros((0, 2), np.int64))
        parts = [{} for _ in range(comm.size)]
        for d, k in dup.items():
            parts[owner_of_unit[d >> 32]][d] = k
    return comm.scatter(parts, root=0)


@dataclass
class Drops:
    """This rank's duplicates: per unit, candidate index -> (reason, kept document's location or "")."""

    by_unit: dict[int, dict[int, tuple[str, str]]]
    counts: dict[str, int]


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


def find_duplicates(out: Path, units: list[list[Segment]], assignment: list[list[int]], settings: Settings,
                    comm) -> Drops:
    """The exchange: every rank calls it after scanning its units; returns this rank's duplicates."""
    mine = assignment[comm.rank]
    owner = {u: r for r, us in enumerate(assignment) for u in us}
    sigs = {}
    for u in mine:
        s = load_signatures(out, u)
        if s is None:
            raise PipelineError(f"{sig_path(out, u)}: missing or damaged after the scan")
        sigs[u] = s

    def ids(u: int) -> np.ndarray:
        return (np.int64(u) << np.int64(32)) + np.arange(len(sigs[u]), dtype=np.int64)

    gids = np.concatenate([ids(u) for u in mine]) if mine else np.zeros(0, np.int64)
    removed: dict[int, tuple[str, int]] = {}  # duplicate id -> (reason, kept id)
    if "exact" in settings.dedup:
        ex = np.concatenate([sigs[u].exact for u in mine]) if mine else np.zeros((0, 2), np.uint64)
        edges = _partitioned_edges(comm, [ex[:, 0], ex[:, 1]], gids)
        removed.update((d, (REASONS["exact"], k)) for d, k in _resolve(comm, edges, owner).items())
    if "minhash" in settings.dedup:
        r = settings.minhash_rows
        perm = settings.minhash_bands * r
        mh = np.concatenate([sigs[u].minhash for u in mine]) if mine else np.zeros((0, perm), np.uint32)
        keep = np.fromiter((g not in removed for g in gids.tolist()), bool, len(gids)) if removed else None
        cand, cand_ids = (mh, gids) if keep is None else (mh[keep], gids[keep])
        edges = [np.zeros((0, 2), np.int64)]
        for b in range(settings.minhash_bands):  # one band at a time: bounded memory per exchange
            band = cand[:, b * r : (b + 1) * r].astype(np.uint64)
            edges.append(_partitioned_edges(comm, [band[:, c] for c in range(r)], cand_ids))
        near = _resolve(comm, np.concatenate(edges), owner)
        removed.update((d, (REASONS["minhash"], k)) for d, k in near.items())

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
    for k in sorted({k for _, k in removed.values()}):
        asks[owner[k >> 32]].append(k)
    asked = comm.alltoall(asks)
    answers = comm.alltoall([[loc(k) for k in ks] for ks in asked])
    kept_loc = {k: a for ks, ans in zip(asks, answers) for k, a in zip(ks, ans)}

    counts: dict[str, int] = {}
    result: dict[int, dict[int, tuple[str, str]]] = {u: {} for u in mine}
    listing: dict[int, list[str]] = {}
    for d, (why, k) in sorted(removed.items()):
        u, i = d >> 32, d & 0xFFFFFFFF
        result[u][i] = (why, kept_loc[k])
        counts[why] = counts.get(why, 0) + 1
        listing.setdefault(u, []).append(f"{why}\t{loc(d)}\t{kept_loc[k]}\n")
    for u in mine:  # the full list, per unit (written on the node that holds the unit's shards)
        path = removed_list_path(out, u)
        if u in listing:
            atomic_write_bytes(path, "".join(listing[u]).encode("utf-8"))
        else:
            path.unlink(missing_ok=True)
    return Drops(result, counts)

"""Tokenize documents into Megatron MMIDIDX shards: parallel, multi-node, resumable, deterministic.

Design (why the output is byte-identical for any ``--workers`` and any number of MPI ranks):

- The inputs are expanded into an ordered source list, then grouped into *units*: consecutive sources
  totalling about ``--unit-bytes`` on disk. An uncompressed JSON-lines or WikiExtractor file larger than
  ``--unit-bytes`` is cut into byte ranges of ``--unit-bytes``, one unit each, aligned to record
  boundaries by the reader (``readers.ReadRange``), so one 40 GB file spreads over all ranks and workers
  and resumes per range. Compressed files (.gz/.zst cannot seek), text files (one document each: a huge
  one is streamed in pieces anyway), parquet and hf: sources are never cut. The plan depends only on the
  inputs and ``--unit-bytes``, never on the worker or rank count.
- A unit is read in order, tokenized in batches by a pool of worker threads (or processes, for a
  SentencePiece that holds the GIL: ``resolve_backend``) with results consumed in submission order,
  and written to its own shards ``{split}/shard_{unit:05d}_{part:03d}``; a shard is closed when
  the next document would push it past ``--max-shard-bytes``. So every shard's bytes depend only on the
  unit's documents and the tokenizer.
- MPI ranks each take a deterministic subset of the units (largest first, to the least loaded rank);
  rank 0 gathers the unit records over MPI (no shared filesystem needed for it) and writes the manifest
  listing all shards in unit order.
- A finished unit writes ``.state/unit_NNNNN.json`` atomically after its shards are renamed into place.
  A rerun verifies each recorded shard's sha256 and keeps it, and redoes unfinished units from scratch;
  so kill -9 at any moment loses at most the units in flight.
- The train/valid split is by a hash of each document's text (``--valid-fraction``), so it too is
  independent of how the work was distributed.

Shards are per unit, so a different ``--unit-bytes`` gives different shard files, but the same documents
in the same order (the concatenated token stream is identical). Error locations are ``file:line``; a
range counts lines from its own start and the manifest adds the line counts of the file's earlier ranges.

Nothing is lost silently: every record read is either written or counted as skipped by reason. A document
streamed in pieces (longer than ``--max-doc-bytes``) that turns out bad after some pieces were written
(invalid UTF-8, a read error, a missing ``</doc>``) is rolled back from its shard and counted as skipped:
a document is written whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from . import mpi
from .indexed_dataset import IndexedDatasetWriter, optimal_dtype, sha256_file
from .manifest import MANIFEST_NAME, write_json_atomic
from .readers import (
    DOC,
    ERROR_REASONS,
    FINGERPRINT_METHODS,
    LAST,
    PART,
    SKIP,
    ReadOptions,
    ReadRange,
    Source,
    count_newlines,
    expand_inputs,
    fingerprint,
    splittable,
)
from .readers import iter_documents as _iter_documents
from .tokenizer import load_processor, tokenizer_info

FORMAT = "lmforge-shards-v1"
SPLITS = ("train", "valid")
MAX_EXAMPLES = 5
CONT = 4  # a leading piece of a text cut by split_exact: its tokens are prepended to the next item
CHUNK_CHARS = 16384


class PipelineError(RuntimeError):
    """A condition that stops the run with a clear message (bad input in fail mode, changed inputs)."""


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output bytes (worker and rank counts deliberately excluded)."""

    text_key: str = "text"
    format: str = "auto"
    strip_gutenberg: bool = False
    keep_empty: bool = False
    max_doc_bytes: int = 8 << 20
    max_line_bytes: int = 64 << 20
    append_eod: bool = True
    valid_fraction: float = 0.01
    max_shard_bytes: int = 1 << 30
    unit_bytes: int = 64 << 20

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            text_key=self.text_key,
            strip_gutenberg=self.strip_gutenberg,
            keep_empty=self.keep_empty,
            max_doc_bytes=self.max_doc_bytes,
            max_line_bytes=self.max_line_bytes,
        )


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
    backend: str = "auto"  # tokenizer workers: "thread", "process" or "auto" (see resolve_backend)


BACKENDS = ("auto", "thread", "process")
BACKEND_ENV = "LMFORGE_TOKENIZE_BACKEND"


def resolve_backend(backend: str = "auto") -> str:
    """Threads when SentencePiece releases the GIL while it encodes, else processes.

    Threads need no pickling of texts and ids between processes, no pool start-up and one copy of the
    model: ~5% faster end to end on 2 cores. SentencePiece releases the GIL around its C++ calls since
    its pybind11 wrapper (google/sentencepiece PRs #1251 and #1266, the latter adding
    ``return_type="numpy"``); the older SWIG wrapper holds it, and threads would then encode one at a
    time. So "auto" takes threads exactly when numpy output exists. ``$LMFORGE_TOKENIZE_BACKEND``
    overrides "auto". The output bytes never depend on the backend."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
    if backend not in BACKENDS:
        raise PipelineError(f"tokenizer backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        import sentencepiece as spm

        backend = "thread" if "return_type" in spm.SentencePieceProcessor.Encode.__code__.co_varnames else "process"
    return backend


# ---------------------------------------------------------------------------------------------------
# Planning


# (source index, start byte, end byte); end -1 = the whole source, read without a range.
Segment = tuple[int, int, int]


def plan_units(sources: list[Source], unit_bytes: int) -> list[list[Segment]]:
    """Group consecutive sources into units of about ``unit_bytes``; a splittable file larger than that
    becomes one unit per ``unit_bytes`` byte range, any other big file a unit alone."""
    units: list[list[Segment]] = []
    cur: list[Segment] = []
    size = 0
    for i, s in enumerate(sources):
        if s.size > unit_bytes and splittable(s):
            if cur:
                units.append(cur)
                cur, size = [], 0
            units.extend([(i, lo, min(lo + unit_bytes, s.size))] for lo in range(0, s.size, unit_bytes))
            continue
        if cur and size + s.size > unit_bytes:
            units.append(cur)
            cur, size = [], 0
        cur.append((i, 0, -1))
        size += max(s.size, 1)
    if cur:
        units.append(cur)
    return units


def _segment_bytes(sources: list[Source], seg: Segment) -> int:
    i, lo, hi = seg
    return max(sources[i].size if hi < 0 else hi - lo, 1)


def assign_units(unit_sizes: list[int], world: int) -> list[list[int]]:
    """Largest unit first to the least loaded rank; deterministic; each rank's list in unit order."""
    loads = [0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for u in sorted(range(len(unit_sizes)), key=lambda u: (-unit_sizes[u], u)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owned[r].append(u)
        loads[r] += unit_sizes[u]
    return [sorted(o) for o in owned]


def shard_prefix(split: str, unit: int, part: int) -> str:
    return f"{split}/shard_{unit:05d}_{part:03d}"


# ---------------------------------------------------------------------------------------------------
# Tokenizer workers

_SP = None
_DTYPE: np.dtype = np.dtype(np.uint16)
_THREADS = 1
_NUMPY_OUT = False


def _init_worker(model_path: str, dtype: str, threads: int) -> None:
    global _SP, _DTYPE, _THREADS, _NUMPY_OUT
    _SP = load_processor(model_path)
    _DTYPE, _THREADS = np.dtype(dtype), threads
    # SentencePiece >= 0.2.1 can return each text's ids as an int32 buffer wrapped in numpy: no Python
    # int per token to build and then convert (~7% of the tokenizing CPU here). Older versions: lists.
    try:
        _NUMPY_OUT = [list(a) for a in _SP.encode(["a b"], return_type="numpy", num_threads=1)] == _SP.encode(
            ["a b"], num_threads=1)
    except (TypeError, ValueError):
        _NUMPY_OUT = False


def _doc_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a batch -> (lengths, concatenated ids in the shard dtype)."""
    assert _SP is not None
    # num_threads explicitly: SentencePiece's default (-1) starts a thread per core in every worker.
    if _NUMPY_OUT:
        arrays = _SP.encode(texts, return_type="numpy", num_threads=_THREADS)
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(_DTYPE, copy=False) if arrays else np.zeros(0, _DTYPE)
        return lengths, flat
    ids = _SP.encode(texts, num_threads=_THREADS)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=_DTYPE, count=int(lengths.sum()))
    return lengths, flat


def _safe_space(text: str, i: int) -> bool:
    return 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()


def split_exact(text: str, chunk: int = CHUNK_CHARS) -> list[str]:
    """Cut a long text into pieces whose tokens, concatenated, equal the tokens of the whole text.

    Cuts are made only at a single space between two non-space characters, and that space is dropped:
    SentencePiece (split_by_whitespace, the default) never merges across the "▁" that starts a word,
    and its dummy prefix re-creates that "▁" at the start of the next piece. So
    ``sum(encode(pieces), []) == encode(text)``, verified on every document of the shared corpora with
    two tokenizers (tests/data_pipeline). Why bother: SentencePiece's BPE is superlinear in the input
    length (a whole book encodes ~2-3x slower than its paragraphs), and pieces let one huge document
    spread over all workers. Text without such spaces (e.g. Chinese) stays whole.
    """
    out = []
    start, n = 0, len(text)
    while n - start > chunk:
        lo, pos, cut = start + chunk // 2, start + chunk, -1
        while pos > lo:
            pos = text.rfind(" ", lo, pos)
            if pos < 0:
                break
            if _safe_space(text, pos):
                cut = pos
                break
        if cut < 0:  # none in the window: take the next safe space after it, if any
            pos = text.find(" ", start + chunk)
            while pos != -1 and not _safe_space(text, pos):
                pos = text.find(" ", pos + 1)
            if pos == -1:
                break
            cut = pos
        out.append(text[start:cut])
        start = cut + 1
    out.append(text[start:])
    return out


# ---------------------------------------------------------------------------------------------------
# Unit writer


@dataclass
class UnitRecord:
    unit: int
    segments: list[Segment]
    shards: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    records_read: int = 0
    documents_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    # For a byte-range unit: the lines it owned, and whether its example line numbers count from the
    # range start (made absolute in the manifest).
    range_lines: int = 0
    relative_lines: bool = False


class UnitWriter:
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

    def skip(self, reason: str, loc: str) -> None:
        if self.doc_writer is not None:
            # A SKIP instead of the LAST piece: the streamed document is abandoned; drop its pieces.
            self.tokens -= self.doc_writer.drop_open_document()
            self.doc_writer = None
        self.rec.records_read += 1
        self.rec.skipped[reason] = self.rec.skipped.get(reason, 0) + 1
        ex = self.rec.skip_examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(loc)

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
        self.rec.shards[split].append(
            {
                "prefix": shard_prefix(split, self.rec.unit, self.parts[split]),
                "documents": w.num_documents,
                "sequences": w.num_sequences,
                "tokens": w.num_tokens,
                "sha256_bin": sha256_file(f"{w.prefix}.bin"),
                "sha256_idx": sha256_file(f"{w.prefix}.idx"),
            }
        )
        self.parts[split] += 1

    def add(self, kind: int, tokens: np.ndarray, text_hash: int) -> None:
        eod = self.settings.append_eod
        if kind == DOC:
            split = "valid" if text_hash < self.valid_threshold else "train"
            if eod and len(tokens):
                tokens = np.concatenate((tokens, self.eod))
            w = self._writer(split, tokens.nbytes)
            w.add_document(tokens)
            self.rec.records_read += 1
            self.rec.documents_written += 1
            self.tokens += len(tokens)
            return
        # A document streamed in pieces: all pieces go to one shard as consecutive sequences of one
        # document; the split (and the shard) is decided at the first piece, by its hash.
        w = self.doc_writer
        if w is None:
            split = "valid" if text_hash < self.valid_threshold else "train"
            w = self.doc_writer = self._writer(split, tokens.nbytes)
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
            raise PipelineError(f"internal error: unit {self.rec.unit} ended inside a streamed document")
        for split in SPLITS:
            self._close(split)
        return self.rec

    def abort(self) -> None:
        for w in self.writers.values():
            if w is not None:
                w.abort()


# ---------------------------------------------------------------------------------------------------
# Run


def _fingerprints(sources: list[Source], method: str, comm, threads: int) -> list[str]:
    """Source fingerprints. "full" hashes whole files: rank r hashes sources r, r+K, ... on ``threads``
    threads (hashlib releases the GIL) and the results are shared, so K ranks read the corpus once
    between them. (Without a shared filesystem each node then checks only its share of its own copy.)"""
    if method == "sampled":
        return [fingerprint(s) for s in sources]
    from concurrent.futures import ThreadPoolExecutor

    mine = list(range(comm.rank, len(sources), comm.size))
    with ThreadPoolExecutor(max(1, threads)) as ex:
        local = dict(zip(mine, ex.map(lambda i: fingerprint(sources[i], method), mine)))
    merged: dict[int, str] = {}
    for part in comm.bcast(comm.gather(local, root=0), root=0):
        merged.update(part)
    return [merged[i] for i in range(len(sources))]


def _config(sources: list[Source], tok: dict, settings: Settings, prints: list[str], method: str) -> dict:
    return {
        "format": FORMAT,
        "tokenizer": {k: tok[k] for k in ("sha256", "vocab_size", "eos_id", "bos_id", "unk_id", "pad_id")},
        "dtype": optimal_dtype(tok["vocab_size"]).name,
        "fingerprint_method": method,
        "sources": [
            {"path": s.path, "format": s.format, "size": s.size, "fingerprint": fp} for s, fp in zip(sources, prints)
        ],
        "settings": asdict(settings),
    }


def _config_diff(old: dict, new: dict) -> str:
    if old.get("tokenizer") != new.get("tokenizer"):
        return "the tokenizer differs"
    if old.get("fingerprint_method") != new.get("fingerprint_method"):
        return (f"the fingerprint method differs ({old.get('fingerprint_method')} -> "
                f"{new.get('fingerprint_method')}; rerun with the original --fingerprint)")
    if old.get("settings") != new.get("settings"):
        keys = [k for k in new["settings"] if old.get("settings", {}).get(k) != new["settings"][k]]
        return f"settings differ ({', '.join(keys)})"
    olds, news = old.get("sources", []), new.get("sources", [])
    if len(olds) != len(news):
        return f"the number of input sources changed ({len(olds)} -> {len(news)})"
    for a, b in zip(olds, news):
        if a != b:
            return f"input {b['path']} changed (was {a['path']}, size {a['size']} -> {b['size']})"
    return "the configuration differs"


def _unit_state_path(out: Path, unit: int) -> Path:
    return out / ".state" / f"unit_{unit:05d}.json"


def _load_done_unit(out: Path, unit: int) -> dict | None:
    """A recorded unit whose shards all exist and match their checksums, else None."""
    p = _unit_state_path(out, unit)
    if not p.exists():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    for split in SPLITS:
        for sh in rec["shards"][split]:
            base = out / sh["prefix"]
            for ext, key in ((".bin", "sha256_bin"), (".idx", "sha256_idx")):
                f = Path(f"{base}{ext}")
                if not f.exists() or sha256_file(f) != sh[key]:
                    return None
    return rec


def _clean_unit(out: Path, unit: int) -> None:
    """Remove finished or temporary shard files of an unfinished unit (left by a killed run)."""
    for split in SPLITS:
        for f in (out / split).glob(f"shard_{unit:05d}_*"):
            f.unlink()
    for f in (out / ".state").glob(f".unit_{unit:05d}.json.tmp.*"):
        f.unlink()


def _absolute_loc(src: Source, rng: ReadRange | None, loc: str) -> str:
    """``file:line`` with the line counted from the file start (a range counts from its own start)."""
    if rng is None or rng.first_byte == 0:
        return loc
    path, _, line = loc.rpartition(":")
    return f"{path}:{count_newlines(src.path, rng.first_byte) + int(line)}"


def _batches(
    sources: list[Source], segments: list[Segment], settings: Settings, run: RunOptions, progress,
    ranges: list[ReadRange],
) -> Iterator[tuple[list[tuple[int, str, str, int]], list[str]]]:
    """Yield (metas, texts): metas are (kind, skip reason or "", loc, text hash) in input order, with one
    text per non-SKIP meta. Hashing happens here, on the whole document, before any cutting. The
    ``ReadRange`` of each byte-range segment is appended to ``ranges`` (its line count is final once
    the generator is exhausted)."""
    opts = settings.read_options()
    limit = run.batch_chars
    metas: list[tuple[int, str, str, int]] = []
    texts: list[str] = []
    chars = 0
    for si, lo, hi in segments:
        src = sources[si]
        rng = ReadRange(lo, hi) if hi >= 0 else None
        if rng is not None:
            ranges.append(rng)
        counted = 0
        for kind, text, loc in _iter_documents(src, opts, rng):
            if kind != SKIP:
                try:
                    h = _doc_hash(text.encode("utf-8"))
                except UnicodeEncodeError:  # lone surrogates from a JSON "\ud800" escape
                    if kind != DOC:  # part of a streamed document: cannot drop just a piece
                        raise PipelineError(f"{loc}: unencodable text inside a streamed document") from None
                    kind, text = SKIP, "unencodable_text"
            if kind == SKIP:
                if run.on_error == "fail" and text in ERROR_REASONS:
                    raise PipelineError(f"{_absolute_loc(src, rng, loc)}: {text} (--on-error fail)")
                metas.append((SKIP, text, loc, 0))
                continue
            n = len(text)
            pieces = split_exact(text) if n > CHUNK_CHARS else [text]
            # A long document's pieces may straddle batches (the consumer carries CONT tokens over), so
            # one book does not make one worker's batch while the others idle.
            for piece in pieces[:-1]:
                metas.append((CONT, "", loc, 0))
                texts.append(piece)
                chars += len(piece)
                if chars >= limit:
                    yield metas, texts
                    metas, texts, chars = [], [], 0
            metas.append((kind, "", loc, h))
            texts.append(pieces[-1])
            chars += len(pieces[-1])
            text = pieces = None  # not held while the reader assembles the next document
            if progress is not None:
                progress.update(n)
                counted += n
                limit = progress.batch_limit(run.batch_chars, run.workers)
            if chars >= limit or len(texts) >= 8192:
                yield metas, texts
                metas, texts, chars = [], [], 0
        seg_bytes = _segment_bytes(sources, (si, lo, hi))
        if progress is not None and seg_bytes > counted:
            progress.update(seg_bytes - counted)  # markup, skipped records, compression
    if metas:
        yield metas, texts


class _Progress:
    """tqdm over input bytes (MB/s, ETA) with docs/s and tokens/s in the postfix."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                            file=sys.stderr, smoothing=0.1, mininterval=0.5)
        self.t0 = time.perf_counter()
        self.docs = 0
        self.tokens = 0
        self.total, self.done = total, 0

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def batch_limit(self, batch_chars: int, workers: int) -> int:
        """Batches grow from 32K characters (no bigger than what was read so far: every worker gets work
        soon after start) and shrink as the input runs out (to 1/(2 workers) of what is left), so that
        the workers finish together instead of one idling while another encodes a full last batch.
        (Batching never changes the output.)"""
        return min(batch_chars, max(32768, min(self.done, (self.total - self.done) // (2 * workers))))

    def count(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt / 1e6:.2f} M tok/s",
                                     refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _ThreadPool:
    """The part of ``multiprocessing.Pool``'s interface used here, on threads of this process (for a
    SentencePiece that releases the GIL while it encodes: see ``resolve_backend``)."""

    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.ex = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")

    def apply_async(self, fn, args):
        fut = self.ex.submit(fn, *args)
        fut.get = fut.result  # type: ignore[attr-defined]
        return fut

    def terminate(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)

    def join(self) -> None:
        pass


def _process_units(
    out: Path, sources: list[Source], units: list[list[Segment]], mine: list[int], settings: Settings,
    run: RunOptions, model_path: str, tok: dict, rank: int,
) -> tuple[list[dict], dict]:
    dtype = optimal_dtype(tok["vocab_size"])
    done: dict[int, dict] = {}
    todo: list[int] = []
    for u in mine:
        rec = _load_done_unit(out, u)
        if rec is not None:
            done[u] = rec
        else:
            _clean_unit(out, u)
            todo.append(u)
    if done:
        print(f"[rank {rank}] resuming: {len(done)} unit(s) verified and kept, {len(todo)} to do",
              file=sys.stderr)
    total = sum(_segment_bytes(sources, seg) for u in todo for seg in units[u])
    progress = _Progress(total, run.progress and bool(todo), f"tokenize[r{rank}]" if rank else "tokenize")
    stats = {"tokens": 0, "documents": 0, "bytes": total}

    pool = None
    backend = resolve_backend(run.backend) if run.workers > 1 and todo else "inline"
    if backend == "process":
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ctx.Pool(run.workers, initializer=_init_worker,
                        initargs=(model_path, dtype.name, run.threads_per_worker))
    else:
        _init_worker(model_path, dtype.name, run.threads_per_worker)
        if backend == "thread":
            pool = _ThreadPool(run.workers)
    max_inflight = 2 * run.workers + 2  # bounded read-ahead: memory does not grow with the corpus
    inflight: deque = deque()

    pending: list[np.ndarray] = []  # tokens of CONT pieces waiting for the rest of their text

    def consume(writer: UnitWriter, metas, result) -> None:
        lengths, flat = result.get() if pool is not None else result
        offs = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offs[1:])
        ti = 0
        docs = 0
        for kind, reason, loc, h in metas:
            if kind == SKIP:
                writer.skip(reason, loc)
                continue
            toks = flat[offs[ti] : offs[ti + 1]]
            ti += 1
            if kind == CONT:
                pending.append(toks)
                continue
            if pending:
                toks = np.concatenate((*pending, toks))
                pending.clear()
            writer.add(kind, toks, h)
            docs += kind != PART
        progress.count(docs, int(offs[-1]))

    def drain_one() -> None:
        writer, metas, result, last = inflight.popleft()
        if metas is not None:
            consume(writer, metas, result)
        if last:
            rec = asdict(writer.finish())
            write_json_atomic(_unit_state_path(out, rec["unit"]), rec)
            done[rec["unit"]] = rec

    writer = None
    try:
        for u in todo:
            writer = UnitWriter(out, u, units[u], settings, dtype, tok["eos_id"])
            ranges: list[ReadRange] = []
            for metas, texts in _batches(sources, units[u], settings, run, progress, ranges):
                res = pool.apply_async(encode_batch, (texts,)) if pool is not None else encode_batch(texts)
                inflight.append((writer, metas, res, False))
                while len(inflight) > max_inflight:
                    drain_one()
            if ranges:  # a byte-range unit (always alone in its unit)
                writer.rec.range_lines = ranges[0].lines
                writer.rec.relative_lines = ranges[0].start > 0
            inflight.append((writer, None, None, True))
        while inflight:
            drain_one()
    except BaseException:
        for w, *_ in inflight:
            w.abort()
        if writer is not None:
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        progress.close()
    stats.update(tokens=progress.tokens, documents=progress.docs, seconds=time.perf_counter() - progress.t0)
    return [done[u] for u in sorted(done)], stats


def _absolute_examples(unit_records: list[dict]) -> None:
    """Rewrite the range-relative ``file:line`` examples of byte-range units to file lines, adding the
    line counts of the same file's earlier ranges (``unit_records`` sorted by unit)."""
    base: dict[int, int] = {}
    for rec in unit_records:
        segs = rec["segments"]
        if len(segs) != 1 or segs[0][2] < 0:
            continue
        src = segs[0][0]
        b = base.get(src, 0) if rec["relative_lines"] else 0
        if b:
            for reason, locs in rec["skip_examples"].items():
                rec["skip_examples"][reason] = [
                    f"{p}:{b + int(n)}" for p, _, n in (loc.rpartition(":") for loc in locs)]
        base[src] = b + rec["range_lines"]


def _assemble_manifest(config: dict, unit_records: list[dict], tok_path: str) -> dict:
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    read = written = 0
    unit_records = sorted(unit_records, key=lambda r: r["unit"])
    _absolute_examples(unit_records)
    for rec in unit_records:
        for s in SPLITS:
            splits[s].extend(rec["shards"][s])
        read += rec["records_read"]
        written += rec["documents_written"]
        for reason, n in rec["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
            ex = examples.setdefault(reason, [])
            ex.extend(rec["skip_examples"][reason][: MAX_EXAMPLES - len(ex)])
    totals = {
        s: {
            "shards": len(splits[s]),
            "documents": sum(x["documents"] for x in splits[s]),
            "tokens": sum(x["tokens"] for x in splits[s]),
        }
        for s in SPLITS
    }
    return {
        "format": FORMAT,
        "tokenizer": {**config["tokenizer"], "file": "tokenizer.model", "source_path": tok_path},
        "dtype": config["dtype"],
        "fingerprint_method": config["fingerprint_method"],
        "splits": splits,
        "totals": totals,
        "records": {"read": read, "written": written, "skipped": sum(skipped.values())},
        "skipped": dict(sorted(skipped.items())),
        "skip_examples": dict(sorted(examples.items())),
        "sources": config["sources"],
        "settings": config["settings"],
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
    }


def preprocess(
    inputs: list[str], model_path: str, output: str, settings: Settings, run: RunOptions
) -> dict | None:
    """Run (or resume) a preprocessing job; returns the manifest on rank 0, None elsewhere."""
    if run.on_error not in ("skip", "fail"):
        raise PipelineError(f"--on-error must be skip or fail, not {run.on_error!r}")
    resolve_backend(run.backend)  # a bad value fails here, before any work
    if run.fingerprint not in FINGERPRINT_METHODS:
        raise PipelineError(f"--fingerprint must be one of {', '.join(FINGERPRINT_METHODS)}")
    comm = mpi.world()
    rank, world = comm.rank, comm.size
    out = Path(output)
    sources = expand_inputs(inputs, settings.format)
    tok = tokenizer_info(model_path)
    prints = _fingerprints(sources, run.fingerprint, comm, run.workers)
    config = _config(sources, tok, settings, prints, run.fingerprint)
    state = out / ".state" / "config.json"
    if run.overwrite:  # every rank: nodes without a shared filesystem have their own copies
        for name in (*SPLITS, ".state"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (MANIFEST_NAME, "tokenizer.model"):
            (out / name).unlink(missing_ok=True)
    comm.barrier()
    if state.exists():
        old = json.loads(state.read_text())
        if old != config:
            raise PipelineError(
                f"{out} holds output of a different job: {_config_diff(old, config)}. "
                "Use a new --output directory or pass --overwrite to replace it."
            )
    elif (out / MANIFEST_NAME).exists():
        raise PipelineError(f"{out} holds a manifest from another job; pass --overwrite to replace it")
    # Temporary files of a killed run (unit files are cleaned per unit later). Before the barrier,
    # so that no rank deletes a file another rank is writing.
    for pattern in (".manifest.json.tmp.*", ".tokenizer.model.tmp.*", ".state/.config.json.tmp.*"):
        for f in out.glob(pattern):
            f.unlink(missing_ok=True)
    comm.barrier()  # every rank has compared before anyone writes
    if rank == 0 or not state.exists():
        write_json_atomic(state, config)  # each node of a cluster without a shared filesystem needs it

    units = plan_units(sources, settings.unit_bytes)
    sizes = [sum(_segment_bytes(sources, seg) for seg in u) for u in units]
    mine = assign_units(sizes, world)[rank]
    err: BaseException | None = None
    try:
        records, stats = _process_units(out, sources, units, mine, settings, run, model_path, tok, rank)
    except BaseException as e:  # report on every rank instead of hanging the others in gather
        err, records, stats = e, [], {}
    failures = comm.gather(None if err is None else f"rank {rank}: {err}", root=0)
    gathered = comm.gather(records, root=0)
    all_stats = comm.gather(stats, root=0)
    if err is not None:
        raise err
    if rank != 0:
        comm.barrier()
        return None
    bad = [f for f in failures if f]
    if bad:
        comm.barrier()
        raise PipelineError("; ".join(bad))
    unit_records = [r for rs in gathered for r in rs]
    if len(unit_records) != len(units):
        comm.barrier()
        raise PipelineError(f"internal error: {len(unit_records)} unit records for {len(units)} units")
    manifest = _assemble_manifest(config, unit_records, model_path)
    dst = out / "tokenizer.model"
    if not dst.exists() or sha256_file(dst) != tok["sha256"]:
        tmp = out / f".tokenizer.model.tmp.{os.getpid()}"
        shutil.copyfile(model_path, tmp)
        os.replace(tmp, dst)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    comm.barrier()
    seconds = max((s.get("seconds", 0.0) for s in all_stats), default=0.0)
    manifest_stats = {
        "seconds": seconds,
        "tokens_processed": sum(s.get("tokens", 0) for s in all_stats),
        "documents_processed": sum(s.get("documents", 0) for s in all_stats),
        "ranks": world,
        "workers_per_rank": run.workers,
    }
    return {**manifest, "_run": manifest_stats}

"""``preprocess()``: one run from inputs to manifest, on one process or across MPI ranks.

In order: expand and fingerprint the inputs, check the output directory against the recorded
configuration (a resumable job refuses changed inputs or settings), plan the units and take this rank's
share, process each unfinished unit (read -> batches -> tokenizer workers -> ``UnitWriter``, results
consumed in submission order), then rank 0 gathers every unit's record over MPI (no shared filesystem
needed for it) and writes the manifest.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lmforge.common.files import atomic_write_json, remove_temp_files
from lmforge.common.launch_env import mpi_world
from lmforge.common.tokenizer_files import (
    COMPANIONS,
    HF_FILE,
    SENTENCEPIECE,
    SP_FILE,
    TokenizerFiles,
    resolve_tokenizer,
)

from .. import hf_tokenizer
from ..indexed_dataset import optimal_dtype
from ..manifest import FORMAT, MANIFEST_NAME, SPLITS, assemble, write_manifest
from ..readers import (
    DOC,
    ERROR_REASONS,
    FINGERPRINT_METHODS,
    LAST,
    PART,
    SKIP,
    ReadRange,
    Source,
    StreamPool,
    count_newlines,
    expand_inputs,
    fingerprint,
    iter_documents,
    uses_stream_pool,
)
from ..tokenizer import copy_tokenizer, tokenizer_info
from . import dedup, quality
from .dedup import screen
from .encode import CHUNK_CHARS, CONT, Encoded, EncodePool, resolve_backend, split_exact
from .plan import Segment, assign_units, plan_units, segment_bytes, unit_bytes_of
from .settings import PipelineError, RunOptions, Settings
from .writer import (
    FILTERED_DIR,
    UnitWriter,
    clean_unit,
    line_info,
    load_done_unit,
    save_done_unit,
    write_filtered_lists,
)

# (kind, skip reason or "", loc, hash of the whole document's text); kinds are the readers' plus CONT.
# A SKIP's last field is instead the location of the document it duplicates ("" if none or not known), or for
# a quality rule's removal what the rule measured (listed in OUT/filtered/, ``writer``).
Meta = tuple[int, str, str, int | str]
_MAX_BATCH_TEXTS = 8192

# --------------------------------------------------------------------------------------------------
# Configuration: what the output depends on, recorded in .state/config.json and checked on a rerun


def _fingerprints(sources: list[Source], method: str, comm, threads: int) -> list[str]:
    """Source fingerprints. "full" hashes whole files: rank r hashes sources r, r+K, ... on ``threads``
    threads (hashlib releases the GIL) and the results are shared, so K ranks read the corpus once
    between them. (Without a shared filesystem each node then checks only its share of its own copy.)"""
    if method == "sampled":
        return [fingerprint(s) for s in sources]
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
        "sources": [_source_record(s, fp) for s, fp in zip(sources, prints)],
        "settings": _settings_record(settings),
    }


def _source_record(s: Source, fp: str) -> dict:
    """A source as recorded; an hf: shard also names its data file when it has one (other sources keep
    the record of earlier versions, so their outputs stay resumable)."""
    rec = {"path": s.path, "format": s.format, "size": s.size, "fingerprint": fp}
    if s.file:
        rec["file"] = s.file
    return rec


def _settings_record(settings: Settings) -> dict:
    """The settings as recorded (JSON types). The quality filters (and ``--eod-token``, ``--no-titles``) appear
    only when used, so outputs made before they existed (and every run without them) keep the same record and
    stay resumable."""
    d = asdict(settings)
    for key, off in (("filters", ()), ("min_tokens", 0), ("dedup", ()), ("eod_token", None), ("titles", True)):
        if d[key] == off:
            del d[key]
    for key in ("filters", "dedup"):
        if key in d:
            d[key] = list(d[key])
    if "filters" in d:  # what the rules measure changed with their version (quality.py)
        d["filters_version"] = quality.VERSION
    if "minhash" in settings.dedup:  # signatures depend on the library's algorithm version
        d["minhash_algorithm"] = dedup.algorithm_record(settings)
    else:
        for key in ("minhash_ngram", "minhash_bands", "minhash_rows"):
            del d[key]
    return d


def _config_diff(old: dict, new: dict) -> str:
    if old.get("tokenizer") != new.get("tokenizer"):
        return "the tokenizer differs"
    if old.get("fingerprint_method") != new.get("fingerprint_method"):
        return (f"the fingerprint method differs ({old.get('fingerprint_method')} -> "
                f"{new.get('fingerprint_method')}; rerun with the original --fingerprint)")
    if old.get("settings") != new.get("settings"):
        was, now = old.get("settings") or {}, new["settings"]
        keys = [k for k in {**now, **was} if was.get(k) != now.get(k)]  # (a setting at its default is not recorded)
        return f"settings differ ({', '.join(keys)})"
    olds, news = old.get("sources", []), new.get("sources", [])
    if len(olds) != len(news):
        return f"the number of input sources changed ({len(olds)} -> {len(news)})"
    for a, b in zip(olds, news):
        if a != b:
            return f"input {b['path']} changed (was {a['path']}, size {a['size']} -> {b['size']})"
    return "the configuration differs"


_ASIDE = ".overwritten."  # OUT/.overwritten.RANK.PID/: the old output of an --overwrite, being deleted

# The tokenizer copies preprocess may have left in an output directory (either kind).
_TOKENIZER_NAMES = (SP_FILE, HF_FILE, *COMPANIONS)


def _claim_output(out: Path, config: dict, overwrite: bool, comm, tokenizer: TokenizerFiles) -> None:
    """Make ``out`` this job's: emptied with ``overwrite``, else refused if it holds another job's output;
    temporary files of a killed run removed; ``.state/config.json`` written. ``tokenizer``'s own files
    are never removed (a --tokenizer that names a file in the output directory)."""
    state = out / ".state" / "config.json"
    own = {p.resolve() for p, _ in tokenizer.all_files()}
    # What an earlier --overwrite renamed aside and was killed before deleting: remove it now.
    for old in out.glob(f"{_ASIDE}*"):
        shutil.rmtree(old, ignore_errors=True)
    if overwrite:  # every rank: nodes without a shared filesystem have their own copies
        # Renamed aside first (one atomic rename each), then deleted: a kill in between leaves the old state
        # out of the way, never half of it (a .state without its config.json would be taken for a new job's).
        aside = out / f"{_ASIDE}{comm.rank}.{os.getpid()}"
        for name in (".state", *SPLITS, dedup.LIST_DIR, FILTERED_DIR):
            if (out / name).exists():
                aside.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(out / name, aside / name)
                except FileNotFoundError:  # another rank of a shared filesystem moved it first
                    pass
        shutil.rmtree(aside, ignore_errors=True)
        for name in (MANIFEST_NAME, *_TOKENIZER_NAMES):
            if (out / name).resolve() not in own:
                (out / name).unlink(missing_ok=True)
    comm.barrier()
    if state.exists():
        try:
            old = json.loads(state.read_text())
        except ValueError as e:
            raise PipelineError(f"{state}: unreadable ({e}); pass --overwrite to start again") from None
        if old != config:
            raise PipelineError(
                f"{out} holds output of a different job: {_config_diff(old, config)}. "
                "Use a new --output directory or pass --overwrite to replace it."
            )
    elif (out / MANIFEST_NAME).exists():
        raise PipelineError(f"{out} holds a manifest from another job; pass --overwrite to replace it")
    # Temporary files of a killed run (unit files are cleaned per unit later). Before the barrier,
    # so that no rank deletes a file another rank is writing.
    for name in (MANIFEST_NAME, *_TOKENIZER_NAMES):
        remove_temp_files(out, name)
    remove_temp_files(state.parent, state.name)
    comm.barrier()  # every rank has compared before anyone writes
    if comm.rank == 0 or not state.exists():
        atomic_write_json(state, config, indent=1)  # each node of a cluster without a shared filesystem needs it


# --------------------------------------------------------------------------------------------------
# Reading into batches


def _absolute_loc(src: Source, rng: ReadRange | None, loc: str) -> str:
    """``file:line`` with the line counted from the file start (a text range counts from its own start; a
    parquet range's rows already count from the file start)."""
    if rng is None or rng.absolute or rng.first_byte == 0:
        return loc
    path, _, line = loc.rpartition(":")
    return f"{path}:{count_newlines(src.path, rng.first_byte) + int(line)}"


def _batches(
    sources: list[Source], segments: list[Segment], settings: Settings, run: RunOptions, progress: _Progress,
    ranges: list[ReadRange], drops: dict[int, tuple[str, str]] | None = None,
    split: Callable[[str], list[str]] | None = split_exact, found: dict[str, int] | None = None,
    streamed: list[int] | None = None, streams: StreamPool | None = None,
) -> Iterator[tuple[list[Meta], list[str]]]:
    """Yield (metas, texts): one meta per item in input order, with one text per non-SKIP meta. Hashing
    happens here, on the whole document, before any cutting (by ``split``: ``_exact_split``). The
    ``ReadRange`` of each byte-range segment is appended to ``ranges`` (its line count is final once the
    generator is exhausted). ``drops`` maps the unit's duplicate candidates (``dedup``) to (reason, kept
    document's location): a whole document, or one streamed in pieces (numbered when its last piece
    arrives, as in the scan; its pieces are not passed on when it is a duplicate). ``found`` counts the
    documents read per source (index as a string), ``streamed[0]`` the streamed candidates. ``streams``: the
    processes converting a MediaWiki dump's bz2 streams (``readers.StreamPool``)."""
    opts = settings.read_options()
    candidate = 0
    in_stream = False  # inside a document streamed in pieces
    stream_dup: tuple[str, str] | None = None  # what the streamed document in progress duplicates
    limit = run.batch_chars
    metas: list[Meta] = []
    texts: list[str] = []
    chars = 0
    for si, lo, hi in segments:
        src = sources[si]
        rng = ReadRange(lo, hi) if hi >= 0 else None
        if rng is not None:
            ranges.append(rng)
        counted = 0
        if found is not None:
            found.setdefault(str(si), 0)
        for kind, text, loc in iter_documents(src, opts, rng, streams):
            kind, text, h = screen(kind, text, loc, settings.filters)
            if kind == DOC and drops is not None:  # a deduplication candidate (numbered as in the scan)
                dup = drops.get(candidate)
                candidate += 1
                if dup is not None:
                    metas.append((SKIP, dup[0], loc, dup[1]))
                    continue
            elif kind in (PART, LAST) and drops is not None:  # a streamed candidate, complete at LAST
                if not in_stream:  # its first piece: the number it gets if it completes
                    in_stream, stream_dup = True, drops.get(candidate)
                if kind == LAST:
                    in_stream = False
                    candidate += 1
                    if streamed is not None:
                        streamed[0] += 1
                if stream_dup is not None:  # a duplicate: its pieces are read, not written
                    progress.update(len(text))
                    counted += len(text)
                    if kind == LAST:
                        metas.append((SKIP, stream_dup[0], loc, stream_dup[1]))
                        stream_dup = None
                    continue
            elif kind == SKIP and in_stream:  # instead of the LAST piece: not a candidate (as in the scan)
                in_stream, stream_dup = False, None
            if kind == SKIP:
                if run.on_error == "fail" and text in ERROR_REASONS:
                    raise PipelineError(f"{_absolute_loc(src, rng, loc)}: {text} (--on-error fail)")
                metas.append((SKIP, text, loc, h or ""))
                continue
            n = len(text)
            pieces = split(text) if split is not None and n > CHUNK_CHARS else [text]
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
            if found is not None and kind != PART:  # a document, or the last piece of a streamed one
                found[str(si)] += 1
            texts.append(pieces[-1])
            chars += len(pieces[-1])
            text = pieces = None  # not held while the reader assembles the next document
            progress.update(n)
            counted += n
            limit = progress.batch_limit(run.batch_chars, run.workers)
            if chars >= limit or len(texts) >= _MAX_BATCH_TEXTS:
                yield metas, texts
                metas, texts, chars = [], [], 0
        seg_bytes = segment_bytes(sources, (si, lo, hi))
        if seg_bytes > counted:
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
        When the estimate has run out (hf: shards of unknown size, parquet whose text outgrows its
        compressed bytes), batches grow as at the start instead of staying at the 32K floor: batches that
        small cost nearly half the throughput. (Batching never changes the output.)"""
        left = self.total - self.done
        if left <= 0:
            return min(batch_chars, max(32768, self.done))
        return min(batch_chars, max(32768, min(self.done, left // (2 * workers))))

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


# --------------------------------------------------------------------------------------------------
# Processing this rank's units


def _write_batch(writer: UnitWriter, metas: list[Meta], encoded: Encoded, pending: list[np.ndarray],
                 min_tokens: int = 0) -> int:
    """Hand one encoded batch to its unit's writer; returns the documents completed. ``pending`` holds
    the tokens of CONT pieces until the rest of their text arrives (possibly in a later batch)."""
    lengths, flat = encoded
    offs = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offs[1:])
    ti = 0
    docs = 0
    for kind, reason, loc, h in metas:
        if kind == SKIP:
            writer.skip(reason, loc, h)
            continue
        toks = flat[offs[ti] : offs[ti + 1]]
        ti += 1
        if kind == CONT:
            pending.append(toks)
            continue
        if pending:
            toks = np.concatenate((*pending, toks))
            pending.clear()
        if kind == DOC and len(toks) < min_tokens:
            writer.skip("filter-min_tokens", loc, f"tokens={len(toks)}")
            continue
        writer.add(kind, toks, h)
        docs += kind != PART
    return docs


def _exact_split(tokenizer: TokenizerFiles) -> Callable[[str], list[str]] | None:
    """How long texts are cut without changing their tokens (``split_exact``): at spaces, dropped for
    SentencePiece, kept for the Hugging Face tokenizers whose pre-tokenizer begins a word there; other
    Hugging Face tokenizers get their texts whole."""
    if tokenizer.kind == SENTENCEPIECE:
        return split_exact
    if hf_tokenizer.cuts_before_spaces(tokenizer.path):
        return functools.partial(split_exact, keep_space=True)
    return None


def _resume(out: Path, mine: list[int], rank: int, settings: Settings, units: list[list[Segment]]
            ) -> tuple[dict[int, dict], list[int]]:
    """(records of this rank's units finished by an earlier run, kept; the units still to do, cleaned)."""
    done: dict[int, dict] = {}
    todo: list[int] = []
    for u in mine:
        rec = load_done_unit(out, u, settings, log=lambda m: print(f"[rank {rank}] {m}", file=sys.stderr),
                             segments=units[u])
        if rec is not None:
            done[u] = rec
        else:
            clean_unit(out, u)
            todo.append(u)
    if done:
        print(f"[rank {rank}] resuming: {len(done)} unit(s) verified and kept, {len(todo)} to do",
              file=sys.stderr)
    return done, todo


def _process_units(
    out: Path, sources: list[Source], units: list[list[Segment]], mine: list[int], settings: Settings,
    run: RunOptions, tokenizer: TokenizerFiles, tok: dict, rank: int, drops: dedup.Drops | None = None,
) -> tuple[list[dict], dict]:
    """Do this rank's unfinished units; returns the records of all its units and the run's statistics. With
    ``run.workers`` > 1 and a MediaWiki ``.bz2`` dump among them, as many processes convert the dump's streams
    (``readers.StreamPool``, started before the tokenizer's threads or processes) beside the tokenizer workers:
    a core converts ~1.5 MB/s of text out of a dump and tokenizes about twice that, so the tokenizer workers
    mostly wait for text and the two share the cores."""
    done, todo = _resume(out, mine, rank, settings, units)
    streams = None
    if run.workers > 1 and any(uses_stream_pool(sources[si]) for u in todo for si, _, _ in units[u]):
        streams = StreamPool(run.workers)
    try:
        result = _do_units(out, sources, units, settings, run, tokenizer, tok, rank, drops, done, todo, streams)
    finally:
        if streams is not None:
            streams.close()
    if streams is not None:  # one line: where the dump's streams were converted
        here = f", {streams.here:,} read in the main process" if streams.here else ""
        print(f"[rank {rank}] mediawiki: {streams.converted:,} bz2 stream(s) converted on {streams.workers} "
              f"processes{here}", file=sys.stderr)
    return result


def _do_units(
    out: Path, sources: list[Source], units: list[list[Segment]], settings: Settings, run: RunOptions,
    tokenizer: TokenizerFiles, tok: dict, rank: int, drops: dedup.Drops | None, done: dict[int, dict],
    todo: list[int], streams: StreamPool | None,
) -> tuple[list[dict], dict]:
    dtype = optimal_dtype(tok["vocab_size"])
    total = sum(unit_bytes_of(sources, units[u]) for u in todo)
    progress = _Progress(total, run.progress and bool(todo), f"tokenize[r{rank}]" if rank else "tokenize")
    backend = resolve_backend(run.backend, tokenizer.kind) if run.workers > 1 and todo else "inline"
    pool = EncodePool(backend, run.workers, tokenizer, dtype, run.threads_per_worker)
    split = _exact_split(tokenizer)
    max_inflight = 2 * run.workers + 2  # bounded read-ahead: memory does not grow with the corpus
    # (writer, metas, result) per submitted batch; (writer, None, None) marks the end of its unit.
    inflight: deque[tuple[UnitWriter, list[Meta] | None, Callable[[], Encoded] | None]] = deque()
    pending: list[np.ndarray] = []

    def drain_one() -> None:
        writer, metas, result = inflight.popleft()
        if metas is None:
            done[writer.rec.unit] = save_done_unit(out, writer.finish(), settings)
            return
        assert result is not None
        encoded = result()
        progress.count(_write_batch(writer, metas, encoded, pending, settings.min_tokens), int(encoded[0].sum()))

    writer = None
    try:
        for u in todo:
            writer = UnitWriter(out, u, units[u], settings, dtype, tok["eos_id"])
            ranges: list[ReadRange] = []
            streamed = [0]
            unit_drops = None if drops is None else drops.by_unit.get(u, {})
            for metas, texts in _batches(sources, units[u], settings, run, progress, ranges, unit_drops, split,
                                         writer.rec.documents_by_source, streamed, streams):
                inflight.append((writer, metas, pool.submit(texts)))
                while len(inflight) > max_inflight:
                    drain_one()
            if ranges:  # a byte-range unit (always alone in its unit)
                writer.rec.range_lines = ranges[0].lines
                writer.rec.relative_lines = ranges[0].start > 0 and not ranges[0].absolute
            if drops is not None:
                writer.rec.streamed_candidates = streamed[0]
            inflight.append((writer, None, None))
        while inflight:
            drain_one()
    except BaseException:
        for w, *_ in inflight:
            w.abort()
        if writer is not None:
            writer.abort()
        raise
    finally:
        pool.close()
        progress.close()
    stats = {"tokens": progress.tokens, "documents": progress.docs, "bytes": total,
             "seconds": time.perf_counter() - progress.t0}
    return [done[u] for u in sorted(done)], stats


# --------------------------------------------------------------------------------------------------
# The run

# Testing hook: LMFORGE_INJECT_FINISH_PAUSE=SECONDS pauses every rank that long before each step of the run's last
# phase (after its units are done: the lists of filtered documents, the tokenizer copy, the manifest), which takes
# ~10 ms otherwise, so that a kill -9 can land inside it (tests/data_pipeline/test_dedup.py). Output unchanged.
FINISH_PAUSE_ENV = "LMFORGE_INJECT_FINISH_PAUSE"


def _finish_pause() -> None:
    if os.environ.get(FINISH_PAUSE_ENV):
        time.sleep(float(os.environ[FINISH_PAUSE_ENV]))


def preprocess(
    inputs: list[str], model_path: str, output: str, settings: Settings, run: RunOptions
) -> dict | None:
    """Run (or resume) a preprocessing job; returns the manifest on rank 0, None elsewhere."""
    if run.on_error not in ("skip", "fail"):
        raise PipelineError(f"--on-error must be skip or fail, not {run.on_error!r}")
    resolve_backend(run.backend)  # a bad value fails here, before any work
    if run.fingerprint not in FINGERPRINT_METHODS:
        raise PipelineError(f"--fingerprint must be one of {', '.join(FINGERPRINT_METHODS)}")
    comm = mpi_world()
    out = Path(output)
    sources = expand_inputs(inputs, settings.format, run.wiki_indexes)
    tokenizer = resolve_tokenizer(model_path)
    tok = tokenizer_info(tokenizer, settings.eod_token)
    if settings.append_eod and tok["eos_id"] < 0:
        raise PipelineError(f"{tokenizer.path}: no end-of-document token (the tokenizer has no eos); pass "
                            "--eod-token TOKEN, or --no-eod to write documents without one")
    if comm.rank == 0 and settings.append_eod:
        print(f"end of document: {tok['eod_token']!r} (id {tok['eos_id']}), from {tok['eod_source']}",
              file=sys.stderr)
    prints = _fingerprints(sources, run.fingerprint, comm, run.workers)
    config = _config(sources, tok, settings, prints, run.fingerprint)
    _claim_output(out, config, run.overwrite, comm, tokenizer)

    units = plan_units(sources, settings.unit_bytes)
    assignment = assign_units([unit_bytes_of(sources, u) for u in units], comm.size)
    mine = assignment[comm.rank]
    drops = _find_duplicates(out, sources, units, assignment, settings, run, comm) if settings.dedup else None
    err: BaseException | None = None
    try:
        records, stats = _process_units(out, sources, units, mine, settings, run, tokenizer, tok, comm.rank,
                                        drops)
    except BaseException as e:  # report on every rank instead of hanging the others in gather
        err, records, stats = e, [], {}
    # The lists of filtered documents need every unit's line counts (byte ranges): shared by all ranks.
    every_unit = [u for us in comm.allgather([line_info(r) for r in records]) for u in us]
    if err is None:
        try:
            _finish_pause()
            write_filtered_lists(out, records, every_unit)
        except BaseException as e:
            err = e
    failures = comm.gather(None if err is None else f"rank {comm.rank}: {err}", root=0)
    gathered = comm.gather(records, root=0)
    all_stats = comm.gather(stats, root=0)
    try:
        if err is not None:
            raise err
        if comm.rank != 0:
            return None
        bad = [f for f in failures if f]
        if bad:
            raise PipelineError("; ".join(bad))
        unit_records = [r for rs in gathered for r in rs]
        if len(unit_records) != len(units):
            raise RuntimeError(f"{len(unit_records)} unit records for {len(units)} units (a bug)")
        manifest = assemble(config, unit_records, model_path, tokenizer.name,
                            eod={"eod_token": tok["eod_token"], "eod_source": tok["eod_source"]})
        if manifest["records"]["written"] == 0:
            raise PipelineError(nothing_written(manifest))
        for path in files_without_documents(sources, unit_records):
            print(f"warning: {path}: no document read from it (its records were skipped; the manifest's skip "
                  "reasons and examples say why)", file=sys.stderr)
        _finish_pause()
        _copy_tokenizer(tokenizer, out, tok["sha256"])
        _finish_pause()
        write_manifest(out, manifest)
    finally:
        comm.barrier()  # every rank, failed or not: rank 0 has written the manifest before any returns
    run_stats = {
        "seconds": max((s.get("seconds", 0.0) for s in all_stats), default=0.0),
        "tokens_processed": sum(s.get("tokens", 0) for s in all_stats),
        "documents_processed": sum(s.get("documents", 0) for s in all_stats),
        "ranks": comm.size,
        "workers_per_rank": run.workers,
    }
    return {**manifest, "_run": run_stats}


# What to check when every record of a kind was skipped (a record skipped for ``key`` names its hint).
_SKIP_HINTS = {
    "missing_text": "--text-key names the JSON field that holds the text",
    "non_string_text": "--text-key names the JSON field that holds the text",
    "empty": "empty files or records",
    "truncated_compressed": "a damaged or incomplete compressed file",
    "invalid_json": "--format (is it JSON lines?)",
}


def files_without_documents(sources: list[Source], unit_records: list[dict]) -> list[str]:
    """The input files no document was read from (units recorded before this count existed are left out)."""
    found: dict[int, int] = {}
    for rec in unit_records:
        for si, n in rec.get("documents_by_source", {}).items():
            found[int(si)] = found.get(int(si), 0) + n
    return [sources[si].path for si, n in sorted(found.items()) if n == 0]


def nothing_written(manifest: dict) -> str:
    """The error of a run that wrote no document: the records read and why each was skipped."""
    r = manifest["records"]
    reasons = []
    for why, n in manifest.get("skipped", {}).items():
        eg = manifest.get("skip_examples", {}).get(why, [])[:2]
        hint = next((h for k, h in _SKIP_HINTS.items() if why.startswith(k)), None)
        reasons.append(f"{why} {n:,}" + (f" (e.g. {', '.join(eg)})" if eg else "") + (f": {hint}" if hint else ""))
    files = len(manifest["sources"])
    return (f"no document written from {files} input file(s): {r['read']:,} record(s) read, all skipped"
            + (f" - {'; '.join(reasons)}" if reasons else " (the inputs hold no records)")
            + "; nothing to train on (no manifest written)")


def _find_duplicates(out: Path, sources: list[Source], units: list[list[Segment]], assignment: list[list[int]],
                     settings: Settings, run: RunOptions, comm) -> dedup.Drops:
    """Deduplication's scan of this rank's units and the exchange between ranks (``dedup``). A failed
    scan on any rank stops every rank with all the ranks' messages (none waits in a collective)."""
    t0 = time.perf_counter()
    for u in assignment[comm.rank]:  # what a killed run's writers of this rank's signatures and lists left
        for f in (dedup.sig_path(out, u), dedup.removed_list_path(out, u)):
            remove_temp_files(f.parent, f.name)
    err: BaseException | None = None
    try:
        dedup.scan_units(out, sources, units, assignment[comm.rank], settings, run.workers, run.progress, comm.rank)
    except BaseException as e:
        err = e
    failures = [f for f in comm.allgather(None if err is None else f"rank {comm.rank}: {err}") if f]
    if err is not None:
        raise err
    if failures:
        raise PipelineError("; ".join(failures))
    scanned = time.perf_counter() - t0
    drops = dedup.find_duplicates(out, units, assignment, settings, comm, sources, run.workers)
    if comm.rank == 0:  # one line, with or without --progress: what the scan and the Jaccard check cost
        found = ", ".join(f"{n:,} {why}" for why, n in sorted(drops.counts.items())) or "none"
        near = drops.near
        check = "" if near is None else (
            f"; near-duplicate check: {near['candidates']:,} LSH candidate(s), {near['removed']:,} removed at "
            f"Jaccard >= {dedup.jaccard_bound(settings):.3f}, {near['rounds']} round(s), "
            f"{near['check_s']:.2f}s (re-read {near['reread_s']:.2f}s)")
        print(f"dedup: {found} in this rank's units (scan {scanned:.2f}s, total {time.perf_counter() - t0:.2f}s"
              f"{check})", file=sys.stderr)
    return drops


def _copy_tokenizer(tokenizer: TokenizerFiles, out: Path, sha256: str) -> None:
    """The tokenizer beside the shards (a dataset directory is complete on its own): ``tokenizer.model``,
    or ``tokenizer.json`` with the files beside it that name its special tokens; unless already there."""
    try:
        copy_tokenizer(tokenizer, out, sha256)
    except ValueError as e:  # the file changed since it was read for the manifest
        raise PipelineError(f"{tokenizer.path} changed during the run ({e})") from None

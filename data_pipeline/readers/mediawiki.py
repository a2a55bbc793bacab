"""Raw MediaWiki XML dumps (``enwiki-...-pages-articles-multistream.xml.bz2``): the articles' wikitext turned
into plain text, without an extraction step (WikiExtractor) in between.

**Multistream dumps and their index.** Wikimedia's ``pages-articles-multistream.xml.bz2`` is a concatenation
of independent bz2 streams: the first holds the ``<mediawiki><siteinfo>`` header, each of the next ones 100
``<page>`` elements, the last ``</mediawiki>``. The index beside it (``...-multistream-index.txt.bz2``) has a
line ``OFFSET:PAGEID:TITLE`` per page, OFFSET being the byte offset of the stream that holds the page. With an
index (``--wiki-index PATH``, else ``NAME-index.txt.bz2`` beside ``NAME.xml.bz2``) a dump is split like a
parquet file: a part of it is a byte range ``[start, end)`` that owns the streams *starting* in it, cut by
``split_ranges`` at stream starts into runs of whole streams of about ``unit_bytes`` compressed bytes, so the
streams of consecutive ranges, in order, are exactly the streams of the whole file, and one dump spreads
over workers and ranks with the same output bytes for any count of them. A range reads its first stream
where it starts (or, if a wrong index put the start elsewhere, at the next stream header after it) and each
stream to its end, even past the range's end. The index is validated when the inputs are expanded (offsets
non-decreasing, inside the file, page ids numbers: a bad one is an error naming the index and its line).

Without an index (and for ``.xml``, ``.xml.gz``, ``.xml.zst`` or single-stream ``.xml.bz2`` files) the dump
is one unit, read by one rank (bz2 streams one after the other, converted on its processes if it has a
pool: see below); finding stream starts to split it by scanning a 20 GB file for bz2 headers would cost every
rank a full read of it before any work, and every published multistream dump has its index.

**Pages.** Each ``<page>`` is one item, at ``file:PAGEID`` (the page id: ``?curid=PAGEID`` on the wiki,
``PAGEID`` in the index; the locations deduplication re-reads by). Skipped and counted by reason: pages
outside the article namespace (``<ns>`` other than 0: ``namespace``), redirects (a ``<redirect>`` element:
``redirect``), pages with no text left after the markup is dropped (``empty``, kept as their title with
``--keep-empty``, like a title-only WikiExtractor ``<doc>``; as an empty document with ``--no-titles``). A
stream that cannot be decompressed (``invalid_bz2``), ends early (``truncated_compressed``) or is not
well-formed XML (``invalid_xml``) yields none of its pages: they are held until the stream ends and its
checksum is verified (bz2 checks a block's CRC after decompressing it; at most 64 MB of text is held, which
only a single-stream dump exceeds), then each page the index lists for that stream is a skip at
``file:PAGEID``, plus one at ``file:0`` naming the stream's offset if the index lists none (the header
stream, or no index); reading goes on at the next stream.

**Text.** A document is the title, a blank line and the text, as in a WikiExtractor ``<doc>`` (with
``ReadOptions.titles`` off, ``--no-titles``, the text alone, as a ``<doc>`` read without its title). The text
is the wikitext parsed by ``mwparserfromhell`` and walked: templates (infoboxes, citations, navboxes), tables,
comments, ``<ref>``/``<references>`` and other invisible tags (``<math>``, ``<gallery>``, ``<timeline>``,
...), file, image and category links and magic words (``__NOTOC__``) are dropped; links keep their text (or
their title), external links their label, bold/italic quotes and formatting tags their contents, HTML entities
become characters, headings are a line of their own, list markers are dropped (the item's text stays on its
line). Lines are stripped, runs of spaces and of blank lines collapsed, and parentheses left empty by the
dropped templates (``( ; )``) removed. Comments, references and templates are cut out with regular expressions
before parsing (``_drop_before_parsing``: the parser builds its tree in Python, and they are most of its
work): the same text, 2.4x faster on gensim's test dump. Deterministic: the text depends only on the page.
mwparserfromhell is the slow part: ~1 MB/s of compressed dump per process, about WikiExtractor's own speed
(``benchmarks/mediawiki_throughput.py``).

**Processes.** Given a ``StreamPool`` (``preprocess --workers N``: N processes per rank), ``read`` has a
``.bz2`` dump's streams converted on its processes (decompressed, parsed, turned into items: each stream on
its own, so any process can take any stream), ahead of the reading, and yields their items in stream order:
the same items, positions and skips as reading them one after the other. At most four streams per process
are converted ahead (streams differ in cost and are taken in order; one of Wikipedia's streams of 100 pages
is up to ~1.5 MB of text), so memory does not grow with the dump. The main process finds the streams to
submit by scanning the compressed bytes for stream headers (a cheap read: no index needed, and a guess never
changes what is read: the reader checks each stream position itself, as without a pool, and reads a stream
the scan did not predict, a stream without another header within 16 MB (a single-stream dump) or one that
holds 64 MB of text itself, sequentially).
"""

from __future__ import annotations

import bz2
import functools
import os
import re
import signal
import sys
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

from .items import DOC, SKIP, DocAssembler, Item, ReadOptions
from .lines import ReadRange
from .sources import InputError, open_binary

INDEX_SUFFIX = "-index.txt.bz2"
_CHUNK = 1 << 18  # compressed bytes read at a time
_HOLD_CHARS = 64 << 20  # text held for one stream before its pages are yielded unverified
# A bz2 stream header: "BZh" + block size, then a block header (pi) or, for an empty stream, the end (sqrt pi).
_STREAM_HEAD = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")


# --------------------------------------------------------------------------------------------------
# Names and the index


def index_beside(path: str) -> str | None:
    """``NAME-index.txt.bz2`` beside ``NAME.xml.bz2`` (Wikimedia's naming), if it exists."""
    if not path.endswith(".xml.bz2"):
        return None
    cand = path[: -len(".xml.bz2")] + INDEX_SUFFIX
    return cand if os.path.isfile(cand) else None


def _index_lines(index: str) -> Iterator[tuple[int, bytes]]:
    opener = bz2.open if index.endswith(".bz2") else open
    try:
        with opener(index, "rb") as f:
            yield from enumerate(f, 1)
    except (OSError, EOFError) as e:
        raise InputError(f"{index}: cannot read the index: {e}") from None


@functools.lru_cache(maxsize=16)
def _offsets(index: str, dump_size: int, stamp: tuple[int, int]) -> tuple[int, ...]:
    starts: list[int] = []
    last = -1
    for lineno, line in _index_lines(index):
        off, sep, rest = line.partition(b":")
        pid, sep2, _ = rest.partition(b":")
        if not (sep and sep2 and off.isdigit() and pid.isdigit()):
            raise InputError(f"{index}:{lineno}: not an index line OFFSET:PAGEID:TITLE: {line[:80]!r}")
        o = int(off)
        if o < last:
            raise InputError(f"{index}:{lineno}: stream offset {o} is before the previous line's {last} "
                             "(an index lists streams in file order)")
        if o >= dump_size:
            raise InputError(f"{index}:{lineno}: stream offset {o} is past the end of the dump ({dump_size:,} "
                             "bytes): is it the index of another dump?")
        if o != last:
            starts.append(o)
            last = o
    if not starts:
        raise InputError(f"{index}: the index lists no page")
    return tuple(starts)


def stream_offsets(index: str, dump_size: int) -> tuple[int, ...]:
    """The distinct stream offsets the index lists, increasing; validated (``InputError`` naming the index's
    file and line). Cached per process (a Wikipedia index has tens of millions of lines)."""
    try:
        st = os.stat(index)
    except OSError as e:
        raise InputError(f"{index}: cannot read the index: {e}") from None
    return _offsets(index, dump_size, (st.st_size, st.st_mtime_ns))


def _stream_pages(index: str | None, offset: int) -> list[int]:
    """The page ids the index lists for the stream at ``offset`` (only needed for a damaged stream)."""
    if not index:
        return []
    key = b"%d:" % offset
    ids = []
    try:
        for _, line in _index_lines(index):
            if line.startswith(key):
                ids.append(int(line.split(b":", 2)[1]))
            elif ids:
                break
    except InputError:
        return []
    return ids


def note_no_index(path: str) -> None:
    """Say once (on MPI rank 0) that a ``.xml.bz2`` dump without an index is read as one unit."""
    ranks = [os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
             if v in os.environ]
    if all(r == "0" for r in ranks):
        print(f"note: {path}: no index (NAME{INDEX_SUFFIX} beside NAME.xml.bz2, or --wiki-index): read as one "
              "unit, by one rank", file=sys.stderr)


def split_ranges(path: str, index: str, size: int, unit_bytes: int) -> list[tuple[int, int]] | None:
    """Byte ranges tiling ``[0, size)``, each starting at a stream the index lists (the first at 0) and
    holding a run of whole streams of about ``unit_bytes`` compressed bytes (a bigger stream is a range
    alone); None when there is nothing to cut."""
    starts = [0, *stream_offsets(index, size)[1:]]  # (the header stream goes with the first stream of pages)
    cuts = [0]
    held = 0
    for start, end in zip(starts, [*starts[1:], size]):
        if held and held + (end - start) > unit_bytes:
            cuts.append(start)
            held = 0
        held += end - start
    if len(cuts) < 2:
        return None
    return [(lo, hi) for lo, hi in zip(cuts, [*cuts[1:], size])]


# --------------------------------------------------------------------------------------------------
# Streams


class _StreamError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _chunks(f, pos: int, state: dict) -> Iterator[bytes]:
    """The decompressed chunks of the bz2 stream at ``pos`` of ``f``; ``state["next"]`` is set to where the
    stream ends once it is read to its end marker. Raises ``_StreamError`` for a damaged or cut-off stream."""
    d = bz2.BZ2Decompressor()
    f.seek(pos)
    read_to = pos
    while True:
        data = f.read(_CHUNK)
        read_to += len(data)
        if not data:
            raise _StreamError("truncated_compressed", "the bz2 stream ends before its end marker")
        try:
            out = d.decompress(data)
        except (OSError, ValueError) as e:
            raise _StreamError("invalid_bz2", str(e)) from None
        if out:
            yield out
        if d.eof:
            state["next"] = read_to - len(d.unused_data)
            return


def _stream_at(f, pos: int, end: int) -> int | None:
    """``pos`` if a bz2 stream header is there, else the offset of the next one before ``end`` (None: none)."""
    f.seek(pos)
    if _STREAM_HEAD.match(f.read(10)):
        return pos
    return _next_head(f, pos + 1, end)


def _bz2_streams(f, start: int, end: int) -> Iterator[tuple[int, Iterator[bytes]]]:
    """(offset, decompressed chunks) of the bz2 streams of ``f`` that start in ``[start, end)``; a chunk
    iterator raises ``_StreamError`` for a damaged or cut-off stream, after which the next stream is found
    by its header."""
    pos: int | None = start
    while pos is not None and pos < end:
        at = _stream_at(f, pos, end)
        if at is None:
            return
        state: dict[str, int] = {}
        yield at, _chunks(f, at, state)
        # the stream's end, or if damaged or not read to its end, the next stream header after its start
        pos = state["next"] if "next" in state else _next_head(f, at + 1, end)


def _next_head(f, pos: int, end: int) -> int | None:
    """Offset of the first bz2 stream header at or after ``pos`` and before ``end``."""
    carry = b""
    base = pos
    f.seek(pos)
    while base < end:
        block = f.read(_CHUNK)
        if not block:
            return None
        data = carry + block
        m = _STREAM_HEAD.search(data)
        if m is not None:
            at = base - len(carry) + m.start()
            return at if at < end else None
        carry = data[-9:]
        base += len(block)
    return None


def _plain_stream(path: str) -> Iterator[tuple[int, Iterator[bytes]]]:
    """A whole ``.xml``/``.xml.gz``/``.xml.zst`` file as one stream."""

    def chunks() -> Iterator[bytes]:
        try:
            with open_binary(path) as f:
                while block := f.read(1 << 20):
                    yield block
        except EOFError as e:
            raise _StreamError("truncated_compressed", str(e)) from None
        except OSError as e:
            raise _StreamError("read_error", str(e)) from None
        except Exception as e:  # zstandard.ZstdError and friends
            if type(e).__name__ == "ZstdError":
                raise _StreamError("truncated_compressed", str(e)) from None
            raise

    yield 0, chunks()


# --------------------------------------------------------------------------------------------------
# Pages


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _page_fields(page: ET.Element) -> tuple[str, str, str, bool, str | None]:
    """(title, ns, id, redirect, text of the last revision) of a ``<page>`` element."""
    title = ns = pid = ""
    redirect = False
    text: str | None = None
    for c in page:
        name = _local(c.tag)
        if name == "title":
            title = c.text or ""
        elif name == "ns":
            ns = (c.text or "").strip()
        elif name == "id":
            pid = (c.text or "").strip()
        elif name == "redirect":
            redirect = True
        elif name == "revision":
            for r in c:
                if _local(r.tag) == "text":
                    text = r.text or ""
    return title, ns, pid, redirect, text


def _page_items(page: ET.Element, path: str, opts: ReadOptions) -> tuple[int, list[Item]]:
    """(page id, or -1 without one; the page's items: one, or PART pieces and their LAST piece)."""
    title, ns, pid, redirect, text = _page_fields(page)
    if not pid.isdigit():
        return -1, [(SKIP, "invalid_xml", f"{path}:0 (a page without a numeric <id>: {title[:60]!r})")]
    n = int(pid)
    loc = f"{path}:{n}"
    if ns != "0":
        return n, [(SKIP, "namespace", loc)]
    if redirect:
        return n, [(SKIP, "redirect", loc)]
    try:
        body = wikitext_to_text(text or "")
    except Exception:  # mwparserfromhell gives up on some pathological markup
        return n, [(SKIP, "invalid_wikitext", loc)]
    if not body and not opts.keep_empty:
        return n, [(SKIP, "empty", loc)]
    if not opts.titles:  # --no-titles: the text alone ("" for an empty page kept with --keep-empty)
        doc = body
    else:
        title = title.strip()
        doc = f"{title}\n\n{body}" if body else title
    if len(doc) < opts.max_doc_bytes:  # (the common case: a Wikipedia page is at most 2 MB of wikitext)
        return n, [(DOC, doc, loc)]
    asm = DocAssembler(loc, opts)  # cut where a WikiExtractor <doc> of the same text would be cut
    pieces = list(asm.add_text(doc + "\n"))
    return n, [*pieces, asm.finish()]


class _Held(Exception):
    """A stream held ``_HOLD_CHARS`` of text before its end (``_stream_items(spill=False)``)."""


def _stream_items(path: str, offset: int, chunks: Iterator[bytes], opts: ReadOptions, index: str | None,
                  first: bool, spill: bool = True) -> Iterator[Item]:
    """The items of one stream: held until the stream has been decompressed and parsed whole (see the module
    docstring), then yielded; for a damaged stream, a skip per page the index lists for it. A stream that
    holds ``_HOLD_CHARS`` of text before its end yields what it holds, or without ``spill`` raises ``_Held``."""
    parser = ET.XMLPullParser(events=("start", "end"))
    parser.feed(b"<mediawiki>")  # the root of streams after the first (the first opens its own inside it)
    held: list[tuple[int, list[Item]]] = []
    held_chars = 0
    yielded: set[int] = set()  # pages of this stream already yielded (a stream held past _HOLD_CHARS)
    stack: list[ET.Element] = []
    try:
        for data in chunks:
            if first:
                data = re.sub(rb"^\s*<\?xml[^>]*\?>", b"", data.lstrip(b"\xef\xbb\xbf"))
                first = False
            try:
                parser.feed(data)
                events = list(parser.read_events())
            except ET.ParseError as e:
                raise _StreamError("invalid_xml", str(e)) from None
            for event, elem in events:
                if event == "start":
                    stack.append(elem)
                    continue
                stack.pop()
                if _local(elem.tag) != "page":
                    continue
                held.append(_page_items(elem, path, opts))
                if stack:
                    stack[-1].remove(elem)  # bounded memory: parsed pages are not kept in the tree
                held_chars += sum(len(it[1]) for it in held[-1][1])
                if held_chars >= _HOLD_CHARS:
                    if not spill:
                        raise _Held
                    for pid, items in held:
                        yielded.add(pid)
                        yield from items
                    held, held_chars = [], 0
        if any(_local(e.tag) == "page" for e in stack):
            raise _StreamError("invalid_xml", "the stream ends inside a <page>")
    except _StreamError as err:
        lost = dict.fromkeys(p for p in _stream_pages(index, offset) if p not in yielded)
        lost.update(dict.fromkeys(pid for pid, _ in held if pid >= 0))
        for p in lost:
            yield (SKIP, err.reason, f"{path}:{p}")
        if not lost:
            yield (SKIP, err.reason, f"{path}:0 (stream at byte {offset}: {err})")
        return
    for _, items in held:
        yield from items


def read(path: str, opts: ReadOptions, rng: ReadRange | None = None, index: str | None = None,
         pool: StreamPool | None = None) -> Iterator[Item]:
    """Pages of the dump ``path`` (or of the streams starting in the byte range ``rng``; ``index``: the
    dump's index, for the pages of a damaged stream) as items at ``file:PAGEID``. With a ``pool``, the bz2
    streams of a ``.bz2`` dump are converted on its processes, ahead of the reading and in order: the same
    items."""
    if rng is not None:
        rng.absolute = True  # page ids: the same whatever range reads them
    if path.endswith(".bz2"):
        try:
            f = open(path, "rb")
            size = os.fstat(f.fileno()).st_size
        except OSError as e:
            yield (SKIP, "read_error", f"{path}:0 ({e})")
            return
        lo = rng.start if rng is not None else 0
        hi = rng.end if rng is not None and rng.end is not None else size
        if pool is not None:
            streams = _pooled_streams(f, path, lo, hi, size, opts, index, pool)
        else:
            streams = ((at, _stream_items(path, at, chunks, opts, index, first=at == 0))
                       for at, chunks in _bz2_streams(f, lo, hi))
    else:
        f = None
        streams = ((at, _stream_items(path, at, chunks, opts, index, first=True))
                   for at, chunks in _plain_stream(path))
    pages = 0
    try:
        for _, items in streams:
            for item in items:
                pages += 1
                yield item
            if rng is not None:
                rng.lines = pages
    finally:
        streams.close()
        if f is not None:
            f.close()


# --------------------------------------------------------------------------------------------------
# Streams converted on processes

_BIG_STREAM = 16 << 20  # compressed bytes: a stream without another header this close is read in the main process


def uses_pool(path: str) -> bool:
    """Whether ``read`` converts the dump ``path`` on a ``StreamPool`` when given one (a ``.bz2`` dump: its
    streams; a single-stream one is read in the main process all the same)."""
    return path.endswith(".bz2")


def _worker_init(parent: int) -> None:
    """A pool process: Ctrl-C is the main process's to handle (it stops the pool), and it dies with the main
    process (Linux: even of kill -9, which leaves no worker behind waiting for work)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the main process died before prctl
        os._exit(1)


def _ready() -> int:
    return os.getpid()


def _convert_stream(path: str, at: int, opts: ReadOptions, index: str | None
                    ) -> tuple[list[Item] | None, int | None]:
    """(the items of the bz2 stream at ``at``, or None if it holds ``_HOLD_CHARS`` of text before its end;
    where it ends, None when damaged or not read to its end), as ``read`` reads it (run on a pool process)."""
    state: dict[str, int] = {}
    with open(path, "rb") as f:
        try:
            items = list(_stream_items(path, at, _chunks(f, at, state), opts, index, first=at == 0, spill=False))
        except _Held:
            return None, None
    return items, state.get("next")


class StreamPool:
    """``workers`` processes converting the bz2 streams of MediaWiki dumps (decompressing, parsing, wikitext to
    text: ~1 MB/s of compressed dump each) for ``read``, which takes their items in stream order: the output
    does not depend on it. One per run (``preprocess --workers N``), for all its units; ``close`` stops it
    (running conversions included). ``converted`` and ``here`` count the streams converted by the processes
    and read in the main process (a stream of over ``_BIG_STREAM`` compressed bytes, or that holds
    ``_HOLD_CHARS`` of text)."""

    def __init__(self, workers: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self.ahead = 4 * workers  # streams converted ahead of the reading, at most (bounded memory)
        self.converted = self.here = 0
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
        try:
            self._ex.submit(_ready).result()  # the processes start now (forked all at once), before other threads
        except BaseException:
            self.close()
            raise

    def submit(self, path: str, at: int, opts: ReadOptions, index: str | None):
        return self._ex.submit(_convert_stream, path, at, opts, index)

    def close(self) -> None:
        """Stop the processes now (conversions running or queued are dropped)."""
        ex = self._ex
        stop = getattr(ex, "terminate_workers", None)  # Python 3.14
        if stop is not None:
            stop()
        else:
            procs = dict(getattr(ex, "_processes", None) or {})
            ex.shutdown(wait=False, cancel_futures=True)
            for p in procs.values():
                try:
                    p.terminate()
                except (ValueError, ProcessLookupError):  # closed or gone
                    pass
        ex.shutdown(wait=True)

    def __enter__(self) -> StreamPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Ahead:
    """The conversions of the streams after the one being read, submitted to ``pool`` ahead of the reading:
    one per bz2 stream header found by scanning the compressed bytes (the streams the reader reaches, on a
    sound dump, with or without an index), at most ``pool.ahead`` at a time. ``take`` gives the conversion of
    the stream the reader is at, or None to read it in the main process: a header the scan did not predict
    (the reader checks every position itself: a guess never changes what is read), a stream of over
    ``_BIG_STREAM`` compressed bytes (no other header that close: a single-stream dump; nothing is scanned
    past it until it is read)."""

    def __init__(self, pool: StreamPool, path: str, end: int, size: int, opts: ReadOptions, index: str | None):
        self.pool, self.path, self.end, self.size, self.opts, self.index = pool, path, end, size, opts, index
        self.f = open(path, "rb")  # for the scan (the reader's own handle reads in-process streams)
        self.head: int | None = None  # the next header to submit (None: none until the reader asks)
        self.queue: deque[tuple[int, Future | None]] = deque()

    def _fill(self) -> None:
        while self.head is not None and len(self.queue) < self.pool.ahead:
            h = self.head
            bound = min(h + 1 + _BIG_STREAM, self.size)
            nxt = _next_head(self.f, h + 1, bound)
            if nxt is None and bound < self.size:  # a big stream: read in the main process, no scan past it
                self.queue.append((h, None))
                self.head = None
                return
            self.queue.append((h, self.pool.submit(self.path, h, self.opts, self.index)))
            self.head = nxt if nxt is not None and nxt < self.end else None

    def take(self, at: int) -> tuple[list[Item], int | None] | None:
        while self.queue and self.queue[0][0] < at:  # a guess the reader passed by
            _, fut = self.queue.popleft()
            if fut is not None:
                fut.cancel()
        if not self.queue:
            self.head = at
        self._fill()
        if self.queue[0][0] != at:  # a header the scan did not find
            return None
        _, fut = self.queue.popleft()
        self._fill()
        if fut is None:
            return None
        try:
            items, nxt = fut.result()
        except BrokenProcessPool as e:
            raise RuntimeError(f"{self.path}: a process converting its bz2 streams died (killed? out of memory?) "
                               f"while the stream at byte {at} was converted: {e}") from None
        if items is None:  # held _HOLD_CHARS of text: read again here, as the sequential reader reads it
            return None
        self.pool.converted += 1
        return items, nxt

    def close(self) -> None:
        for _, fut in self.queue:
            if fut is not None:
                fut.cancel()
        self.queue.clear()
        self.f.close()


def _pooled_streams(f, path: str, lo: int, hi: int, size: int, opts: ReadOptions, index: str | None,
                    pool: StreamPool) -> Iterator[tuple[int, Iterator[Item]]]:
    """(offset, items) of the streams starting in ``[lo, hi)``, exactly as ``_bz2_streams`` and
    ``_stream_items`` give them (the same positions, checked here), converted on ``pool`` when it has
    them."""
    ahead = _Ahead(pool, path, hi, size, opts, index)
    try:
        pos: int | None = lo
        while pos is not None and pos < hi:
            at = _stream_at(f, pos, hi)
            if at is None:
                return
            got = ahead.take(at)
            if got is None:
                pool.here += 1
                state: dict[str, int] = {}
                yield at, _stream_items(path, at, _chunks(f, at, state), opts, index, first=at == 0)
                nxt = state.get("next")
            else:
                items, nxt = got
                yield at, iter(items)
            pos = nxt if nxt is not None else _next_head(f, at + 1, hi)
    finally:
        ahead.close()


# --------------------------------------------------------------------------------------------------
# Wikitext -> plain text

# Tags whose contents are not article prose (mwparserfromhell's invisible tags and a few more).
_DROP_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap", "score", "graph",
    "templatedata", "inputbox", "categorytree", "mapframe", "maplink", "includeonly", "section", "indicator",
    "templatestyles", "hiero", "syntaxhighlight", "source",
})
# Link namespaces that are not prose: files, images, categories (a leading ":" makes a visible link).
_DROP_LINKS = frozenset({"file", "image", "category", "media"})
_MAGIC = re.compile(r"__[A-Z]+__")
_QUOTES = re.compile(r"'{2,}")  # ''italic'', '''bold''': left as text (mwparserfromhell's style tags misparse)
_SPACES = re.compile(r"[ \t]{2,}")
_EMPTY_PARENS = re.compile(r"[ \t]*\([\s,;:]*\)")
_BLANKS = re.compile(r"\n{3,}")
# Dropped before parsing (mwparserfromhell builds its tree in Python: templates and references are most of its
# work and all dropped anyway): comments, <ref>s, and templates innermost first (unless the page has literal
# markup in <nowiki>/<pre>/<syntaxhighlight>/<source>, which only the parser tells apart).
_REFS = re.compile(r"<!--.*?-->|<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_LITERAL = re.compile(r"<(?:nowiki|pre|syntaxhighlight|source)\b", re.I)


def _drop_before_parsing(wikitext: str) -> str:
    if _LITERAL.search(wikitext):
        return wikitext
    text = _REFS.sub("", wikitext)
    while True:
        shorter = _INNER_TEMPLATE.sub("", text)
        if shorter == text:
            return text
        text = shorter


def wikitext_to_text(wikitext: str) -> str:
    """The plain text of a page's wikitext (see the module docstring for what is kept and dropped)."""
    import mwparserfromhell

    code = mwparserfromhell.parse(_drop_before_parsing(wikitext), skip_style_tags=True)
    out: list[str] = []
    _walk(code, out)
    text = _QUOTES.sub("", _MAGIC.sub("", "".join(out)))
    text = _SPACES.sub(" ", _EMPTY_PARENS.sub("", text))
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip("\n")


def _walk(code, out: list[str]) -> None:
    from mwparserfromhell.nodes import ExternalLink, Heading, HTMLEntity, Tag, Text, Wikilink

    for node in code.nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, Wikilink):
            title = str(node.title).strip()
            if title.split(":", 1)[0].strip().lower() in _DROP_LINKS and ":" in title:
                continue
            if node.text is not None:
                _walk(node.text, out)
            else:
                shown: list[str] = []
                _walk(node.title, shown)
                out.append("".join(shown).lstrip(":"))
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag in _DROP_TAGS:
                continue
            if tag == "br":
                out.append("\n")
            elif node.contents is not None:
                _walk(node.contents, out)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, Heading):
            _walk(node.title, out)
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _walk(node.title, out)
            elif not node.brackets:
                out.append(str(node.url))
        # Templates, comments, template arguments, parser-function calls: dropped.

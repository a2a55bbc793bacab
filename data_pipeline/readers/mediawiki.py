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
is one unit, read sequentially (bz2 streams one after the other); finding stream starts by scanning
a 20 GB file for bz2 headers would cost every rank a full read of it before any work, and every published
multistream dump has its index.

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
(``benchmarks/mediawiki_throughput.py``), and the reader runs in each rank's main process, so a dump is read
faster by more MPI ranks (each reading its own units) than by more ``--workers``.
"""

from __future__ import annotations

import bz2
import functools
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator

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
              "unit, sequentially", file=sys.stderr)


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


def _bz2_streams(f, start: int, end: int) -> Iterator[tuple[int, Iterator[bytes]]]:
    """(offset, decompressed chunks) of the bz2 streams of ``f`` that start in ``[start, end)``; a chunk
    iterator raises ``_StreamError`` for a damaged or cut-off stream, after which the next stream is found
    by its header."""
    pos = start
    while pos < end:
        f.seek(pos)
        if not _STREAM_HEAD.match(f.read(10)):
            nxt = _next_head(f, pos + 1, end)
            if nxt is None:
                return
            pos = nxt
        state: dict[str, int] = {}

        def chunks(pos: int = pos, state: dict = state) -> Iterator[bytes]:
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

        yield pos, chunks()
        if "next" in state:
            pos = state["next"]
        else:  # damaged or not read to its end: go on at the next stream header
            nxt = _next_head(f, pos + 1, end)
            if nxt is None:
                return
            pos = nxt


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


def _stream_items(path: str, offset: int, chunks: Iterator[bytes], opts: ReadOptions, index: str | None,
                  first: bool) -> Iterator[Item]:
    """The items of one stream: held until the stream has been decompressed and parsed whole (see the module
    docstring), then yielded; for a damaged stream, a skip per page the index lists for it."""
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


def read(path: str, opts: ReadOptions, rng: ReadRange | None = None, index: str | None = None) -> Iterator[Item]:
    """Pages of the dump ``path`` (or of the streams starting in the byte range ``rng``; ``index``: the
    dump's index, for the pages of a damaged stream) as items at ``file:PAGEID``."""
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
        streams = _bz2_streams(f, lo, hi)
    else:
        f = None
        streams = _plain_stream(path)
    pages = 0
    try:
        for offset, chunks in streams:
            for item in _stream_items(path, offset, chunks, opts, index, first=offset == 0):
                pages += 1
                yield item
            if rng is not None:
                rng.lines = pages
    finally:
        if f is not None:
            f.close()


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

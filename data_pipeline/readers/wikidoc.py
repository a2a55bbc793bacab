"""WikiExtractor output: ``<doc id=... url=... title=...>`` lines, the article (its title on the first
line), then a ``</doc>`` line. Text outside a document, a document without ``</doc>`` and a document that
is only its title (redirects, stubs) are counted as skipped, never silently dropped. The title stays the
document's first line; with ``ReadOptions.titles`` off (``--no-titles``) it is dropped (the first non-blank
line of the document: ``DocAssembler(drop_first_line=True)``), and a document with no text left is ``empty``.

Two paths with identical items (``tests/data_pipeline/test_readers.py`` checks it item for item):
``read_lines`` (compressed files, byte ranges, tiny ``max_line_bytes``) and ``read_blocks`` (an
uncompressed file read whole in blocks of lines: ~5x less CPU).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from . import lines
from .items import DOC, SKIP, DocAssembler, Item, ReadOptions, reason
from .lines import ReadRange

_DOC_OPEN = re.compile(rb"<doc\b[^>\n]*>")  # matched at a line start


def read(path: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    """Documents of ``path``, or of the byte range ``rng`` of it (see ``lines``)."""
    if lines.use_blocks(path, opts.max_line_bytes, rng):
        return read_blocks(path, opts)
    return read_lines(path, opts, rng)


def _assembler(loc: str, opts: ReadOptions) -> DocAssembler:
    return DocAssembler(loc, opts, drop_first_line=not opts.titles)


def _finish(doc: DocAssembler) -> Item:
    item = doc.finish()
    # WikiExtractor puts the title on the first line: a document that is only its title (redirects,
    # stubs) carries no text and is counted as empty. (Without titles, the title is gone already: finish()
    # counts a document with no text left as empty, or keeps it as "" with keep_empty.)
    if doc.opts.titles and item[0] == DOC and "\n" not in item[1].strip("\n") and not doc.opts.keep_empty:
        return (SKIP, "empty", doc.loc)
    return item


def read_lines(path: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    doc: DocAssembler | None = None
    for lineno, raw, err in lines.iter_lines(path, opts.max_line_bytes, rng, boundary=b"</doc>"):
        loc = f"{path}:{lineno}"
        if err is not None:
            doc = None  # a document in progress is cut off: report it once, under the read error
            yield (SKIP, reason(err), loc)
            continue
        assert raw is not None
        if doc is None:
            if _DOC_OPEN.match(raw):
                doc = _assembler(loc, opts)
            elif raw.strip():
                yield (SKIP, "text_outside_doc", loc)
            continue
        if raw.rstrip() == b"</doc>":
            yield _finish(doc)
            doc = None
            continue
        yield from doc.add_raw(raw, loc)
    if doc is not None:
        yield (SKIP, "unterminated_doc", doc.loc)


def _find_close(block: bytes, pos: int) -> tuple[int, int] | None:
    """(start, end) of the first line at or after ``pos`` (a line start) whose rstrip() is ``</doc>``.
    (bytes.find, not a multi-line regex: Python's re tries ``^`` at every position of the body.)"""
    i = pos
    while (i := block.find(b"</doc>", i)) >= 0:
        if i == pos or block[i - 1] == 10:  # at a line start
            eol = block.find(b"\n", i + 6)
            end = len(block) if eol < 0 else eol + 1
            if not block[i + 6 : end].strip():
                return i, end
        i += 6
    return None


def read_blocks(path: str, opts: ReadOptions) -> Iterator[Item]:
    """``read_lines`` for a whole uncompressed file, by blocks."""
    doc: DocAssembler | None = None
    for lineno, block, err in lines.iter_blocks(path, opts.max_line_bytes):
        if err is not None:
            doc = None  # a document in progress is cut off: report it once, under the read error
            yield (SKIP, reason(err), f"{path}:{lineno}")
            continue
        assert block is not None
        pos, n = 0, len(block)
        while pos < n:
            if doc is None:  # outside a document: line by line (a <doc> line, or stray text)
                eol = block.find(b"\n", pos)
                end = n if eol < 0 else eol + 1
                if _DOC_OPEN.match(block, pos, end):
                    doc = _assembler(f"{path}:{lineno}", opts)
                elif block[pos:end].strip():
                    yield (SKIP, "text_outside_doc", f"{path}:{lineno}")
                pos, lineno = end, lineno + 1
                continue
            m = _find_close(block, pos)
            stop = n if m is None else m[0]
            if stop > pos:
                yield from doc.add_block(block[pos:stop], lineno, path)
            lineno += block.count(b"\n", pos, stop)
            if m is None:
                break
            yield _finish(doc)
            doc = None
            pos, lineno = m[1], lineno + 1
    if doc is not None:
        yield (SKIP, "unterminated_doc", doc.loc)

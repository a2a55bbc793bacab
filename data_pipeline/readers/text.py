"""Plain text files (books, wikitext): one file is one document. A BOM and CRLF line ends are handled;
the Project Gutenberg header and footer are optionally stripped (``--strip-gutenberg``).

Two paths with identical items (``tests/data_pipeline/test_readers.py`` checks it item for item):
``read_lines`` (compressed files, Gutenberg stripping, tiny ``max_line_bytes``) and ``read_blocks``
(an uncompressed file read whole in blocks of lines: ~5x less CPU).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from . import lines
from .items import SKIP, DocAssembler, Item, ReadOptions, decode_line, reason
from .lines import ReadRange

_PG_START = re.compile(r"^\s*\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)
_PG_END = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.IGNORECASE
)
_PG_HEADER_SCAN_LINES = 1000  # the START marker is always near the top; give up after this many lines


def read(path: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    """The file as one item; ``rng`` is always None (a text file is one document: not splittable)."""
    if lines.use_blocks(path, opts.max_line_bytes, rng) and not opts.strip_gutenberg:
        return read_blocks(path, opts)
    return read_lines(path, opts)


def read_lines(path: str, opts: ReadOptions) -> Iterator[Item]:
    doc = DocAssembler(f"{path}:1", opts)
    header: list[str] | None = [] if opts.strip_gutenberg else None
    for lineno, raw, err in lines.iter_lines(path, opts.max_line_bytes):
        loc = f"{path}:{lineno}"
        if err is not None:
            yield (SKIP, reason(err), loc)
            return
        assert raw is not None
        line = decode_line(raw)
        if line is None:
            doc.mark_bad("invalid_utf8", loc)
            continue
        if header is not None:  # still looking for the Gutenberg START marker
            if _PG_START.match(line):
                header = None  # drop everything up to and including the START marker
                continue
            header.append(line)
            if len(header) < _PG_HEADER_SCAN_LINES:
                continue
            # No marker near the top: not a Gutenberg header; keep what was held back.
            held, header = header, None
            for ln in held:
                yield from doc.add(ln)
            continue
        if opts.strip_gutenberg and _PG_END.match(line):
            break
        yield from doc.add(line)
    for ln in header or ():  # a short file without a START marker
        yield from doc.add(ln)
    yield doc.finish()


def read_blocks(path: str, opts: ReadOptions) -> Iterator[Item]:
    """``read_lines`` without Gutenberg stripping, by blocks."""
    doc = DocAssembler(f"{path}:1", opts)
    for lineno, block, err in lines.iter_blocks(path, opts.max_line_bytes):
        if err is not None:
            yield (SKIP, reason(err), f"{path}:{lineno}")
            return
        assert block is not None
        yield from doc.add_block(block, lineno, path)
    yield doc.finish()

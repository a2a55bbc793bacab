"""Raw lines and blocks of whole lines from a file, with bounded memory, and byte ranges (``ReadRange``).

Both iterators drop a UTF-8 BOM at the start of the file and report, instead of data, what cannot be
read: an over-long line (``line_too_long``, its bytes skipped without being held), a cut-off compressed
stream (``truncated_compressed``) or an I/O error (``read_error``). The format readers turn those into
SKIP items at ``file:line``.

``iter_lines`` yields one line at a time and can read a byte range of an uncompressed file:

- without a boundary (``jsonl``), a range ``[start, end)`` owns the lines whose first byte lies in it;
- with ``boundary=b"</doc>"`` (``wikidoc``), a range starts just after the first ``</doc>`` line that
  starts at or after ``start`` (the file start for ``start == 0``) and ends with the first ``</doc>``
  line that starts at or after ``end``. After any ``</doc>`` line the whole-file reader is outside a
  document, so a range reader that begins there in that state sees exactly what the whole-file reader
  sees.

So the records of consecutive ranges, in order, are exactly the records of the whole file. Line numbers
count from the range's first owned line (``ReadRange.lines`` tells how many lines it owned, so the
caller can make them absolute without re-reading the file). Compressed files cannot seek and are always
read whole.

``iter_blocks`` yields 1 MiB blocks of whole lines of an uncompressed file read whole: the format
readers then do a few C calls per block instead of Python work per line (readline, decode, CRLF,
append), which was most of the pipeline's CPU beyond the tokenizer.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .sources import compression, open_binary

# (line number, raw line or None, error or None); the error is "reason" or "reason: details".
LineResult = tuple[int, bytes | None, str | None]

BLOCK_BYTES = 1 << 20  # a module global, so that tests can make it tiny


@dataclass
class ReadRange:
    """A byte range of an uncompressed file (see the module docstring for who owns which record; a
    parquet file's range owns row groups, ``parquet``)."""

    start: int = 0
    end: int | None = None  # None: to the end of the file
    first_byte: int = 0  # set by the reader: offset of the first line the range owns
    lines: int = 0  # set by the reader: number of lines (parquet: rows) the range owns
    absolute: bool = False  # set by the reader: its locations count from the file start (parquet rows)


def count_newlines(path: str, end: int, chunk: int = 1 << 22) -> int:
    """Newlines in ``path[:end]`` (for absolute line numbers of a range in an error message)."""
    n = 0
    with open(path, "rb") as f:
        while end > 0 and (block := f.read(min(chunk, end))):
            n += block.count(b"\n")
            end -= len(block)
    return n


def use_blocks(path: str, max_line_bytes: int, rng: ReadRange | None) -> bool:
    """Whether a whole uncompressed file can go through ``iter_blocks`` (same items, ~5x less CPU)."""
    return rng is None and not compression(path) and max_line_bytes >= BLOCK_BYTES


def _drain(f: BinaryIO, line: bytes) -> int:
    """Consume the rest of an oversized line without keeping it; returns the bytes consumed."""
    n = 0
    while not line.endswith(b"\n") and (line := f.readline(1 << 20)):
        n += len(line)
    return n


def iter_lines(
    path: str, max_line_bytes: int, rng: ReadRange | None = None, boundary: bytes | None = None
) -> Iterator[LineResult]:
    """Every line of ``path`` (or the lines ``rng`` owns, see the module docstring), numbered from 1."""
    try:
        f = open_binary(path)
    except OSError as e:
        yield 1, None, f"read_error: {e}"
        return
    start = rng.start if rng is not None else 0
    end = rng.end if rng is not None and rng.end is not None else None
    lineno = 0
    pos = 0  # offset of the next line
    with f:
        try:
            if start > 0:
                f.seek(start - 1)
                first = f.readline(1 << 20)  # the rest of the line that straddles `start`
                pos = start - 1 + len(first) + _drain(f, first)
                while boundary is not None:  # skip to just after the first boundary line
                    line = f.readline(max_line_bytes + 1)
                    if not line:
                        break
                    line_start, pos = pos, pos + len(line) + _drain(f, line)
                    if line.rstrip() == boundary:
                        if end is not None and line_start >= end:
                            return  # it is also where the next range starts: this range owns nothing
                        break
            if rng is not None:
                rng.first_byte = pos
        except OSError as e:
            yield 1, None, f"read_error: {e}"
            return
        while True:
            if end is not None and pos >= end and boundary is None:
                return
            lineno += 1
            try:
                line = f.readline(max_line_bytes + 1)
                if not line:
                    return
                line_start, pos = pos, pos + len(line)
                if line_start == 0 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    pos += _drain(f, line)
                    if rng is not None:
                        rng.lines = lineno
                    yield lineno, None, "line_too_long"
                    continue
            except (EOFError, gzip.BadGzipFile) as e:
                yield lineno, None, f"truncated_compressed: {e}"
                return
            except OSError as e:
                yield lineno, None, f"read_error: {e}"
                return
            except Exception as e:  # zstandard.ZstdError and friends
                if type(e).__name__ == "ZstdError":
                    yield lineno, None, f"truncated_compressed: {e}"
                    return
                raise
            if rng is not None:
                rng.lines = lineno
            yield lineno, line, None
            if end is not None and boundary is not None and line_start >= end and line.rstrip() == boundary:
                return


def iter_blocks(path: str, max_line_bytes: int) -> Iterator[LineResult]:
    """(number of the block's first line, whole lines, None) or (line number, None, error); like
    ``iter_lines`` but a block at a time. Requires ``BLOCK_BYTES <= max_line_bytes`` (``use_blocks``):
    then only a block's first line can be over-long."""
    block_bytes = BLOCK_BYTES
    assert block_bytes <= max_line_bytes
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        yield 1, None, f"read_error: {e}"
        return
    lineno, carry, first, draining = 1, b"", True, False
    with f:
        while True:
            try:
                chunk = f.read(block_bytes)
            except OSError as e:
                yield lineno, None, f"read_error: {e}"
                return
            if first:
                first = False
                if chunk.startswith(b"\xef\xbb\xbf"):
                    chunk = chunk[3:]
            if not chunk:
                if carry:  # a last line without a newline
                    yield (lineno, None, "line_too_long") if len(carry) > max_line_bytes else (lineno, carry, None)
                return
            if draining:  # the rest of an over-long line already reported
                nl = chunk.find(b"\n")
                if nl < 0:
                    continue
                chunk, draining = chunk[nl + 1 :], False
                lineno += 1
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                if len(carry) > max_line_bytes:
                    yield lineno, None, "line_too_long"
                    carry, draining = b"", True
                continue
            block, carry = data[:cut], data[cut:]
            if block.find(b"\n") > max_line_bytes:  # the line continuing the previous carry
                yield lineno, None, "line_too_long"
                block = block[block.find(b"\n") + 1 :]
                lineno += 1
            if block:
                yield lineno, block, None
                lineno += block.count(b"\n")

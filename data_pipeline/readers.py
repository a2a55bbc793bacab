"""Streaming document readers with bounded memory and honest accounting of bad input.

Every reader yields ``Item`` tuples ``(kind, text, loc)``:

- ``DOC``: one whole document ``text``;
- ``PART``/``LAST``: a document longer than ``max_doc_bytes`` streamed in pieces (never loaded whole);
  ``PART`` pieces are followed by exactly one ``LAST`` piece;
- ``SKIP``: a record that could not be used; ``text`` is the reason (``invalid_json``, ``invalid_utf8``,
  ``missing_text``, ``non_string_text``, ``empty``, ``blank_line``, ``line_too_long``,
  ``truncated_compressed``, ``read_error``), ``loc`` is ``file:line`` (or ``file:row``).

Sources are plain files (optionally ``.gz``/``.zst`` compressed) in one of the formats ``jsonl``
(also ``.json`` lines and WikiExtractor ``--json`` output), ``wikidoc`` (WikiExtractor ``<doc ...>``
blocks), ``text`` (one document per file: books; BOM and CRLF handled, Gutenberg boilerplate optionally
stripped) and ``parquet``; or a Hugging Face dataset ``hf:NAME[:CONFIG][@SPLIT]`` read with
``datasets.load_dataset(..., streaming=True)``.

Byte ranges (``ReadRange``) let one huge uncompressed ``jsonl``/``wikidoc`` file be read as several
independent parts whose records, in order, are exactly the records of the whole file:

- ``jsonl``: a range ``[start, end)`` owns the lines whose first byte lies in it;
- ``wikidoc``: a range starts just after the first ``</doc>`` line that starts at or after ``start``
  (the file start for ``start == 0``) and ends with the first ``</doc>`` line that starts at or after
  ``end``. After any ``</doc>`` line the whole-file reader is outside a document, so a range reader that
  begins there in that state sees exactly what the whole-file reader sees.

Line numbers in a range's ``loc`` count from the range's first owned line (``ReadRange.lines`` tells
how many lines it owned, so the caller can make them absolute without re-reading the file).
Compressed files cannot seek and are always read whole.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

DOC, PART, LAST, SKIP = 0, 1, 2, 3
Item = tuple[int, str, str]

# Reasons that are errors (``--on-error fail`` stops on them); ``empty``/``blank_line`` are not errors.
ERROR_REASONS = frozenset(
    {
        "invalid_json",
        "invalid_utf8",
        "missing_text",
        "non_string_text",
        "line_too_long",
        "truncated_compressed",
        "read_error",
        "unencodable_text",
    }
)

FORMATS = ("auto", "jsonl", "wikidoc", "text", "parquet")
_TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md"}
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}

_DOC_OPEN = re.compile(rb"^<doc\b([^>]*)>")
_PG_START = re.compile(r"^\s*\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)
_PG_END = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.IGNORECASE
)
_PG_HEADER_SCAN_LINES = 1000  # the START marker is always near the top; give up after this many lines


class InputError(ValueError):
    """Unusable input specification (missing path, unknown format)."""


@dataclass(frozen=True)
class Source:
    path: str  # file path as expanded, or "hf:NAME[:CONFIG][@SPLIT]"
    format: str
    size: int  # bytes on disk (0 for hf:)

    @property
    def is_hf(self) -> bool:
        return self.path.startswith("hf:")


@dataclass
class ReadRange:
    """A byte range of an uncompressed file (see the module docstring for who owns which record)."""

    start: int = 0
    end: int | None = None  # None: to the end of the file
    first_byte: int = 0  # set by the reader: offset of the first line the range owns
    lines: int = 0  # set by the reader: number of lines the range owns


def splittable(src: Source) -> bool:
    """Whether ``src`` can be read in byte ranges (uncompressed JSON lines or WikiExtractor files)."""
    return src.format in ("jsonl", "wikidoc") and not _compression(src.path)


def count_newlines(path: str, end: int, chunk: int = 1 << 22) -> int:
    """Newlines in ``path[:end]`` (for absolute line numbers of a range in an error message)."""
    n = 0
    with open(path, "rb") as f:
        while end > 0 and (block := f.read(min(chunk, end))):
            n += block.count(b"\n")
            end -= len(block)
    return n


@dataclass(frozen=True)
class ReadOptions:
    text_key: str = "text"
    strip_gutenberg: bool = False
    keep_empty: bool = False  # Megatron keeps empty documents as empty index entries
    max_doc_bytes: int = 8 << 20  # longer documents are streamed in pieces
    max_line_bytes: int = 64 << 20  # longer JSON lines are skipped (they cannot be parsed in pieces)


# ---------------------------------------------------------------------------------------------------
# Source expansion and format detection


def _compression(path: str) -> str:
    if path.endswith(".gz"):
        return "gz"
    if path.endswith(".zst"):
        return "zst"
    return ""


def open_binary(path: str) -> BinaryIO:
    """Open a possibly compressed file as a buffered binary stream (decompressed on the fly)."""
    comp = _compression(path)
    if comp == "gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if comp == "zst":
        return io.BufferedReader(_ZstdRaw(path), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


class TruncatedError(EOFError):
    pass


class _ZstdRaw(io.RawIOBase):
    """Multi-frame zstd decompression that raises on a truncated last frame.

    (``zstandard``'s ``stream_reader`` returns a silent EOF in the middle of a cut-off frame, which
    would turn a truncated download into a quietly shorter dataset.)
    """

    def __init__(self, path: str):
        import zstandard

        self._zstd = zstandard
        self._f = open(path, "rb")
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._buf = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            chunk = self._f.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise TruncatedError("zstd stream ends inside a frame (truncated file)")
                return 0
            while chunk:
                self._in_frame = True
                self._buf += self._d.decompress(chunk)
                if self._d.eof:  # frame complete: the rest belongs to the next frame
                    chunk = self._d.unused_data
                    self._d = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
                else:
                    chunk = b""
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def detect_format(path: str) -> str:
    base = path[: -len(_compression(path)) - 1] if _compression(path) else path
    suffix = Path(base).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _TEXT_SUFFIXES:
        return "text"
    # No telling suffix (WikiExtractor writes AA/wiki_00): sniff the first bytes.
    try:
        with open_binary(path) as f:
            head = f.read(4096)
    except Exception:
        return "text"  # the reader will report the read error with its location
    head = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"<doc"):
        return "wikidoc"
    if head.startswith(b"{"):
        return "jsonl"
    return "text"


def expand_inputs(specs: list[str], fmt: str = "auto") -> list[Source]:
    """Files, directories (recursive, sorted) and globs -> ordered, de-duplicated sources."""
    if fmt not in FORMATS:
        raise InputError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    paths: list[str] = []
    for spec in specs:
        if spec.startswith("hf:"):
            paths.append(spec)
        elif os.path.isdir(spec):
            found = sorted(
                str(p)
                for p in Path(spec).rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(spec).parts)
            )
            if not found:
                raise InputError(f"{spec}: directory has no files")
            paths.extend(found)
        elif any(ch in spec for ch in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"{spec}: glob matches no files")
            paths.extend(found)
        elif os.path.isfile(spec):
            paths.append(spec)
        else:
            raise InputError(f"{spec}: no such file or directory")
    seen: set[str] = set()
    sources = []
    for p in paths:
        if p in seen:
            continue
        seen.add(p)
        if p.startswith("hf:"):
            sources.append(Source(p, "hf", 0))
        else:
            sources.append(Source(p, detect_format(p) if fmt == "auto" else fmt, os.path.getsize(p)))
    return sources


FINGERPRINT_METHODS = ("sampled", "full")


def fingerprint(src: Source, method: str = "sampled", samples: int = 16, block: int = 1 << 16) -> str:
    """Content fingerprint of a source.

    ``sampled`` (default): sha256 of the path, the size and ``samples`` evenly spaced 64 KiB blocks
    (the whole file when smaller). Reading whole inputs twice (once to hash, once to tokenize) would
    double the I/O of a 40 GB run; sampled blocks catch truncation, appends and replaced files, which is
    what resume checks need, but not an edit that keeps the size and misses every block.
    ``full``: sha256 of the path, the size and every byte (streamed), for a guarantee.
    """
    if method not in FINGERPRINT_METHODS:
        raise InputError(f"unknown fingerprint method {method!r}; choose from {', '.join(FINGERPRINT_METHODS)}")
    h = hashlib.sha256(f"{src.path}|{src.size}|".encode())
    if src.is_hf:
        return h.hexdigest()
    with open(src.path, "rb") as f:
        if method == "full" or src.size <= samples * block:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        else:
            step = (src.size - block) // (samples - 1)
            for i in range(samples):
                f.seek(i * step)
                h.update(f.read(block))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Readers


def iter_documents(src: Source, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    """Items of ``src`` (or of the byte range ``rng`` of it: only for ``splittable`` sources)."""
    if rng is not None and not splittable(src):
        raise InputError(f"{src.path}: a {src.format} source cannot be read in byte ranges")
    # Uncompressed files without a byte range go through the block readers (same items, ~5x less CPU).
    blocks = rng is None and not _compression(src.path) and opts.max_line_bytes >= _BLOCK_BYTES
    if src.format == "jsonl":
        yield from _read_jsonl(src.path, opts, rng)
    elif src.format == "wikidoc":
        yield from (_read_wikidoc_blocks(src.path, opts) if blocks else _read_wikidoc(src.path, opts, rng))
    elif src.format == "text":
        yield from (_read_text_blocks(src.path, opts) if blocks and not opts.strip_gutenberg
                    else _read_text(src.path, opts))
    elif src.format == "parquet":
        yield from _read_parquet(src.path, opts)
    elif src.format == "hf":
        yield from _read_hf(src.path, opts)
    else:
        raise InputError(f"{src.path}: unknown format {src.format!r}")


def _drain(f: BinaryIO, line: bytes) -> int:
    """Consume the rest of an oversized line without keeping it; returns the bytes consumed."""
    n = 0
    while not line.endswith(b"\n") and (line := f.readline(1 << 20)):
        n += len(line)
    return n


def _lines(
    path: str, max_line_bytes: int, rng: ReadRange | None = None, boundary: bytes | None = None
) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(line number, raw line or None, error reason or None); bounded memory per line; a UTF-8 BOM at
    the start of the file is dropped.

    With ``rng``: only the lines the range owns (module docstring). ``boundary`` (``b"</doc>"``) makes
    the range start after the first such line at or after ``rng.start`` and end with the first such line
    at or after ``rng.end``; without it, the range is the lines starting in ``[start, end)``.
    """
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


def _reason(err: str) -> str:
    return err.split(":", 1)[0]


def _check_text(text: object, loc: str, opts: ReadOptions) -> Item:
    if text is None:
        return (SKIP, "missing_text", loc)
    if not isinstance(text, str):
        return (SKIP, "non_string_text", loc)
    if not opts.keep_empty and (not text or text.isspace()):  # (strip() would copy the document)
        return (SKIP, "empty", loc)
    return (DOC, text, loc)


def _read_jsonl(path: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    for lineno, raw, err in _lines(path, opts.max_line_bytes, rng):
        loc = f"{path}:{lineno}"
        if err is not None:
            yield (SKIP, _reason(err), loc)
            continue
        assert raw is not None
        if not raw.strip():
            yield (SKIP, "blank_line", loc)
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield (SKIP, "invalid_utf8", loc)
            continue
        except ValueError:
            yield (SKIP, "invalid_json", loc)
            continue
        if not isinstance(obj, dict):
            yield (SKIP, "missing_text", loc)
            continue
        yield _check_text(obj.get(opts.text_key), loc, opts)


class _DocAssembler:
    """Accumulates decoded lines of one document; emits PART pieces past ``max_doc_bytes``."""

    def __init__(self, loc: str, opts: ReadOptions):
        self.loc, self.opts = loc, opts
        self.buf: list[str] = []
        self.size = 0
        self.emitted_parts = False
        self.bad: str | None = None
        self.bad_loc = loc

    def add(self, line: str) -> Iterator[Item]:
        self.buf.append(line)
        self.size += len(line)  # characters: a cheap bound on bytes/4..bytes
        if self.size >= self.opts.max_doc_bytes:
            self.emitted_parts = True
            piece, self.buf, self.size = "".join(self.buf), [], 0
            yield (PART, piece, self.loc)

    def add_text(self, text: str) -> Iterator[Item]:
        """``add`` for a run of whole lines at once: PART pieces are cut exactly where line-by-line
        ``add`` would cut them (after the line whose last character reaches ``max_doc_bytes``)."""
        limit = self.opts.max_doc_bytes
        while self.size + len(text) >= limit:
            nl = text.find("\n", limit - self.size - 1)  # end of the line holding the limit-th character
            cut = len(text) if nl < 0 else nl + 1
            self.buf.append(text[:cut])
            text = text[cut:]
            self.emitted_parts = True
            piece, self.buf, self.size = "".join(self.buf), [], 0
            yield (PART, piece, self.loc)
        if text:
            self.buf.append(text)
            self.size += len(text)

    def finish(self, body_check: bool = True) -> Item:
        # A bad line anywhere skips the whole document, even after PART pieces were emitted: the
        # consumer drops an open streamed document when a SKIP arrives instead of its LAST piece.
        if self.bad:
            return (SKIP, self.bad, self.bad_loc)
        text = "".join(self.buf)
        self.buf = []  # the assembler outlives this call in the reader: do not hold the lines twice
        if self.emitted_parts:
            return (LAST, text, self.loc)
        if body_check:
            text = text.strip("\n")  # rebinding frees the unstripped copy before the caller gets it
        return _check_text(text, self.loc, self.opts)


def _decode_line(raw: bytes) -> str | None:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # CRLF -> LF (Windows books, wikitext); a lone trailing CR too.
    if s.endswith("\r\n"):
        s = s[:-2] + "\n"
    elif s.endswith("\r"):
        s = s[:-1] + "\n"
    return s


# ---------------------------------------------------------------------------------------------------
# Block readers: the same items as the line readers above, from 1 MiB blocks of whole lines decoded at
# once. Python work per line (readline, decode, CRLF, append) was most of the pipeline's CPU beyond the
# tokenizer; here it is a few C calls per block. Used for uncompressed files read whole
# (tests/data_pipeline/test_readers.py checks item-for-item equality with the line readers).

_BLOCK_BYTES = 1 << 20
_DOC_OPEN_AT = re.compile(rb"<doc\b[^>\n]*>")  # _DOC_OPEN for Pattern.match(block, pos, end)


def _blocks(
    path: str, max_line_bytes: int, block_bytes: int = 0
) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(number of the block's first line, whole lines, None) or (line number, None, error reason);
    like ``_lines`` (BOM dropped, over-long lines reported and skipped) but a block at a time.
    Requires ``block_bytes <= max_line_bytes``: then only a block's first line can be over-long."""
    block_bytes = block_bytes or _BLOCK_BYTES  # (a module global, so that tests can make it tiny)
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


def _decode_block(block: bytes, lineno: int) -> tuple[str, int]:
    """-> (text of the whole lines before the first invalid UTF-8 line, CRLF -> LF as ``_decode_line``;
    that line's number, or 0 if the block is valid)."""
    try:
        text, bad = block.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        start = block.rfind(b"\n", 0, e.start) + 1
        text, bad = block[:start].decode("utf-8"), lineno + block.count(b"\n", 0, start)
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        if text.endswith("\r"):  # a last line without a newline
            text = text[:-1] + "\n"
    return text, bad


def _read_text_blocks(path: str, opts: ReadOptions) -> Iterator[Item]:
    """``_read_text`` without Gutenberg stripping, by blocks."""
    doc = _DocAssembler(f"{path}:1", opts)
    for lineno, block, err in _blocks(path, opts.max_line_bytes):
        if err is not None:
            yield (SKIP, _reason(err), f"{path}:{lineno}")
            return
        if doc.bad is None:
            text, bad = _decode_block(block, lineno)
            yield from doc.add_text(text)
            if bad:
                doc.bad, doc.bad_loc = "invalid_utf8", f"{path}:{bad}"
    yield doc.finish()


def _read_wikidoc_blocks(path: str, opts: ReadOptions) -> Iterator[Item]:
    """``_read_wikidoc`` for a whole uncompressed file, by blocks."""
    doc: _DocAssembler | None = None
    for lineno, block, err in _blocks(path, opts.max_line_bytes):
        if err is not None:
            doc = None  # the document is cut off: report it once under the error
            yield (SKIP, _reason(err), f"{path}:{lineno}")
            continue
        pos, n = 0, len(block)
        while pos < n:
            if doc is None:  # outside a document: line by line (a <doc> line, or stray text)
                eol = block.find(b"\n", pos)
                end = n if eol < 0 else eol + 1
                if _DOC_OPEN_AT.match(block, pos, end):
                    doc = _DocAssembler(f"{path}:{lineno}", opts)
                elif block[pos:end].strip():
                    yield (SKIP, "text_outside_doc", f"{path}:{lineno}")
                pos, lineno = end, lineno + 1
                continue
            m = _find_close(block, pos)
            stop = n if m is None else m[0]
            if stop > pos and doc.bad is None:
                text, bad = _decode_block(block[pos:stop], lineno)
                yield from doc.add_text(text)
                if bad:
                    doc.bad, doc.bad_loc = "invalid_utf8", f"{path}:{bad}"
            lineno += block.count(b"\n", pos, stop)
            if m is None:
                break
            item = doc.finish()
            if item[0] == DOC and "\n" not in item[1].strip("\n") and not opts.keep_empty:
                item = (SKIP, "empty", doc.loc)  # title only (see _read_wikidoc)
            yield item
            doc = None
            pos, lineno = m[1], lineno + 1
    if doc is not None:
        yield (SKIP, "unterminated_doc", doc.loc)


def _read_wikidoc(path: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    doc: _DocAssembler | None = None
    for lineno, raw, err in _lines(path, opts.max_line_bytes, rng, boundary=b"</doc>"):
        loc = f"{path}:{lineno}"
        if err is not None:
            if doc is not None:
                doc = None  # the document is cut off: report it once under the read error
            yield (SKIP, _reason(err), loc)
            continue
        assert raw is not None
        if doc is None:
            if _DOC_OPEN.match(raw):
                doc = _DocAssembler(loc, opts)
            elif raw.strip():
                yield (SKIP, "text_outside_doc", loc)
            continue
        if raw.rstrip() == b"</doc>":
            item = doc.finish()
            # WikiExtractor puts the title on the first line: a document that is only its title
            # (redirects, stubs) carries no text and is counted as empty.
            if item[0] == DOC and "\n" not in item[1].strip("\n") and not opts.keep_empty:
                item = (SKIP, "empty", doc.loc)
            yield item
            doc = None
            continue
        line = _decode_line(raw)
        if line is None:
            if doc.bad is None:
                doc.bad, doc.bad_loc = "invalid_utf8", loc
            continue
        if doc.bad is None:
            yield from doc.add(line)
    if doc is not None:
        yield (SKIP, "unterminated_doc", doc.loc)


def _read_text(path: str, opts: ReadOptions) -> Iterator[Item]:
    """One file = one document (a book). Gutenberg header/footer optionally stripped."""
    doc = _DocAssembler(f"{path}:1", opts)
    header: list[str] | None = [] if opts.strip_gutenberg else None
    for lineno, raw, err in _lines(path, opts.max_line_bytes):
        loc = f"{path}:{lineno}"
        if err is not None:
            yield (SKIP, _reason(err), loc)
            return
        assert raw is not None
        line = _decode_line(raw)
        if line is None:
            if doc.bad is None:
                doc.bad, doc.bad_loc = "invalid_utf8", loc
            continue
        if opts.strip_gutenberg:
            if header is not None:
                if _PG_START.match(line):
                    header = None  # drop everything up to and including the START marker
                    continue
                header.append(line)
                if len(header) < _PG_HEADER_SCAN_LINES:
                    continue
                lines, header = header, None  # no marker near the top: not a Gutenberg header
                for ln in lines:
                    if doc.bad is None:
                        yield from doc.add(ln)
                continue
            if _PG_END.match(line):
                break
        if doc.bad is None:
            yield from doc.add(line)
    if header:
        for ln in header:
            if doc.bad is None:
                yield from doc.add(ln)
    yield doc.finish()


def _read_parquet(path: str, opts: ReadOptions) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        yield (SKIP, "read_error", f"{path}:0 ({e})")
        return
    if opts.text_key not in pf.schema_arrow.names:
        yield (SKIP, "missing_text", f"{path}:0 (no column {opts.text_key!r})")
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[opts.text_key]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield _check_text(value, f"{path}:{row}", opts)
    except Exception as e:
        yield (SKIP, "read_error", f"{path}:{row + 1} ({e})")


def _read_hf(spec: str, opts: ReadOptions) -> Iterator[Item]:
    """``hf:NAME[:CONFIG][@SPLIT]``: hub name (online) or local path/builder, streamed."""
    import datasets

    body, _, split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    for row, rec in enumerate(ds, start=1):
        yield _check_text(rec.get(opts.text_key), f"{spec}:{row}", opts)

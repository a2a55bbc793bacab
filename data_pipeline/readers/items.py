"""What every reader yields: ``Item`` tuples, their kinds and skip reasons, and the document assembler.

An ``Item`` is ``(kind, text, loc)``:

- ``DOC``: one whole document ``text``;
- ``PART``/``LAST``: a document longer than ``max_doc_bytes`` streamed in pieces (never loaded whole);
  ``PART`` pieces are followed by exactly one ``LAST`` piece;
- ``SKIP``: a record that could not be used; ``text`` is the reason (``invalid_json``, ``invalid_utf8``,
  ``missing_text``, ``non_string_text``, ``empty``, ``blank_line``, ``line_too_long``,
  ``truncated_compressed``, ``read_error``, ``text_outside_doc``, ``unterminated_doc``; MediaWiki dumps:
  ``redirect``, ``namespace``, ``invalid_bz2``, ``invalid_xml``, ``invalid_wikitext``), ``loc`` is
  ``file:line`` (or ``file:row``, ``file:PAGEID``).

This module also owns what the line-based formats (``text``, ``wikidoc``) share once bytes are read:
UTF-8 decoding with CRLF -> LF, the empty/missing checks, and ``DocAssembler``, which turns decoded
lines into DOC, or PART ... LAST pieces, or one SKIP when any line of the document is bad.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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
        "invalid_bz2",
        "invalid_xml",
        "invalid_wikitext",
    }
)


@dataclass(frozen=True)
class ReadOptions:
    """How every reader reads (the same for all formats; preprocess derives it from its ``Settings``)."""

    text_key: str = "text"
    strip_gutenberg: bool = False
    keep_empty: bool = False  # Megatron keeps empty documents as empty index entries
    max_doc_bytes: int = 8 << 20  # longer documents are streamed in pieces
    max_line_bytes: int = 64 << 20  # longer JSON lines are skipped (they cannot be parsed in pieces)
    titles: bool = True  # wikidoc and mediawiki: keep the article's title as its first line (--no-titles)


def reason(err: str) -> str:
    """The skip reason of a line/block iterator's error (``"read_error: [Errno 5] ..."`` -> ``read_error``)."""
    return err.split(":", 1)[0]


def check_text(text: object, loc: str, opts: ReadOptions) -> Item:
    """A record's text field as a DOC, or the SKIP saying why it cannot be one."""
    if text is None:
        return (SKIP, "missing_text", loc)
    if not isinstance(text, str):
        return (SKIP, "non_string_text", loc)
    if not opts.keep_empty and (not text or text.isspace()):  # (strip() would copy the document)
        return (SKIP, "empty", loc)
    return (DOC, text, loc)


def decode_line(raw: bytes) -> str | None:
    """One raw line as text with its CRLF (or lone trailing CR) made LF; None if it is not UTF-8."""
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


def decode_block(block: bytes, lineno: int) -> tuple[str, int]:
    """A block of whole lines -> (text of the lines before the first invalid UTF-8 line, CRLF -> LF as
    ``decode_line``; that line's number, or 0 if the block is valid). ``lineno``: the block's first line."""
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


class DocAssembler:
    """Accumulates decoded lines of one document; emits PART pieces past ``max_doc_bytes``.

    A bad line (``mark_bad``) makes the whole document a SKIP at ``finish``; lines added after it are
    dropped, since they can no longer be written. ``drop_first_line``: the first line that is not blank
    (not just ``"\n"``; a WikiExtractor title, ``--no-titles``) is dropped, on the line and block paths alike,
    before it counts towards ``max_doc_bytes``; the blank lines before it stay (``finish`` strips them).
    """

    def __init__(self, loc: str, opts: ReadOptions, drop_first_line: bool = False):
        self.loc, self.opts = loc, opts
        self.drop_first = drop_first_line  # still to drop
        self.buf: list[str] = []
        self.size = 0
        self.emitted_parts = False
        self.bad: str | None = None
        self.bad_loc = loc

    def mark_bad(self, why: str, loc: str) -> None:
        """Record the document's first bad line (later ones do not change the reason or location)."""
        if self.bad is None:
            self.bad, self.bad_loc = why, loc

    def add(self, line: str) -> Iterator[Item]:
        if self.bad is not None:
            return
        if self.drop_first and line != "\n":
            self.drop_first = False
            return
        self.buf.append(line)
        self.size += len(line)  # characters: a cheap bound on bytes/4..bytes
        if self.size >= self.opts.max_doc_bytes:
            self.emitted_parts = True
            piece, self.buf, self.size = "".join(self.buf), [], 0
            yield (PART, piece, self.loc)

    def add_text(self, text: str) -> Iterator[Item]:
        """``add`` for a run of whole lines at once: PART pieces are cut exactly where line-by-line
        ``add`` would cut them (after the line whose last character reaches ``max_doc_bytes``)."""
        if self.bad is not None:
            return
        if self.drop_first:
            text = self._drop_first_line(text)
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

    def _drop_first_line(self, text: str) -> str:
        """``text`` (whole lines) without its first non-blank line, as ``add`` line by line would drop it."""
        i, n = 0, len(text)
        while i < n and text[i] == "\n":
            i += 1
        if i == n:  # only blank lines: the first line is still to come
            return text
        self.drop_first = False
        nl = text.find("\n", i)
        end = n if nl < 0 else nl + 1
        return text[:i] + text[end:] if i else text[end:]

    def add_raw(self, raw: bytes, loc: str) -> Iterator[Item]:
        """``add`` for an undecoded line (at ``loc``); invalid UTF-8 marks the document bad."""
        line = decode_line(raw)
        if line is None:
            self.mark_bad("invalid_utf8", loc)
        else:
            yield from self.add(line)

    def add_block(self, block: bytes, lineno: int, path: str) -> Iterator[Item]:
        """``add_text`` for an undecoded block of whole lines starting at line ``lineno`` of ``path``."""
        if self.bad is not None:
            return
        text, bad = decode_block(block, lineno)
        yield from self.add_text(text)
        if bad:
            self.mark_bad("invalid_utf8", f"{path}:{bad}")

    def finish(self) -> Item:
        """The document: DOC (surrounding blank lines dropped), the LAST piece, or the SKIP of its first
        bad line."""
        # A bad line anywhere skips the whole document, even after PART pieces were emitted: the
        # consumer drops an open streamed document when a SKIP arrives instead of its LAST piece.
        if self.bad:
            return (SKIP, self.bad, self.bad_loc)
        text = "".join(self.buf)
        self.buf = []  # the assembler outlives this call in the reader: do not hold the lines twice
        if self.emitted_parts:
            return (LAST, text, self.loc)
        text = text.strip("\n")  # rebinding frees the unstripped copy before the caller gets it
        return check_text(text, self.loc, self.opts)

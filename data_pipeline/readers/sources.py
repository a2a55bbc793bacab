"""Input sources: ``Source`` (a file or an ``hf:`` shard with its format), format detection, and how a
(possibly compressed) file is opened. ``inputs.py`` expands what the user named into sources.

Formats: ``jsonl`` (also ``.json`` lines and WikiExtractor ``--json`` output), ``wikidoc``
(WikiExtractor ``<doc ...>`` blocks), ``text`` (one document per file: books), ``parquet``, ``mediawiki``
(raw MediaWiki XML dumps, ``mediawiki.py``) and ``hf`` for ``hf:NAME[:CONFIG][@SPLIT]``. ``auto`` picks by
suffix, else by the first bytes.
"""

from __future__ import annotations

import bz2
import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmforge.common.errors import InputError as _CommonInputError

FORMATS = ("auto", "jsonl", "wikidoc", "text", "parquet", "mediawiki")
FINGERPRINT_METHODS = ("sampled", "full")
_TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md"}
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


class InputError(_CommonInputError):
    """Unusable input specification (missing path, unknown format)."""


@dataclass(frozen=True)
class Source:
    path: str  # file path as expanded, or "hf:NAME[:CONFIG][@SPLIT]" with "[shard I of N]" when N > 1
    format: str
    size: int  # bytes on disk (for hf: the shard's file when local, else 0: unknown)
    file: str = ""  # hf: the shard's data file, when it is exactly one known file; mediawiki: the dump's index

    @property
    def is_hf(self) -> bool:
        return self.path.startswith("hf:")


def compression(path: str) -> str:
    """``gz``, ``zst`` or ``""`` (by suffix)."""
    if path.endswith(".gz"):
        return "gz"
    if path.endswith(".zst"):
        return "zst"
    return ""


def splittable(src: Source) -> bool:
    """Whether ``src`` can be read in byte ranges (uncompressed JSON lines, WikiExtractor or parquet files;
    a parquet range owns whole row groups; a bz2 MediaWiki dump with its index owns whole bz2 streams)."""
    if src.format == "mediawiki":
        return bool(src.file) and src.path.endswith(".bz2")
    return src.format in ("jsonl", "wikidoc", "parquet") and not compression(src.path)


def open_binary(path: str) -> BinaryIO:
    """Open a possibly compressed file as a buffered binary stream (decompressed on the fly)."""
    comp = compression(path)
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
    comp = compression(path)
    base = path[: -len(comp) - 1] if comp else path
    suffix = Path(base).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _TEXT_SUFFIXES:
        return "text"
    # No telling suffix (WikiExtractor writes AA/wiki_00; a .xml or .bz2 file may be a MediaWiki dump or not):
    # sniff the first bytes.
    try:
        if path.endswith(".bz2"):
            with bz2.open(path, "rb") as f:
                head = f.read(4096)
            head = head.lstrip(b"\xef\xbb\xbf").lstrip()
            if _is_mediawiki(head):
                return "mediawiki"
        with open_binary(path) as f:
            head = f.read(4096)
    except Exception:
        return "text"  # the reader will report the read error with its location
    head = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if _is_mediawiki(head):
        return "mediawiki"
    if head.startswith(b"<doc"):
        return "wikidoc"
    if head.startswith(b"{"):
        return "jsonl"
    return "text"


def _is_mediawiki(head: bytes) -> bool:
    """The first bytes of a MediaWiki XML export (an XML declaration may come first)."""
    if head.startswith(b"<?xml"):
        head = head[head.find(b"?>") + 2 :].lstrip()
    return head.startswith(b"<mediawiki")

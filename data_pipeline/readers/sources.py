"""Input sources: what the user named (files, directories, globs, ``hf:`` datasets) as an ordered list of
``Source`` with a format each, how a (possibly compressed) file is opened, and content fingerprints.

Formats: ``jsonl`` (also ``.json`` lines and WikiExtractor ``--json`` output), ``wikidoc``
(WikiExtractor ``<doc ...>`` blocks), ``text`` (one document per file: books), ``parquet``, and
``hf`` for ``hf:NAME[:CONFIG][@SPLIT]``. ``auto`` picks by suffix, else by the first bytes.

An ``hf:`` spec expands to one source per shard of its streaming dataset (``hf.shards``), each with its
data file and size where ``datasets`` resolves one, so a dataset of many files is planned, distributed,
fingerprinted and resumed like those files given directly.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..common.errors import InputError as _CommonInputError

FORMATS = ("auto", "jsonl", "wikidoc", "text", "parquet")
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
    file: str = ""  # hf: the shard's data file, when it is exactly one known file

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
    """Whether ``src`` can be read in byte ranges (uncompressed JSON lines or WikiExtractor files)."""
    return src.format in ("jsonl", "wikidoc") and not compression(src.path)


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


def _expand_one(spec: str) -> list[str]:
    if os.path.isdir(spec):
        found = sorted(
            str(p)
            for p in Path(spec).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(spec).parts)
        )
        if not found:
            raise InputError(f"{spec}: directory has no files")
        return found
    if any(ch in spec for ch in "*?["):
        found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            raise InputError(f"{spec}: glob matches no files")
        return found
    if os.path.isfile(spec):
        return [spec]
    raise InputError(f"{spec}: no such file or directory")


def expand_inputs(specs: list[str], fmt: str = "auto") -> list[Source]:
    """Files, directories (recursive, sorted), globs and ``hf:`` datasets (one source per shard) ->
    ordered, de-duplicated sources."""
    if fmt not in FORMATS:
        raise InputError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    sources: dict[str, Source] = {}  # ordered set, by path
    for spec in specs:
        if spec.startswith("hf:"):
            from . import hf  # imports datasets: only when needed

            for sh in hf.shards(spec):
                sources.setdefault(sh.path, Source(sh.path, "hf", sh.size, sh.file))
            continue
        for p in _expand_one(spec):
            if p not in sources:
                sources[p] = Source(p, detect_format(p) if fmt == "auto" else fmt, os.path.getsize(p))
    return list(sources.values())


def fingerprint(src: Source, method: str = "sampled", samples: int = 16, block: int = 1 << 16) -> str:
    """Content fingerprint of a source.

    ``sampled`` (default): sha256 of the path, the size and ``samples`` evenly spaced 64 KiB blocks
    (the whole file when smaller). Reading whole inputs twice (once to hash, once to tokenize) would
    double the I/O of a 40 GB run; sampled blocks catch truncation, appends and replaced files, which is
    what resume checks need, but not an edit that keeps the size and misses every block.
    ``full``: sha256 of the path, the size and every byte (streamed), for a guarantee.
    An ``hf:`` shard with a local data file is fingerprinted by that file's bytes the same way (and its
    name); one with a remote file by the file's URL (which holds the dataset's commit); any other by the
    dataset's resolved data files (``hf.identity``).
    """
    if method not in FINGERPRINT_METHODS:
        raise InputError(f"unknown fingerprint method {method!r}; choose from {', '.join(FINGERPRINT_METHODS)}")
    h = hashlib.sha256(f"{src.path}|{src.size}|".encode())
    data = src.path
    if src.is_hf:
        from . import hf

        h.update(f"{src.file}|".encode() if src.file else hf.identity(src.path).encode())
        if not (src.file and os.path.isfile(src.file)):
            return h.hexdigest()
        data = src.file
    with open(data, "rb") as f:
        if method == "full" or src.size <= samples * block:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        else:
            step = (src.size - block) // (samples - 1)
            for i in range(samples):
                f.seek(i * step)
                h.update(f.read(block))
    return h.hexdigest()

"""Streaming document readers with bounded memory and honest accounting of bad input.

``iter_documents(source, options)`` yields ``Item`` tuples ``(kind, text, loc)`` (``items``): whole
documents, pieces of documents too long to hold, or a skip reason at ``file:line``. Every record read is
one of them: nothing is lost silently.

    inputs.py    what the user named -> ordered ``Source`` list; content fingerprints
    sources.py   ``Source``, format detection, decompression
    lines.py     raw lines or blocks of lines of a file, byte ranges (``ReadRange``)
    items.py     item kinds, skip reasons, decoding and the document assembler the formats share
    jsonl.py, wikidoc.py, text.py, parquet.py, mediawiki.py, hf.py
                 one module per input format

Byte ranges (``ReadRange``) let one huge uncompressed ``jsonl``/``wikidoc`` file be read as several
independent parts whose records, in order, are exactly the records of the whole file (``lines``); a
``parquet`` file's range owns the row groups that start in it (``parquet``), a MediaWiki dump's the bz2
streams that start in it (``mediawiki``, with the dump's index). ``split_ranges`` says where a big file is
cut. A MediaWiki ``.bz2`` dump's streams can be converted on the processes of a ``StreamPool``
(``iter_documents(..., pool=)``), the items the same, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from . import hf, jsonl, mediawiki, parquet, text, wikidoc
from .inputs import expand_inputs, fingerprint
from .items import DOC, ERROR_REASONS, LAST, PART, SKIP, Item, ReadOptions
from .lines import ReadRange, count_newlines
from .mediawiki import StreamPool
from .sources import FINGERPRINT_METHODS, FORMATS, InputError, Source, open_binary, splittable

__all__ = [
    "DOC", "PART", "LAST", "SKIP", "ERROR_REASONS", "FINGERPRINT_METHODS", "FORMATS", "InputError", "Item",
    "ReadOptions", "ReadRange", "Source", "StreamPool", "count_newlines", "expand_inputs", "fingerprint",
    "iter_documents", "open_binary", "split_ranges", "splittable", "uses_stream_pool",
]

_READERS: dict[str, Callable[[str, ReadOptions, ReadRange | None], Iterator[Item]]] = {
    "jsonl": jsonl.read,
    "wikidoc": wikidoc.read,
    "text": text.read,
    "parquet": parquet.read,
    "hf": hf.read,
}


def iter_documents(src: Source, opts: ReadOptions, rng: ReadRange | None = None,
                   pool: StreamPool | None = None) -> Iterator[Item]:
    """Items of ``src`` (or of the byte range ``rng`` of it: only for ``splittable`` sources). ``pool``: the
    processes that convert a MediaWiki dump's streams (``uses_stream_pool``); other formats ignore it."""
    if rng is not None and not splittable(src):
        raise InputError(f"{src.path}: a {src.format} source cannot be read in byte ranges")
    if src.format == "mediawiki":
        yield from mediawiki.read(src.path, opts, rng, index=src.file or None, pool=pool)
        return
    read = _READERS.get(src.format)
    if read is None:
        raise InputError(f"{src.path}: unknown format {src.format!r}")
    yield from read(src.path, opts, rng)


def uses_stream_pool(src: Source) -> bool:
    """Whether ``iter_documents`` reads ``src`` faster with a ``StreamPool`` (a ``.bz2`` MediaWiki dump)."""
    return src.format == "mediawiki" and mediawiki.uses_pool(src.path)


def split_ranges(src: Source, unit_bytes: int) -> list[tuple[int, int]] | None:
    """The byte ranges ``[lo, hi)`` a ``splittable`` source larger than ``unit_bytes`` is read in (they tile
    the file, in order), or None to read it whole. JSON lines and WikiExtractor files: every
    ``unit_bytes`` (the reader aligns each range to records); parquet: runs of whole row groups of about
    ``unit_bytes`` compressed bytes, cut where a row group starts (``parquet.split_ranges``); a MediaWiki
    dump with its index: runs of whole bz2 streams, cut where a stream starts (``mediawiki.split_ranges``).
    Depends only on the file (and its index) and ``unit_bytes``."""
    if src.size <= unit_bytes or not splittable(src):
        return None
    if src.format == "parquet":
        return parquet.split_ranges(src.path, src.size, unit_bytes)
    if src.format == "mediawiki":
        return mediawiki.split_ranges(src.path, src.file, src.size, unit_bytes)
    return [(lo, min(lo + unit_bytes, src.size)) for lo in range(0, src.size, unit_bytes)]

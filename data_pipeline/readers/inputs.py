"""What the user named (files, directories, globs, ``hf:`` datasets) as an ordered list of ``Source``, and
the sources' content fingerprints.

An ``hf:`` spec expands to one source per shard of its streaming dataset (``hf.shards``), each with its
data file and size where ``datasets`` resolves one, so a dataset of many files is planned, distributed,
fingerprinted and resumed like those files given directly. (``hf`` imports ``datasets`` only inside the
functions that need it.)

A MediaWiki ``.xml.bz2`` dump gets its index (``mediawiki``): the one named by ``--wiki-index`` (the
``wiki_indexes`` its callers pass to ``expand_inputs``), else ``NAME-index.txt.bz2`` beside ``NAME.xml.bz2``;
the index is validated here, so a bad one stops the run before any work, and an index that is itself among
the expanded inputs (a directory holding both) is not read as an input.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from . import hf, mediawiki
from .sources import FINGERPRINT_METHODS, FORMATS, InputError, Source, detect_format


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


def expand_inputs(specs: list[str], fmt: str = "auto", wiki_indexes: Sequence[str] = ()) -> list[Source]:
    """Files, directories (recursive, sorted), globs and ``hf:`` datasets (one source per shard) ->
    ordered, de-duplicated sources; a MediaWiki dump's ``Source.file`` is its index. ``wiki_indexes``
    (``--wiki-index``): the indexes of the ``.xml.bz2`` MediaWiki dumps among the sources, the i-th for the
    i-th such dump in input order; dumps beyond them use the index beside them (see the module docstring)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    sources: dict[str, Source] = {}  # ordered set, by path
    for spec in specs:
        if spec.startswith("hf:"):
            for sh in hf.shards(spec):
                sources.setdefault(sh.path, Source(sh.path, "hf", sh.size, sh.file))
            continue
        for p in _expand_one(spec):
            if p not in sources:
                sources[p] = Source(p, detect_format(p) if fmt == "auto" else fmt, os.path.getsize(p))
    return _with_wiki_indexes(list(sources.values()), list(wiki_indexes))


def _with_wiki_indexes(sources: list[Source], given: list[str]) -> list[Source]:
    dumps = [i for i, s in enumerate(sources) if s.format == "mediawiki" and s.path.endswith(".bz2")]
    if len(given) > len(dumps):
        raise InputError(f"--wiki-index names {len(given)} index(es) for {len(dumps)} .xml.bz2 MediaWiki dump(s) "
                         "among the inputs")
    for k, i in enumerate(dumps):
        s = sources[i]
        index = given[k] if k < len(given) else mediawiki.index_beside(s.path)
        if index is None:
            mediawiki.note_no_index(s.path)
            continue
        if not os.path.isfile(index):
            raise InputError(f"{index}: no such index file (--wiki-index for {s.path})")
        mediawiki.stream_offsets(index, s.size)  # validated now: a bad index stops the run before any work
        sources[i] = Source(s.path, s.format, s.size, index)
    indexes = {os.path.realpath(s.file) for s in sources if s.format == "mediawiki" and s.file}
    return [s for s in sources if s.is_hf or os.path.realpath(s.path) not in indexes]


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
    if src.format == "mediawiki" and src.file:  # its index decides the units: a changed one is a changed input
        h.update(fingerprint(Source(src.file, "text", os.path.getsize(src.file)), method, samples, block).encode())
    data = src.path
    if src.is_hf:
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

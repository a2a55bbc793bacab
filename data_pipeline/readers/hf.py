"""Hugging Face datasets ``hf:NAME[:CONFIG][@SPLIT]`` (a hub name, online, or a local directory of data
files, with or without a ``README.md`` that configures them), read with ``datasets`` streaming: one
document per record, its text in ``opts.text_key``. Never split into byte ranges.

Shards: a streaming dataset is a list of shards (``IterableDataset.n_shards``: for the packaged formats,
one per data file) whose records, shard after shard, are exactly the records of the whole dataset. So
``shards(spec)`` turns one spec into one source per shard, ``SPEC[shard I of N]`` (the plain ``SPEC`` when
``N`` is 1), read with ``ds.shard(num_shards=N, index=I, contiguous=True)``; preprocess groups and
distributes them like files, so workers and MPI ranks read a dataset of thousands of files in parallel and
resume per shard, in an order that depends only on the dataset. When the split's resolved data files map
one to one onto the shards (the packaged json/parquet/csv/text builders), each shard knows its file:

- its size on disk (local files; hub files count as unknown, 0) balances units across ranks,
- its content fingerprints the source like a local file (``sources.fingerprint``; a hub file's URL holds
  the dataset's commit, so it identifies the content), so a changed dataset is refused on resume,
- locations are ``FILE:ROW`` (the record's number in that file, from 1), which a user can open.

Otherwise (another builder) locations are ``SOURCE:ROW`` and the fingerprint covers the spec, the shard
count and the resolved data files' names and sizes. A shard that fails to parse (a JSON syntax error, a
file whose columns differ from the dataset's) ends in one ``read_error`` at the first row not read, with
``datasets``' reason: it cannot go on inside that file (the json builder parses a file in blocks of
several MB, so the rows of the failed block before the bad one are lost too; they are not counted).

The dataset is resolved once per process (``_resolve``: ``load_dataset_builder`` then
``as_streaming_dataset``; about a second) and every shard reads from that object. ``ds.shard`` costs time
linear in the shard count (13 ms at 2,000 shards), so taking N shards one by one would be quadratic; a
dataset of more than ``_DIRECT`` shards is first cut into about sqrt(N) contiguous blocks (made once, on
first use), and a shard is taken from its block: ``datasets`` documents the contiguous split (the first
``N % B`` blocks hold one shard more), so shard I is block J's shard ``I - start(J)``.

Torch: ``datasets`` imports torch whenever it is installed to build every IterableDataset (a shared-
memory epoch counter for DataLoader workers), which cost each process 1.2 CPU-s and 220 MB here for
nothing: ``_no_torch`` hides it while this module builds its datasets (the flag is restored after, so
the rest of the process sees ``datasets`` unchanged).

Exit: Arrow's parquet scanner threads that are still referenced when the interpreter shuts down (by the
cached datasets, or by garbage cycles) abort the process, ``terminate called without an active
exception``, exit 134 after all work is done (huggingface/datasets#7566, apache/arrow#45214; here about
one run in 30 on a local parquet dataset). An ``atexit`` hook drops the cached datasets and collects
garbage while Arrow is still alive.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from .items import SKIP, Item, ReadOptions, check_text
from .lines import ReadRange
from .sources import InputError

_SHARD = re.compile(r"^(hf:.*)\[shard (\d+) of (\d+)\]$")
USAGE = "hf:NAME[:CONFIG][@SPLIT]"
_DIRECT = 64  # up to this many shards, ds.shard is called on the whole dataset


@dataclass(frozen=True)
class Shard:
    path: str  # the source path: the spec, or ``SPEC[shard I of N]`` when the dataset has N > 1 shards
    file: str  # the shard's data file when it is exactly one known file, else ""
    size: int  # the file's bytes on disk when it is local, else 0 (unknown)


@dataclass
class _Dataset:
    ds: object  # datasets.IterableDataset
    n: int
    files: tuple[str, ...]  # the split's resolved data files (may be empty)
    per_shard: bool  # files[i] is shard i
    blocks: dict[int, object] = field(default_factory=dict)  # block number -> its IterableDataset

    def shard(self, index: int):
        """Shard ``index`` as its own IterableDataset (via its block past ``_DIRECT`` shards)."""
        n = self.n
        if n <= _DIRECT:
            with _no_torch():
                return self.ds.shard(num_shards=n, index=index, contiguous=True)
        b = math.isqrt(n - 1) + 1  # blocks: ceil(sqrt(n)) <= n
        div, mod = divmod(n, b)  # blocks j < mod hold div + 1 shards, the others div
        j = index // (div + 1) if index < mod * (div + 1) else mod + (index - mod * (div + 1)) // div
        start, size = div * j + min(j, mod), div + (j < mod)
        with _no_torch():
            if j not in self.blocks:
                self.blocks[j] = self.ds.shard(num_shards=b, index=j, contiguous=True)
            return self.blocks[j].shard(num_shards=size, index=index - start, contiguous=True)


def parse(spec: str) -> tuple[str, str, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (name, config or "", split, "train" by default)."""
    if not spec.startswith("hf:"):
        raise InputError(f"{spec}: not an hf: source ({USAGE})")
    body, at, split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise InputError(f"{spec}: no dataset name ({USAGE})")
    if at and not split:
        raise InputError(f"{spec}: empty split after '@' ({USAGE})")
    return name, config, split or "train"


def split_path(path: str) -> tuple[str, int | None, int]:
    """A source path -> (spec, shard index or None for the whole dataset, shard count or 0)."""
    m = _SHARD.match(path)
    if m is None:
        return path, None, 0
    return m.group(1), int(m.group(2)), int(m.group(3))


@contextlib.contextmanager
def _no_torch():
    """Build IterableDatasets without importing torch (see the module docstring)."""
    import datasets

    cfg = datasets.config
    old = getattr(cfg, "TORCH_AVAILABLE", None)
    if old is None or "torch" in sys.modules:
        yield
        return
    cfg.TORCH_AVAILABLE = False
    try:
        yield
    finally:
        cfg.TORCH_AVAILABLE = old


def _release() -> None:
    """(atexit) Join Arrow's scanner threads before the interpreter tears Arrow down."""
    _resolve.cache_clear()
    gc.collect()


@functools.lru_cache(maxsize=16)
def _resolve(spec: str) -> _Dataset:
    import datasets

    atexit.unregister(_release)  # (once, however many datasets)
    atexit.register(_release)

    name, config, split = parse(spec)
    try:
        builder = datasets.load_dataset_builder(name, config or None)
        with _no_torch():
            ds = builder.as_streaming_dataset(split=split)
    except Exception as e:  # unknown dataset, config or split; offline; no data files: datasets says which
        raise InputError(f"{spec}: cannot open the dataset ({type(e).__name__}: {e})") from None
    data_files = {str(k): v for k, v in (builder.config.data_files or {}).items()}
    files = tuple(str(f) for f in data_files.get(split, ()))
    n = ds.n_shards
    if n < 1:
        raise InputError(f"{spec}: the dataset has no shards")
    return _Dataset(ds, n, files, len(files) == n)


def shards(spec: str) -> list[Shard]:
    """The sources of ``spec``, one per shard of its streaming dataset, in the dataset's order."""
    if split_path(spec)[1] is not None:
        raise InputError(f"{spec}: name a whole dataset ({USAGE}); preprocess picks the shards")
    d = _resolve(spec)
    out = []
    for i in range(d.n):
        f = d.files[i] if d.per_shard else ""
        size = os.path.getsize(f) if f and os.path.isfile(f) else 0
        out.append(Shard(spec if d.n == 1 else f"{spec}[shard {i} of {d.n}]", f, size))
    return out


def identity(path: str) -> str:
    """What fingerprints a shard without one known file: the resolved data files' names and local sizes."""
    d = _resolve(split_path(path)[0])
    return "|".join(f"{f}:{os.path.getsize(f) if os.path.isfile(f) else ''}" for f in d.files)


def read(path: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    """Records of the source ``path`` (a whole dataset or one shard, see the module docstring) as items
    at ``FILE:ROW`` or ``SOURCE:ROW``; ``rng`` is always None (not splittable)."""
    spec, index, n = split_path(path)
    d = _resolve(spec)
    ds, where = d.ds, path
    if index is not None:
        if n != d.n or index >= n:
            raise InputError(f"{path}: the dataset now has {d.n} shards, not {n} (it changed)")
        ds = d.shard(index)
        if d.per_shard:
            where = d.files[index]
    elif d.n == 1 and d.per_shard:
        where = d.files[0]
    row = 0
    try:
        for rec in ds:
            row += 1
            yield check_text(rec.get(opts.text_key), f"{where}:{row}", opts)
    except Exception as e:  # a parse error ends the shard: datasets cannot go on inside it
        yield (SKIP, "read_error", f"{where}:{row + 1} ({type(e).__name__}: {e})")

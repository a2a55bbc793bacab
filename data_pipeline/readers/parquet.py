"""Parquet files: one document per row, its text in the column ``opts.text_key``; read in record
batches, so memory is bounded by a batch, not the file. Never split into byte ranges."""

from __future__ import annotations

from collections.abc import Iterator

from .items import SKIP, Item, ReadOptions, check_text
from .lines import ReadRange


def read(path: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    """Rows of ``path`` as items at ``file:row``; ``rng`` is always None (parquet is not splittable)."""
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
                yield check_text(value, f"{path}:{row}", opts)
    except Exception as e:
        yield (SKIP, "read_error", f"{path}:{row + 1} ({e})")

"""Parquet files: one document per row, its text in the column ``opts.text_key``; read in record
batches, so memory is bounded by a batch, not the file.

Row groups are the units a big file is split into (``split_ranges``), so one multi-GB shard of a published
corpus spreads over workers and ranks. A part of a file is a byte range ``[start, end)``, as for the text
formats, and it owns the row groups whose *first byte* lies in it (``row_groups``: the smallest page
offset of the group's column chunks, from the footer). The row groups of a file lie one after the other,
so the row groups of consecutive ranges, in order, are exactly the row groups of the whole file, whatever
the cut; ``split_ranges`` cuts at row group starts, into runs of whole row groups of about
``unit_bytes`` (by their compressed size on disk), so no range is empty. Row numbers (``file:row``) always
count from the file start: the rows of the row groups before the range are summed from the footer, so a
part's locations need no correction (``ReadRange.absolute``).
"""

from __future__ import annotations

from collections.abc import Iterator

from .items import SKIP, Item, ReadOptions, check_text
from .lines import ReadRange


def row_groups(meta) -> list[tuple[int, int, int]] | None:
    """(first byte, compressed bytes, rows) of every row group of a ``pyarrow`` file metadata, or None
    when they do not lie in increasing order (a file that is then never split)."""
    groups = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        starts, size = [], 0
        for j in range(rg.num_columns):
            c = rg.column(j)
            first = c.data_page_offset
            if c.has_dictionary_page and c.dictionary_page_offset and c.dictionary_page_offset > 0:
                first = min(first, c.dictionary_page_offset)
            starts.append(first)
            size += c.total_compressed_size
        groups.append((min(starts) if starts else 0, size, rg.num_rows))
    if any(b[0] <= a[0] for a, b in zip(groups, groups[1:])) or any(g[0] <= 0 for g in groups):
        return None
    return groups


def split_ranges(path: str, size: int, unit_bytes: int) -> list[tuple[int, int]] | None:
    """Byte ranges tiling ``[0, size)``, each starting at a row group (the first at 0) and holding a run of
    whole row groups of about ``unit_bytes`` compressed bytes (a bigger row group is a range alone); None
    when the file is not to be split (one row group or fewer, unreadable, row groups out of order)."""
    import pyarrow.parquet as pq

    try:
        groups = row_groups(pq.ParquetFile(path).metadata)
    except Exception:
        return None  # the reader reports the error at path:0
    if groups is None or len(groups) < 2:
        return None
    cuts = [0]
    held = 0
    for start, nbytes, _ in groups:
        if held and held + nbytes > unit_bytes:
            cuts.append(start)
            held = 0
        held += nbytes
    if len(cuts) < 2:
        return None
    return [(lo, hi) for lo, hi in zip(cuts, [*cuts[1:], size])]


def read(path: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    """Rows of ``path`` (or of the row groups the byte range ``rng`` owns) as items at ``file:row``, the
    row counted from the file start. What concerns the whole file (unreadable, no text column) is reported
    once, by the range that starts at 0."""
    import pyarrow.parquet as pq

    first_part = rng is None or rng.start == 0
    if rng is not None:
        rng.absolute = True
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        if first_part:
            yield (SKIP, "read_error", f"{path}:0 ({e})")
        return
    if opts.text_key not in pf.schema_arrow.names:
        if first_part:
            yield (SKIP, "missing_text", f"{path}:0 (no column {opts.text_key!r})")
        return
    meta = pf.metadata
    owned = list(range(meta.num_row_groups))
    row = 0  # rows before the first owned row group
    if rng is not None:
        groups = row_groups(meta)
        if groups is None:  # never split by the plan: the range at 0 owns the whole file
            owned = owned if first_part else []
        else:
            end = rng.end if rng.end is not None else float("inf")
            owned = [i for i, (start, _, _) in enumerate(groups) if rng.start <= start < end]
            row = sum(rows for _, _, rows in groups[: owned[0]]) if owned else 0
        rng.lines = sum(meta.row_group(i).num_rows for i in owned)
    if not owned:
        return
    try:  # (owned row groups are consecutive: their starts increase)
        for batch in pf.iter_batches(batch_size=1024, row_groups=owned, columns=[opts.text_key]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield check_text(value, f"{path}:{row}", opts)
    except Exception as e:
        yield (SKIP, "read_error", f"{path}:{row + 1} ({e})")

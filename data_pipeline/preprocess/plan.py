"""Work planning: inputs -> units -> ranks, and the shard names a unit writes.

A *unit* is a list of segments: consecutive sources totalling about ``unit_bytes`` on disk, or one byte
range of a big splittable file (``readers.split_ranges``: record-aligned ranges of a JSON-lines or
WikiExtractor file, runs of whole row groups of a parquet file, each range owning the row groups that start
in it, runs of whole bz2 streams of a MediaWiki dump with its index, each range owning the streams that
start in it). A segment is always (source, first byte, end byte), so its size is ``end - start`` for every
format. The plan depends only on the sources and ``unit_bytes``, never on the worker or rank count, and
a unit's shards are named by its number: that is why the output bytes do not depend on how the work is
distributed.

The shards of an ``hf:`` dataset are sources too (``readers.hf``): small ones are grouped like small
files, and a shard of unknown size (a hub file) is a unit alone, since it may be large (hub datasets
are typically cut into files of hundreds of MB) and grouping by a size of 0 would put a whole dataset of
thousands of shards back into one unit.
"""

from __future__ import annotations

from ..readers import Source, split_ranges

# (source index, start byte, end byte); end -1 = the whole source, read without a range.
Segment = tuple[int, int, int]


def plan_units(sources: list[Source], unit_bytes: int) -> list[list[Segment]]:
    """Group consecutive sources into units of about ``unit_bytes``; a splittable file larger than that
    becomes one unit per byte range (``readers.split_ranges``), any other big file (or hf: shard of
    unknown size) a unit alone."""
    units: list[list[Segment]] = []
    cur: list[Segment] = []
    size = 0
    for i, s in enumerate(sources):
        ranges = split_ranges(s, unit_bytes)
        if ranges is not None:
            if cur:
                units.append(cur)
                cur, size = [], 0
            units.extend([(i, lo, hi)] for lo, hi in ranges)
            continue
        if s.is_hf and s.size == 0:  # unknown size
            if cur:
                units.append(cur)
                cur, size = [], 0
            units.append([(i, 0, -1)])
            continue
        if cur and size + s.size > unit_bytes:
            units.append(cur)
            cur, size = [], 0
        cur.append((i, 0, -1))
        size += max(s.size, 1)
    if cur:
        units.append(cur)
    return units


def segment_bytes(sources: list[Source], seg: Segment) -> int:
    """Input bytes of a segment (at least 1: an empty file still costs a unit some work)."""
    i, lo, hi = seg
    return max(sources[i].size if hi < 0 else hi - lo, 1)


def unit_bytes_of(sources: list[Source], unit: list[Segment]) -> int:
    return sum(segment_bytes(sources, seg) for seg in unit)


def assign_units(unit_sizes: list[int], world: int) -> list[list[int]]:
    """Largest unit first to the least loaded rank; deterministic; each rank's list in unit order."""
    loads = [0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for u in sorted(range(len(unit_sizes)), key=lambda u: (-unit_sizes[u], u)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owned[r].append(u)
        loads[r] += unit_sizes[u]
    return [sorted(o) for o in owned]


def shard_prefix(split: str, unit: int, part: int) -> str:
    """Shard ``part`` of ``unit`` in ``split``, relative to the output directory."""
    return f"{split}/shard_{unit:05d}_{part:03d}"


def unit_shard_glob(unit: int) -> str:
    """Every file name ``unit`` writes in a split directory (finished shards and temporary files)."""
    return f"shard_{unit:05d}_*"

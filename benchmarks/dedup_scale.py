"""The deduplication exchange at scale, without text: exact-dedup signatures synthesised for N documents at a chosen
duplicate rate, then the exchange ``preprocess`` runs — keys partitioned over the ranks (``_partitioned_edges``,
alltoall) and the duplicate clusters resolved by the ranks together (``_resolve``) — timed, with each rank's
peak RSS. ``--old`` also times the resolution it replaced: every edge gathered at rank 0, a Python union-find
there, the answer scattered.

    python benchmarks/dedup_scale.py --docs 1000000                          # 1 rank
    .venv/bin/mpirun -n 4 .venv/bin/python benchmarks/dedup_scale.py --docs 10000000 --old

Documents are spread over 64 units (ids = unit << 32 | k, as preprocess numbers them), units dealt to the ranks
round-robin; each rank synthesises its own units' keys: a fraction ``--dup-rate`` of documents copy the key of a
random earlier document (so clusters form, including chains through copies of copies), the rest are random
128-bit keys. Prints one line per rank and a summary line on rank 0 (``--json`` appends it to a file).

``--near``: MinHash's near-duplicate grouping instead (the rounds of the Jaccard check, ``_verified_near``), on
synthetic LSH edges, without text: a fraction ``--dup-rate`` of documents are near copies, each with an edge to a
uniformly random earlier document (its star's centre: the smallest of their bucket) and, for 30% of them, a second
edge to another (a second band: stars share members, groups chain). The true Jaccard is a fixed oracle, no
shingle sets: each id's hash picks an offset in [0, 128) and a pair at offset distance d has (64 - d) / (64 + d)
(what two runs of 64 consecutive shingles would have), so about 16% of pairs reach the default bound 0.719 and
the rounds matter. Timed: the stars and the rounds (``_near_stars`` + ``_near_rounds``), against ``--near-path
old``: the rank-0 algorithm they replaced (a copy below: every edge gathered at rank 0, Python stars and
union-find there, pairs scattered to the ranks holding their members, measures gathered back, the result
scattered). Not timed, in either: the re-read of the texts and the fetch of representatives' shingle sets (the
same ``alltoall`` between the ranks holding the documents, before and after). Edges start on the rank holding
their copy (in ``preprocess`` they start on the rank their band's key hashes to: either way one routing step).
``--near-path both`` runs the new path, then the old, checks they decide the same, and gives each its own peak
RSS (Linux: the process's high-water mark, ``VmHWM``, is reset between them through ``/proc/self/clear_refs``).

    .venv/bin/mpirun -n 4 .venv/bin/python benchmarks/dedup_scale.py --near --docs 10000000 --near-path both
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmforge.common.launch_env import mpi_world  # noqa: E402
from lmforge.data_pipeline.preprocess.dedup import (  # noqa: E402
    MAX_ROUNDS,
    _clusters,
    _near_rounds,
    _near_stars,
    _owners,
    _partitioned_edges,
    _resolve,
    _total,
)

UNITS = 64


def synth(docs: int, dup_rate: float, units: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, keys (n, 2) uint64) of this rank's units. Duplicates copy the key of a uniformly random earlier
    document of the whole corpus: its key is recomputed from a global per-document seed, so ranks agree."""
    per_unit = docs // UNITS
    ids, keys = [], []
    for u in units:
        k = np.arange(per_unit, dtype=np.int64)
        g = u * per_unit + k  # global document index
        rng = np.random.default_rng([seed, u])
        is_dup = (rng.random(per_unit) < dup_rate) & (g > 0)
        src = np.where(is_dup, (rng.random(per_unit) * np.maximum(g, 1)).astype(np.int64), g)
        # the key of document j is a hash of the document it copies (one level: copies of copies share it
        # only when the source was itself an original; chains arise through the sources' own copies)
        base = src.astype(np.uint64)
        k0 = (base * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)) ^ (base >> np.uint64(7))
        k1 = (base * np.uint64(0xBF58476D1CE4E5B9)) ^ np.uint64(0x94D049BB133111EB)
        ids.append((np.int64(u) << np.int64(32)) + k)
        keys.append(np.stack([k0, k1], axis=1))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 2), np.uint64)
    return np.concatenate(ids), np.concatenate(keys)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# --------------------------------------------------------------------------------------------------
# --near: the grouping of MinHash's Jaccard check


def synth_near(docs: int, rate: float, units: list[int], seed: int) -> np.ndarray:
    """LSH edges (copy, earlier document) of this rank's units' near copies (see the module docstring)."""
    per_unit = docs // UNITS

    def doc_id(g: np.ndarray) -> np.ndarray:  # global document index -> id (unit << 32 | k)
        return ((g // per_unit) << np.int64(32)) + g % per_unit

    edges = [np.zeros((0, 2), np.int64)]
    for u in units:
        rng = np.random.default_rng([seed, u, 1])
        g = u * per_unit + np.arange(per_unit, dtype=np.int64)
        copy = g[(rng.random(per_unit) < rate) & (g > 0)]
        src = (rng.random(len(copy)) * copy).astype(np.int64)
        second = rng.random(len(copy)) < 0.3
        src2 = (rng.random(int(second.sum())) * copy[second]).astype(np.int64)
        edges.append(np.stack([doc_id(copy), doc_id(src)], axis=1))
        edges.append(np.stack([doc_id(copy[second]), doc_id(src2)], axis=1))
    return np.concatenate(edges)


def oracle(m: np.ndarray, rep: np.ndarray) -> np.ndarray:
    """The fixed Jaccard of each pair: offsets in [0, 128) from the ids' hash, (64 - d) / (64 + d) at distance d."""
    def off(x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(57)).astype(np.int64)

    d = np.abs(off(m) - off(rep))
    return np.maximum(64 - d, 0) / (64 + d)


def new_near(comm, edges: np.ndarray, owner: dict[int, int], bound: float) -> tuple[dict, dict]:
    owners = _owners(owner)
    centre, member, mine = _near_stars(comm, edges, owners)
    found, candidates, rounds = _near_rounds(comm, centre, member, mine, owners, oracle, bound)
    return found, {"clustered": _total(comm, len(mine)), "candidates": candidates, "rounds": rounds,
                   "removed": _total(comm, len(found))}


def _old_stars(edges: np.ndarray) -> dict[int, list[int]]:
    """(The old ``dedup._stars``.)"""
    stars: dict[int, set[int]] = {}
    for m, c in edges.tolist():
        stars.setdefault(c, {c}).add(m)
    return {c: sorted(ms) for c, ms in sorted(stars.items())}


def _old_components(stars: dict[int, list[int]], alive: set[int]) -> list[list[int]]:
    """(The old ``dedup._components``.)"""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while root in parent:
            root = parent[root]
        while x != root:
            parent[x], x = root, parent[x]
        return root

    for ms in stars.values():
        live = [x for x in ms if x in alive]
        for x in live[1:]:
            ra, rb = find(live[0]), find(x)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for x in alive:
        groups.setdefault(find(x), []).append(x)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def old_near(comm, edges: np.ndarray, owner: dict[int, int], bound: float) -> tuple[dict, dict]:
    """The rank-0 path ``_verified_near`` took before (its collectives and decisions; the re-read and the set
    fetch left out, the oracle measuring where the member's set was)."""
    everything = comm.gather(edges, root=0)
    stars: dict[int, list[int]] = {}
    alive: set[int] = set()
    asks = None
    if comm.rank == 0:
        stars = _old_stars(np.concatenate(everything))
        alive = {x for ms in stars.values() for x in ms}
        asks = [[] for _ in range(comm.size)]
        for x in sorted(alive):
            asks[owner[x >> 32]].append(x)
    comm.scatter(asks, root=0)  # (what each rank would re-read)
    stats = {"clustered": len(alive), "candidates": 0, "rounds": 0}
    found: dict[int, tuple[int, float]] = {}
    for rnd in range(MAX_ROUNDS + 1):
        parts = None
        if comm.rank == 0:
            pairs: list[tuple[int, int]] = []
            if rnd < MAX_ROUNDS:
                groups = _old_components(stars, alive)
                alive = {x for g in groups for x in g[1:]}
                for g in groups:
                    pairs.extend((m, g[0]) for m in g[1:])
            if rnd == 0:
                stats["candidates"] = len(pairs)
            parts = [[] for _ in range(comm.size)] if pairs else [None] * comm.size
            for m, rep in pairs:
                parts[owner[m >> 32]].append((m, rep))
        mine = comm.scatter(parts, root=0)
        if mine is None:
            break
        m = np.array([p[0] for p in mine], np.int64)
        rep = np.array([p[1] for p in mine], np.int64)
        measured = comm.gather(list(zip(m.tolist(), rep.tolist(), oracle(m, rep).tolist())), root=0)
        if comm.rank == 0:
            stats["rounds"] += 1
            for part in measured:
                for d, k, j in part:
                    if j >= bound:
                        found[d] = (k, j)
                        alive.discard(d)
    parts = None
    if comm.rank == 0:
        parts = [{} for _ in range(comm.size)]
        for d, kj in found.items():
            parts[owner[d >> 32]][d] = kj
        stats["removed"] = len(found)
    return comm.scatter(parts, root=0), comm.bcast(stats, root=0)


def hwm_gib(reset: bool = False) -> float:
    """This process's peak RSS since the last reset (``VmHWM``), GiB; ``reset`` starts a new peak from now."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def near_main(a, comm) -> int:
    units = list(range(comm.rank, UNITS, comm.size))
    owner = {u: u % comm.size for u in range(UNITS)}
    edges = synth_near(a.docs, a.dup_rate, units, a.seed)
    bound = (1 / 14) ** (1 / 8)  # jaccard_bound of the default 14 bands x 8 rows
    rss0 = rss_gib()
    results = {}
    for path in (["new", "old"] if a.near_path == "both" else [a.near_path]):
        hwm_gib(reset=True)
        comm.barrier()
        t0 = time.perf_counter()
        found, stats = (new_near if path == "new" else old_near)(comm, edges, owner, bound)
        comm.barrier()
        results[path] = {"s": time.perf_counter() - t0, "peak_rss_gib": hwm_gib(), "found": found, "stats": stats}
    if a.near_path == "both":
        assert results["new"]["found"] == results["old"]["found"], "the distributed rounds decide differently"
        assert results["new"]["stats"] == results["old"]["stats"], (results["new"]["stats"], results["old"]["stats"])
    stats = next(iter(results.values()))["stats"]
    rows = comm.gather({"rank": comm.rank, "edges": len(edges), "rss_before_gib": rss0,
                        **{f"{p}_s": r["s"] for p, r in results.items()},
                        **{f"{p}_peak_rss_gib": r["peak_rss_gib"] for p, r in results.items()}}, root=0)
    if comm.rank == 0:
        for r in rows:
            print(f"rank {r['rank']}: {r['edges']:,} LSH edges synthesised | "
                  + ", ".join(f"{p} {r[f'{p}_s']:.2f} s, peak RSS {r[f'{p}_peak_rss_gib']:.2f} GiB" for p in results)
                  + f" | synthetic input {r['rss_before_gib']:.2f} GiB")
        summary = {"mode": "near", "docs": a.docs, "ranks": comm.size, "dup_rate": a.dup_rate, **stats,
                   "edges": sum(r["edges"] for r in rows),
                   **{f"{p}_s": max(r[f"{p}_s"] for r in rows) for p in results},
                   **{f"{p}_peak_rss_gib_max": max(r[f"{p}_peak_rss_gib"] for r in rows) for p in results},
                   "per_rank": rows}
        print(f"dedup_scale --near: {a.docs:,} docs on {comm.size} rank(s), {summary['edges']:,} LSH edges, "
              f"{stats['clustered']:,} clustered, {stats['candidates']:,} round-0 pairs, {stats['rounds']} rounds, "
              f"{stats['removed']:,} removed: "
              + "; ".join(f"{p} {summary[f'{p}_s']:.2f} s, peak RSS per rank up to "
                          f"{summary[f'{p}_peak_rss_gib_max']:.2f} GiB" for p in results)
              + (" (same decisions)" if a.near_path == "both" else ""))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(summary) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--dup-rate", type=float, default=0.1, help="share of documents that copy an earlier one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--old", action="store_true", help="also time the rank-0 union-find it replaced")
    ap.add_argument("--json", help="append the summary to this JSON-lines file (rank 0)")
    ap.add_argument("--near", action="store_true", help="MinHash's near-duplicate grouping instead (see above)")
    ap.add_argument("--near-path", choices=("new", "old", "both"), default="new",
                    help="with --near: the distributed rounds, the old rank-0 path, or both (checked equal)")
    a = ap.parse_args()
    comm = mpi_world()
    if a.near:
        return near_main(a, comm)
    units = list(range(comm.rank, UNITS, comm.size))
    owner = {u: u % comm.size for u in range(UNITS)}
    ids, keys = synth(a.docs, a.dup_rate, units, a.seed)
    rss0 = rss_gib()
    comm.barrier()
    t0 = time.perf_counter()
    edges = _partitioned_edges(comm, [keys[:, 0], keys[:, 1]], ids)
    t1 = time.perf_counter()
    dups = _resolve(comm, edges, owner)
    comm.barrier()
    t2 = time.perf_counter()
    old_s = None
    if a.old:
        t3 = time.perf_counter()
        everything = comm.gather(edges, root=0)
        parts = None
        if comm.rank == 0:
            ref = _clusters(np.concatenate(everything))
            parts = [{} for _ in range(comm.size)]
            for d, k in ref.items():
                parts[owner[d >> 32]][d] = k
        old = comm.scatter(parts, root=0)
        comm.barrier()
        old_s = time.perf_counter() - t3
        assert old == dups, "the distributed resolution differs from the union-find"
    n_dup = sum(comm.allgather(len(dups)))
    rows = comm.gather({"rank": comm.rank, "docs": len(ids), "edges": len(edges), "dups": len(dups),
                        "partition_s": t1 - t0, "resolve_s": t2 - t1, "old_resolve_s": old_s,
                        "rss_before_gib": rss0, "peak_rss_gib": rss_gib()}, root=0)
    if comm.rank == 0:
        for r in rows:
            print(f"rank {r['rank']}: {r['docs']:,} docs, {r['edges']:,} edges, {r['dups']:,} duplicates | "
                  f"partition {r['partition_s']:.2f} s, resolve {r['resolve_s']:.2f} s"
                  + (f", old rank-0 union-find {r['old_resolve_s']:.2f} s" if r["old_resolve_s"] is not None else "")
                  + f" | peak RSS {r['peak_rss_gib']:.2f} GiB (synthetic input {r['rss_before_gib']:.2f})")
        summary = {"docs": a.docs, "ranks": comm.size, "dup_rate": a.dup_rate, "duplicates": n_dup,
                   "exchange_s": max(r["partition_s"] + r["resolve_s"] for r in rows),
                   "resolve_s": max(r["resolve_s"] for r in rows),
                   "old_resolve_s": rows[0]["old_resolve_s"],
                   "peak_rss_gib_max": max(r["peak_rss_gib"] for r in rows),
                   "peak_rss_gib_rank0": rows[0]["peak_rss_gib"], "per_rank": rows}
        print(f"dedup_scale: {a.docs:,} docs on {comm.size} rank(s), {n_dup:,} duplicates: exchange "
              f"{summary['exchange_s']:.2f} s (resolve {summary['resolve_s']:.2f} s"
              + (f"; the old rank-0 union-find {summary['old_resolve_s']:.2f} s" if a.old else "")
              + f"), peak RSS per rank up to {summary['peak_rss_gib_max']:.2f} GiB")
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

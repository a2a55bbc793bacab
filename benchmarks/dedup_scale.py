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
from lmforge.data_pipeline.preprocess.dedup import _clusters, _partitioned_edges, _resolve  # noqa: E402

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--dup-rate", type=float, default=0.1, help="share of documents that copy an earlier one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--old", action="store_true", help="also time the rank-0 union-find it replaced")
    ap.add_argument("--json", help="append the summary to this JSON-lines file (rank 0)")
    a = ap.parse_args()
    comm = mpi_world()
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

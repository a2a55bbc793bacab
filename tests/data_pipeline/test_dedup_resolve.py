"""The distributed duplicate-cluster resolution (``dedup._connected_components`` / ``_resolve``) against the
plain union-find it replaced (``dedup._clusters``, kept as the reference), in one process and on 4 real MPI
ranks (``mpirun -n 4``), on graphs shaped like real duplicate edges (stars of exact-key groups joined by
shared members, as LSH bands make them) and on the worst case for label propagation: long chains, in both
id orders.

And the distributed rounds of MinHash's Jaccard check (``dedup._near_stars`` / ``_near_rounds`` /
``_fetch_sets``) against the rank-0 algorithm they replaced (``reference_near``, ported here: every edge
gathered, stars and a Python union-find on one process), in one process and on 2 and 4 MPI ranks, with fake
shingle sets (runs of consecutive hashes at a pseudo-random offset per document, so the true ``jaccard`` of
two documents falls with the distance of their offsets and many proposed pairs are below the bound: rounds
matter), on random LSH stars sharing members and centres, chains, and dense stars whose centres drop out."""

from __future__ import annotations

import json
import sys

import numpy as np

from benchmarks.dedup_scale import _old_components, _old_stars
from lmforge.data_pipeline.preprocess import dedup
from lmforge.data_pipeline.preprocess.dedup import (
    MAX_ROUNDS,
    _clusters,
    _connected_components,
    _fetch_sets,
    _near_rounds,
    _near_stars,
    _owners,
    _resolve,
    _sorted_unique,
    _total,
    jaccard,
)


def graphs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    # Documents of 6 units (id = unit << 32 | k); groups of 2-12 documents joined to their smallest id (a star,
    # as _group_edges emits), some documents in two groups (two bands): clusters merge through them.
    ids = np.concatenate([(np.int64(u) << np.int64(32)) + np.arange(4000, dtype=np.int64) for u in range(6)])
    edges = []
    for _ in range(1500):
        g = np.sort(rng.choice(ids, size=rng.integers(2, 13), replace=False))
        edges += [(int(x), int(g[0])) for x in g[1:]]
    out["stars"] = np.array(edges, np.int64)
    chain = (np.int64(3) << np.int64(32)) + np.arange(3000, dtype=np.int64)
    out["chain"] = np.stack([chain[1:], chain[:-1]], axis=1)  # 1~0, 2~1, ...: 2999 hooks deep
    out["chain_reversed"] = np.stack([chain[:-1], chain[1:]], axis=1)[::-1].copy()
    out["empty"] = np.zeros((0, 2), np.int64)
    return out


def _as_dict(nodes: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    return {int(n): int(k) for n, k in zip(nodes, labels, strict=True) if n != k}


def test_one_process_equals_union_find():
    from lmforge.common.launch_env import SingleProcess

    for name, edges in graphs().items():
        assert _as_dict(*_connected_components(SingleProcess(), edges)) == _clusters(edges), name
        owner = {u: 0 for u in range(8)}
        assert _resolve(SingleProcess(), edges, owner) == _clusters(edges), name


# --------------------------------------------------------------------------------------------------
# The near-duplicate rounds

BOUNDS = (0.719, 0.5)  # the default jaccard_bound, and a lower one (more removed per round)
_SET = 64  # shingles per fake set


def fake_set(x: int) -> np.ndarray:
    """A document's fake shingle set: 64 consecutive hashes from an offset in [0, 128) that a hash of the id picks
    (Jaccard (64 - d) / (64 + d) at offset distance d: >= 0.719 within d <= 10, about 16% of random pairs)."""
    off = ((x * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 57
    return np.arange(off, off + _SET, dtype=np.uint64)


# The old rank-0 algorithm's stars and union-find, kept once, in the benchmark that times the old path against the new
# (benchmarks/dedup_scale.py: ``dedup._stars`` and ``dedup._components`` verbatim, as they were before the
# distributed rounds).
_stars, _components = _old_stars, _old_components


def reference_near(edges: np.ndarray, bound: float) -> tuple[dict[int, tuple[int, float]], dict]:
    """The rank-0 algorithm ``_verified_near`` ran before the rounds were distributed, its decisions as one
    function (every edge in one place; the Jaccard of ``fake_set``s where it gathered the ranks' measures)."""
    stars = _stars(edges)
    alive = {x for ms in stars.values() for x in ms}
    stats = {"clustered": len(alive), "candidates": 0, "rounds": 0}
    found: dict[int, tuple[int, float]] = {}
    for rnd in range(MAX_ROUNDS + 1):
        pairs: list[tuple[int, int]] = []
        if rnd < MAX_ROUNDS:
            groups = _components(stars, alive)
            alive = {x for g in groups for x in g[1:]}  # representatives are kept, lone members too
            for g in groups:
                pairs.extend((m, g[0]) for m in g[1:])
        if rnd == 0:
            stats["candidates"] = len(pairs)
        if not pairs:
            break
        stats["rounds"] += 1
        for m, rep in pairs:
            j = jaccard(fake_set(m), fake_set(rep))
            if j >= bound:
                found[m] = (rep, j)
                alive.discard(m)
    stats["removed"] = len(found)
    return found, stats


def near_graphs(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    ids = np.concatenate([(np.int64(u) << np.int64(32)) + np.arange(300, dtype=np.int64) for u in range(6)])
    edges = []  # LSH buckets (2-8 documents each, edges to their smallest): members and centres shared
    for _ in range(500):
        g = np.sort(rng.choice(ids, size=rng.integers(2, 9), replace=False))
        edges += [(int(x), int(g[0])) for x in g[1:]]
    edges += edges[::7]  # the same edge from another band
    out["stars"] = rng.permutation(np.array(edges, np.int64))
    chain = (np.int64(2) << np.int64(32)) + np.arange(400, dtype=np.int64)
    out["chain"] = np.stack([chain[1:], chain[:-1]], axis=1)
    # few documents, many buckets: groups of dozens whose representatives (often centres) leave each round
    few = np.concatenate([(np.int64(u) << np.int64(32)) + np.arange(20, dtype=np.int64) for u in (1, 4, 5)])
    dense = []
    for _ in range(60):
        g = np.sort(rng.choice(few, size=rng.integers(2, 6), replace=False))
        dense += [(int(x), int(g[0])) for x in g[1:]]
    out["dense"] = np.array(dense, np.int64)
    out["one_pair"] = np.array([[(5 << 32) + 7, 3]], np.int64)  # one round: a lone member is left
    out["empty"] = np.zeros((0, 2), np.int64)
    return out


def distributed_near(comm, edges: np.ndarray, owner: dict[int, int], bound: float) -> tuple[dict, dict]:
    """The new path with the fake sets: each rank builds only its clustered documents' sets and fetches the
    representatives' from the ranks holding them, as ``_verified_near`` does with the re-read sets."""
    owners = _owners(owner)
    centre, member, mine = _near_stars(comm, edges, owners)
    assert all(owner[x >> 32] == comm.rank for x in mine.tolist())
    sets = {x: fake_set(x) for x in mine.tolist()}

    def measure(m: np.ndarray, rep: np.ndarray) -> np.ndarray:
        theirs = _fetch_sets(comm, sets, _sorted_unique(rep), owners)
        return np.array([jaccard(sets[a], theirs[b]) for a, b in zip(m.tolist(), rep.tolist())], np.float64)

    found, candidates, rounds = _near_rounds(comm, centre, member, mine, owners, measure, bound)
    assert all(owner[d >> 32] == comm.rank for d in found)
    return found, {"clustered": _total(comm, len(mine)), "candidates": candidates, "rounds": rounds,
                   "removed": _total(comm, len(found))}


def test_near_rounds_one_process_equal_the_rank0_algorithm():
    from lmforge.common.launch_env import SingleProcess

    rounds_seen = set()
    for bound in BOUNDS:
        for name, edges in near_graphs().items():
            want, want_stats = reference_near(edges, bound)
            got, stats = distributed_near(SingleProcess(), edges, {u: 0 for u in range(6)}, bound)
            assert got == want and stats == want_stats, (name, bound)
            rounds_seen.add(stats["rounds"])
    assert {1, MAX_ROUNDS} <= rounds_seen  # the graphs exercise one round and the last


def test_verified_near_on_mpi_uses_no_gather_or_scatter():
    """Nothing in the check collects at one rank (the collectives ``_verified_near`` and its parts call)."""
    import inspect

    for f in (dedup._verified_near, _near_stars, _near_rounds, _fetch_sets, _connected_components):
        src = inspect.getsource(f)
        assert "comm.gather" not in src and "comm.scatter" not in src and "root=" not in src, f.__name__


def _mpi_main(out_dir: str, what: str) -> None:
    """Under mpirun: each rank holds a strided share of each graph's edges; rank r writes what it resolved to
    ``out_dir/rank{r}.json`` (not stdout: the ranks' long lines would interleave)."""
    from lmforge.common.launch_env import mpi_world

    comm = mpi_world()
    owner = {u: u % comm.size for u in range(8)}  # units spread over the ranks
    out = {}
    if "resolve" in what:
        for name, edges in graphs().items():
            got = _resolve(comm, edges[comm.rank::comm.size], owner)
            assert all(owner[d >> 32] == comm.rank for d in got), name  # each rank gets its units' duplicates
            out[name] = sorted(got.items())
    if "near" in what:
        for bound in BOUNDS:
            for name, edges in near_graphs().items():
                found, stats = distributed_near(comm, edges[comm.rank::comm.size], owner, bound)
                out[f"near/{name}/{bound}"] = {"found": sorted((d, k, j) for d, (k, j) in found.items()),
                                               "stats": stats}
    with open(f"{out_dir}/rank{comm.rank}.json", "w") as f:
        json.dump(out, f)


def _run_mpi(tmp_path, ranks: int, what: str) -> list[dict]:
    from tests.helpers.paths import BIN, ROOT
    from tests.helpers.process import run_cmd

    p = run_cmd([BIN / "mpirun", "-n", str(ranks), sys.executable, "-m", "tests.data_pipeline.test_dedup_resolve",
                 tmp_path, what], cwd=ROOT, timeout=300)
    files = sorted(tmp_path.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(ranks)], p.stdout[-2000:]
    return [json.loads(f.read_text()) for f in files]


def _check_near(per_rank: list[dict]) -> None:
    for bound in BOUNDS:
        for name, edges in near_graphs().items():
            want, want_stats = reference_near(edges, bound)
            got: dict[int, tuple[int, float]] = {}
            for r in per_rank:
                part = r[f"near/{name}/{bound}"]
                assert part["stats"] == want_stats, (name, bound)  # the totals, on every rank
                for d, k, j in part["found"]:
                    assert d not in got
                    got[d] = (k, j)
            assert got == want, (name, bound)


def test_four_mpi_ranks_equal_union_find(tmp_path):
    per_rank = _run_mpi(tmp_path, 4, "resolve,near")
    merged: dict[str, dict[int, int]] = {}
    for r in per_rank:
        for name, pairs in r.items():
            if not name.startswith("near/"):
                merged.setdefault(name, {}).update((int(d), int(k)) for d, k in pairs)
    for name, edges in graphs().items():
        assert merged.get(name, {}) == _clusters(edges), name
    _check_near(per_rank)


def test_near_rounds_on_two_mpi_ranks_equal_the_rank0_algorithm(tmp_path):
    _check_near(_run_mpi(tmp_path, 2, "near"))


if __name__ == "__main__":
    _mpi_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "resolve")

"""The distributed duplicate-cluster resolution (``dedup._connected_components`` / ``_resolve``) against the
plain union-find it replaced (``dedup._clusters``, kept as the reference), in one process and on 4 real MPI
ranks (``mpirun -n 4``), on graphs shaped like real duplicate edges (stars of exact-key groups joined by
shared members, as LSH bands make them) and on the worst case for label propagation: long chains, in both
id orders."""

from __future__ import annotations

import json
import sys

import numpy as np

from lmforge.data_pipeline.preprocess.dedup import _clusters, _connected_components, _resolve


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


def _mpi_main(out_dir: str) -> None:
    """Under mpirun: each rank holds a strided share of each graph's edges; rank r writes what it resolved to
    ``out_dir/rank{r}.json`` (not stdout: the ranks' long lines would interleave)."""
    from lmforge.common.launch_env import mpi_world

    comm = mpi_world()
    owner = {u: u % comm.size for u in range(8)}  # units spread over the ranks
    out = {}
    for name, edges in graphs().items():
        got = _resolve(comm, edges[comm.rank::comm.size], owner)
        assert all(owner[d >> 32] == comm.rank for d in got), name  # each rank gets its units' duplicates
        out[name] = sorted(got.items())
    with open(f"{out_dir}/rank{comm.rank}.json", "w") as f:
        json.dump(out, f)


def test_four_mpi_ranks_equal_union_find(tmp_path):
    from tests.helpers.paths import BIN, ROOT
    from tests.helpers.process import run_cmd

    p = run_cmd([BIN / "mpirun", "-n", "4", sys.executable, "-m", "tests.data_pipeline.test_dedup_resolve",
                 tmp_path], cwd=ROOT, timeout=300)
    merged: dict[str, dict[int, int]] = {}
    files = sorted(tmp_path.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(4)], p.stdout[-2000:]
    for f in files:
        for name, pairs in json.loads(f.read_text()).items():
            merged.setdefault(name, {}).update((int(d), int(k)) for d, k in pairs)
    for name, edges in graphs().items():
        assert merged.get(name, {}) == _clusters(edges), name


if __name__ == "__main__":
    _mpi_main(sys.argv[1])

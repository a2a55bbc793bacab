"""A big parquet file split across workers and ranks by its row groups (data_pipeline/readers/parquet.py,
preprocess/plan.py): 400 real documents of the test corpora (Wikipedia articles and stubs, Chinese
Wikipedia, paragraphs of Pride and Prejudice) with planted duplicates, a null and an empty row, written
with 100 row groups of 4 rows and, as the reference, with one row group. The 100-group file is planned as
6 units of whole row groups (--unit-bytes a seventh of it; the row groups' sizes vary with the articles');
the output is byte-identical for 1 and 2 workers and 2 MPI ranks, with and without --dedup exact,minhash,
holds the same documents in the same order as the one-group file read as one unit (same token streams,
counts, skip and duplicate locations by absolute row), and a kill -9 in the dedup scan or the tokenizing
pass resumes to the same bytes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.data_pipeline.manifest import load_manifest
from lmforge.data_pipeline.preprocess.plan import plan_units
from lmforge.data_pipeline.readers import ReadOptions, ReadRange, expand_inputs, iter_documents
from lmforge.data_pipeline.readers.parquet import row_groups
from lmforge.data_pipeline.tools import verify
from tests.data_pipeline.test_preprocess import (  # noqa: F401
    PY,
    _finished_units,
    preprocess,
    same_tree,
    tok,
    token_stream,
)
from tests.helpers.hfdata import corpus_documents
from tests.helpers.paths import BIN, CORPUS, ROOT
from tests.helpers.process import child_env, run_cmd

ROWS_PER_GROUP = 4
UNITS = 7  # --unit-bytes is the 100-group file's size / UNITS (6 units: row groups are uneven)
# Planted rows (0-based index -> what): the manifest names them by row number (index + 1).
NULL_AT, EMPTY_AT, EXACT_AT, NEAR_AT, EXACT2_AT = 150, 260, 300, 370, 390


def parquet_rows() -> tuple[list[str | None], dict[int, int]]:
    """400 rows and, for each planted duplicate's index, the index of the row it copies."""
    wiki = corpus_documents([CORPUS / "wikipedia/WikiTasks", CORPUS / "wiki_stubs", CORPUS / "wikipedia/zhwiki"])
    book = (CORPUS / "books/1342-0.txt").read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    paras = [p.strip() for p in book.split("\n\n") if len(p.strip()) >= 100]
    rows: list[str | None] = [*wiki, *paras[: 395 - len(wiki)]]
    longest = max(range(len(wiki)), key=lambda i: len(wiki[i]))
    words = wiki[longest].split(" ")
    words[len(words) // 2] += "s"
    originals = {EXACT_AT: rows[3], NEAR_AT: wiki[longest], EXACT2_AT: rows[200]}
    planted = {
        NULL_AT: None,
        EMPTY_AT: "",
        EXACT_AT: "  ".join(rows[3].split(" ")) + "\n",  # the same after whitespace collapsing
        NEAR_AT: " ".join(words),  # one word changed: a near duplicate of the longest article
        EXACT2_AT: rows[200],
    }
    for at in sorted(planted):
        rows.insert(at, planted[at])
    assert len(rows) == 400
    copies = {at: rows.index(text) for at, text in originals.items()}
    assert all(k < at for at, k in copies.items())
    return rows, copies


@pytest.fixture(scope="module")
def pq_files(tmp_path_factory) -> tuple[Path, Path, int]:
    """(the file of many row groups, the same rows in one row group, --unit-bytes), both named data.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, _ = parquet_rows()
    table = pa.table({"id": list(range(len(rows))), "text": rows})
    root = tmp_path_factory.mktemp("parquet")
    many, one = root / "many/data.parquet", root / "one/data.parquet"
    for path, group in ((many, ROWS_PER_GROUP), (one, len(rows))):
        path.parent.mkdir()
        pq.write_table(table, path, row_group_size=group)
    assert pq.ParquetFile(many).metadata.num_row_groups == 100 and pq.ParquetFile(one).metadata.num_row_groups == 1
    return many, one, many.stat().st_size // UNITS + 1


def test_row_group_units_tile_the_file(pq_files):
    """The plan: 5-10 units of whole row groups, cut at row group starts, tiling the file, each of at most
    --unit-bytes of row groups; any byte ranges read the whole file's items with absolute row numbers; the
    one-group file is one unit."""
    import pyarrow.parquet as pq

    many, one, unit_bytes = pq_files
    (src,) = expand_inputs([str(many)])
    units = plan_units([src], unit_bytes)
    assert 5 <= len(units) <= 10 and all(len(u) == 1 for u in units), units
    segs = [u[0] for u in units]
    assert segs[0][1] == 0 and segs[-1][2] == src.size and all(a[2] == b[1] for a, b in zip(segs, segs[1:]))
    groups = row_groups(pq.ParquetFile(many).metadata)
    starts = [g[0] for g in groups]
    assert all(lo in starts for _, lo, _ in segs[1:])  # cut where a row group starts
    owned = [[i for i, g in enumerate(groups) if lo <= g[0] < hi] for _, lo, hi in segs]
    assert [i for o in owned for i in o] == list(range(100))
    for o, following in zip(owned, [*owned[1:], None]):  # runs as long as they fit
        nbytes = sum(groups[i][1] for i in o)
        assert nbytes <= unit_bytes or len(o) == 1, (o, nbytes)
        assert following is None or nbytes + groups[following[0]][1] > unit_bytes, (o, nbytes)
    whole = list(iter_documents(src, ReadOptions()))
    assert len(whole) == 400 and whole[NULL_AT] == (3, "missing_text", f"{many}:{NULL_AT + 1}")
    parts = []
    for (_, lo, hi), o in zip(segs, owned):
        rng = ReadRange(lo, hi)
        parts.extend(iter_documents(src, ReadOptions(), rng))
        assert rng.absolute and rng.lines == ROWS_PER_GROUP * len(o)  # rows owned; locations from the file start
    assert parts == whole
    for unit in (1000, 65536, src.size + 1):  # any cut: each row group is read once, in order
        parts = []
        for lo in range(0, src.size, unit):
            parts.extend(iter_documents(src, ReadOptions(), ReadRange(lo, min(lo + unit, src.size))))
        assert parts == whole, unit
    (src1,) = expand_inputs([str(one)])
    assert plan_units([src1], unit_bytes) == [[(0, 0, -1)]]
    # What concerns the whole file is said once, by the range at 0, however many units it is cut into.
    body = many.parent.parent / "body.parquet"
    pq.write_table(pq.read_table(many).rename_columns(["id", "body"]), body, row_group_size=ROWS_PER_GROUP)
    (src2,) = expand_inputs([str(body)])
    assert len(plan_units([src2], unit_bytes)) > 1
    items = [it for [(_, lo, hi)] in plan_units([src2], unit_bytes)
             for it in iter_documents(src2, ReadOptions(), ReadRange(lo, hi))]
    assert items == [(3, "missing_text", f"{body}:0 (no column 'text')")]


def _same_documents(a: Path, b: Path, path_a: Path, path_b: Path) -> None:
    """The outputs ``a`` (of ``path_a``) and ``b`` (of ``path_b``) hold the same documents in the same order:
    token streams, counts, skip and duplicate examples (file paths swapped) and lists of duplicates."""
    for split, toks in token_stream(a).items():
        assert np.array_equal(toks, token_stream(b)[split]), split
    ma, mb = load_manifest(a), load_manifest(b)
    for key in ("records", "skipped", "skip_examples", "duplicate_examples", "dedup"):
        assert str(ma.get(key)).replace(str(path_a), str(path_b)) == str(mb.get(key)), key
    for s in ("train", "valid"):
        assert {k: v for k, v in ma["totals"][s].items() if k != "shards"} == \
            {k: v for k, v in mb["totals"][s].items() if k != "shards"}

    def listed(out: Path) -> str:
        return "".join(f.read_text() for f in sorted((out / "duplicates").glob("unit_*.tsv")))

    assert listed(a).replace(str(path_a), str(path_b)) == listed(b)


@pytest.mark.slow
@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_row_group_units_same_bytes_for_workers_and_ranks(tok, pq_files, tmp_path, dedup):  # noqa: F811
    many, one, unit_bytes = pq_files
    args = ["--unit-bytes", str(unit_bytes), "--max-shard-bytes", "1G",
            *(["--dedup", "exact,minhash"] if dedup else [])]
    preprocess(tok, tmp_path / "w1", "--workers", "1", *args, inputs=[many])
    preprocess(tok, tmp_path / "w2", "--workers", "2", *args, inputs=[many])
    preprocess(tok, tmp_path / "mpi", "--workers", "1", *args, inputs=[many], launcher=[BIN / "mpirun", "-n", "2"])
    preprocess(tok, tmp_path / "one", "--workers", "2", *args, inputs=[one])
    same_tree(tmp_path / "w1", tmp_path / "w2")
    same_tree(tmp_path / "w1", tmp_path / "mpi")
    (src,) = expand_inputs([str(many)])
    units = len(plan_units([src], unit_bytes))
    assert _finished_units(tmp_path / "w2") == units and _finished_units(tmp_path / "one") == 1
    assert len(load_manifest(tmp_path / "w2")["splits"]["train"]) == units  # a shard per unit
    _same_documents(tmp_path / "w2", tmp_path / "one", many, one)
    m = load_manifest(tmp_path / "w2")
    assert m["skip_examples"]["missing_text"] == [f"{many}:{NULL_AT + 1}"]
    assert m["skip_examples"]["empty"] == [f"{many}:{EMPTY_AT + 1}"]
    r = m["records"]
    assert r["read"] == 400 and r["read"] == r["written"] + r["skipped"]
    if not dedup:
        assert "dedup" not in m and m["skipped"] == {"empty": 1, "missing_text": 1}
        p = preprocess(tok, tmp_path / "fail", *args, "--on-error", "fail", inputs=[many], check=False)
        assert p.returncode == 2 and f"{many}:{NULL_AT + 1}: missing_text" in p.stderr, p.stderr
        return
    _, copies = parquet_rows()
    assert m["skipped"] == {"duplicate-exact": 2, "duplicate-near": 1, "empty": 1, "missing_text": 1}
    assert m["dedup"] == {"streamed_exact_only": 0}
    found = {(d["loc"], d["kept"]) for ds in m["duplicate_examples"].values() for d in ds}
    assert found == {(f"{many}:{at + 1}", f"{many}:{k + 1}") for at, k in copies.items()}
    starts = [(lo, hi) for [(_, lo, hi)] in plan_units([src], unit_bytes)]
    assert all(_unit_of_row(many, starts, at) != _unit_of_row(many, starts, k) for at, k in copies.items())


def _unit_of_row(path: Path, ranges: list[tuple[int, int]], row: int) -> int:
    """The unit (of these byte ranges) that reads row ``row`` (0-based) of ``path``."""
    import pyarrow.parquet as pq

    first = 0
    for start, _, rows in row_groups(pq.ParquetFile(path).metadata):
        if first <= row < first + rows:
            return next(u for u, (lo, hi) in enumerate(ranges) if lo <= start < hi)
        first += rows
    raise AssertionError(row)


@pytest.mark.slow
def test_row_group_units_kill_9_and_resume(tok, pq_files, tmp_path):  # noqa: F811
    """kill -9 of the process group during the dedup scan or the tokenizing pass of the 100-group file cut
    into about 20 units, then the same command: byte-identical to an uninterrupted run (lists included)."""
    many, _, unit_bytes = pq_files
    cmd = [PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", str(many), "--tokenizer", str(tok),
           "--no-progress", "--unit-bytes", str(unit_bytes * UNITS // 20), "--max-shard-bytes", "1G",
           "--valid-fraction", "0.05", "--workers", "2", "--dedup", "exact,minhash"]
    run_cmd([*cmd, "--output", tmp_path / "clean"])
    units = _finished_units(tmp_path / "clean")
    assert units >= 15
    rng = random.Random(2)
    for trial, phase in enumerate(("scan", "tokenize", "tokenize")):
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen([*cmd, "--output", str(out)], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        target = rng.randint(units // 4, units // 2)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            done = len(list((out / ".state" / "dedup").glob("unit_*.npz"))) if phase == "scan" else \
                _finished_units(out)
            if done >= target:
                break
            time.sleep(0.001)
        assert proc.poll() is None, "the run finished before the kill"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if phase == "scan":  # the kill landed inside the phase it meant to interrupt
            assert len(list((out / ".state" / "dedup").glob("unit_*.npz"))) < units
        else:
            assert 0 < _finished_units(out) < units
        finished = _finished_units(out)
        p = run_cmd([*cmd, "--output", out])
        assert (f"{finished} unit(s) verified and kept" in p.stderr) == (finished > 0), p.stderr
        same_tree(tmp_path / "clean", out)
        assert verify(out) == []

"""Deduplication (data_pipeline/preprocess/dedup.py): the normalisation, shingles and LSH parameters; the
clustering; and inside preprocess on the test corpora (1.6 MB, six sources, plus a file of planted
copies): every planted duplicate found and counted by reason with the kept original named, read =
written + skipped, the same bytes for 1 and 2 workers and 2 MPI ranks, kill -9 and resume.

Sizes: the test runs use 100-400 KB units, so the corpus is many units (byte ranges of the same file
among them) spread over workers and ranks, and duplicates are found across units, files and ranks -
the exchange path, not a single-unit shortcut."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from lmforge.data_pipeline.manifest import load_manifest
from lmforge.data_pipeline.preprocess.dedup import (
    _clusters,
    _group_edges,
    detection_probability,
    exact_key,
    lsh_params,
    normalize_exact,
    parse_modes,
    shingles,
)
from lmforge.data_pipeline.readers import DOC, ReadOptions, expand_inputs, iter_documents
from tests.data_pipeline.test_preprocess import INPUTS, PY, _finished_units, preprocess, same_tree, tok  # noqa: F401
from tests.helpers.paths import BIN, ROOT
from tests.helpers.planted import jaccard, plant
from tests.helpers.process import child_env, run_cmd


def test_exact_normalisation():
    a = "Café au lait.\nSecond  line "
    assert exact_key(a) == exact_key(unicodedata.normalize("NFD", a)) == exact_key("  Café au lait. Second\tline\n")
    assert normalize_exact(a) == "Café au lait. Second line"
    assert exact_key(a) != exact_key(a.lower())  # case counts
    assert exact_key(a) != exact_key(a.replace(".", ""))  # punctuation counts


def test_shingles_and_cjk():
    assert shingles("The quick brown fox jumps over", 5) == ["the quick brown fox jumps", "quick brown fox jumps over"]
    assert shingles("two words", 5) == ["two words"]  # shorter than n: one shingle
    zh = "北京是中华人民共和国的首都"
    assert len(shingles(zh, 5)) == len(zh) - 4  # characters are words: not one shingle of one huge word


def test_lsh_parameters_and_stated_rates():
    assert lsh_params(0.72) == (14, 8)  # the default: FineWeb's 14 bands x 8 rows
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        b, r = lsh_params(t)
        assert b * r <= 112 and abs((1 / b) ** (1 / r) - t) < 0.05
        assert detection_probability(min(t + 0.15, 1.0), b, r) > 0.8 > 0.2 > detection_probability(t - 0.25, b, r)
    # The rates the documentation states for the default.
    assert round(detection_probability(0.8, 14, 8), 2) == 0.92
    assert round(detection_probability(0.5, 14, 8), 3) == 0.053
    assert parse_modes("minhash, exact") == ("exact", "minhash")
    with pytest.raises(ValueError, match="unknown"):
        parse_modes("fuzzy")


def test_clusters_keep_the_smallest_id_and_are_transitive():
    # Groups sharing a key: edges from every member to the group's smallest id.
    keys = [np.array([7, 7, 9, 9, 7], np.uint64)]
    ids = np.array([30, 10, 20, 40, 50], np.int64)
    edges = _group_edges(keys, ids)
    assert sorted(map(tuple, edges.tolist())) == [(30, 10), (40, 20), (50, 10)]
    # A chain 3~2 (one band), 2~1 (another band): 3 is a duplicate of 1.
    dup = _clusters(np.array([[3, 2], [2, 1], [9, 5]], np.int64))
    assert dup == {2: 1, 3: 1, 9: 5}


def planted_inputs(tmp: Path) -> tuple[list, list[tuple[str, int, str]], list[str]]:
    """The test inputs plus a later file of planted copies of their documents."""
    docs = [t for s in expand_inputs([str(p) for p in INPUTS]) for k, t, _ in iter_documents(s, ReadOptions())
            if k == DOC]
    copies = plant(docs, seed=0, per_kind=5)
    f = tmp / "planted.jsonl"
    with open(f, "w") as fh:
        for _, _, text in copies:
            fh.write(json.dumps({"text": text}) + "\n")
    return [*INPUTS, f], copies, docs


@pytest.mark.slow
def test_planted_duplicates_found_deterministically(tok, tmp_path):  # noqa: F811
    inputs, copies, docs = planted_inputs(tmp_path)
    args = ("--dedup", "exact,minhash", "--unit-bytes", "200k", "--filter", "gopher")
    preprocess(tok, tmp_path / "w1", "--workers", "1", *args, inputs=inputs)
    preprocess(tok, tmp_path / "w2", "--workers", "2", *args, inputs=inputs)
    same_tree(tmp_path / "w1", tmp_path / "w2")
    preprocess(tok, tmp_path / "mpi", "--workers", "1", *args, inputs=inputs, launcher=[BIN / "mpirun", "-n", "2"])
    same_tree(tmp_path / "w1", tmp_path / "mpi")

    m = load_manifest(tmp_path / "w1")
    r = m["records"]
    assert r["read"] == r["written"] + r["skipped"] and r["skipped"] == sum(m["skipped"].values())
    # The full list: every removed document with the one it duplicates.
    listed = [line.split("\t") for f in sorted((tmp_path / "w1" / "duplicates").glob("*.tsv"))
              for line in f.read_text().splitlines()]
    assert len(listed) == m["skipped"]["duplicate-exact"] + m["skipped"]["duplicate-near"]
    for why in ("duplicate-exact", "duplicate-near"):
        ex = m["duplicate_examples"][why]
        assert ex and [d["loc"] for d in ex] == m["skip_examples"][why]
    removed = {loc: (why, kept) for why, loc, kept in listed}
    planted = str(tmp_path / "planted.jsonl")
    # Every exact copy is removed as duplicate-exact, its original (an earlier file) kept; every other
    # planted copy at a true 5-gram Jaccard >= 0.85 (found with probability >= 0.988 each by the default
    # 14 x 8 bands; the seeds are fixed, so the outcome is too) is removed as duplicate-near.
    expect_near = 0
    for line, (kind, i, text) in enumerate(copies, start=1):
        got = removed.get(f"{planted}:{line}")
        if kind == "exact":
            assert got is not None and got[0] == "duplicate-exact", (kind, got)
        elif jaccard(docs[i], text) >= 0.85:
            expect_near += 1
            assert got is not None and got[0] == "duplicate-near", (kind, jaccard(docs[i], text), got)
        if got is not None:
            assert not got[1].startswith(planted), got  # the original is the one kept
    assert expect_near >= 14  # edit1, header and most reorder copies (edit3/edit5 are below 0.85)
    # Nothing is removed by mistake: every removed document truly resembles the one kept for it (equal
    # after normalisation, or a 5-gram Jaccard of at least 0.5, which the default bands find with
    # probability <= 0.053), wherever it is - real near-duplicates in the corpus included.
    text_at = {loc: t for s in expand_inputs([str(p) for p in inputs])
               for k, t, loc in iter_documents(s, ReadOptions()) if k == DOC}
    for loc, (why, kept) in removed.items():
        if why == "duplicate-exact":
            assert normalize_exact(text_at[loc]) == normalize_exact(text_at[kept])
        else:
            assert jaccard(text_at[loc], text_at[kept]) >= 0.5, (loc, kept)

    plain = preprocess(tok, tmp_path / "plain", "--workers", "2", "--unit-bytes", "200k", "--filter", "gopher",
                       inputs=inputs)
    assert plain.returncode == 0
    p = load_manifest(tmp_path / "plain")
    assert "dedup" not in p["settings"] and not (tmp_path / "plain" / "duplicates").exists()
    assert p["records"]["written"] - r["written"] == len(listed)


@pytest.mark.slow
def test_dedup_kill_9_and_resume_is_byte_identical(tok, tmp_path):  # noqa: F811
    """kill -9 of the process group during the scan or the tokenizing pass, then the same command: the
    output is byte-identical to an uninterrupted run; a damaged signature file is scanned again."""
    inputs, _, _ = planted_inputs(tmp_path)
    cmd = [PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", *map(str, inputs), "--tokenizer", str(tok),
           "--no-progress", "--unit-bytes", "100k", "--max-shard-bytes", "300k", "--valid-fraction", "0.05",
           "--workers", "2", "--dedup", "exact,minhash"]
    run_cmd([*cmd, "--output", tmp_path / "clean"])
    units = _finished_units(tmp_path / "clean")
    rng = random.Random(1)
    for trial, phase in enumerate(("scan", "tokenize")):
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen([*cmd, "--output", str(out)], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            done = len(list((out / ".state" / "dedup").glob("unit_*.npz"))) if phase == "scan" else \
                _finished_units(out)
            if done >= units // 3:
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.01))
        assert proc.poll() is None, "the run finished before the kill"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if phase == "scan":  # the kill landed inside the phase it meant to interrupt
            assert len(list((out / ".state" / "dedup").glob("unit_*.npz"))) < units
        else:
            assert 0 < _finished_units(out) < units
        if phase == "scan":  # a damaged signature file (truncated) must be scanned again, not trusted
            sig = sorted((out / ".state" / "dedup").glob("unit_*.npz"))[0]
            sig.write_bytes(sig.read_bytes()[:100])
        run_cmd([*cmd, "--output", out])
        same_tree(tmp_path / "clean", out)

"""Deduplication (data_pipeline/preprocess/dedup.py): the normalisation, shingles and LSH parameters; the
clustering; the check of every near duplicate against the document kept for it (true Jaccard: template
stubs kept, chains broken, near copies removed); and inside preprocess on the test corpora (1.6 MB, six
sources, plus a file of planted copies, and real Wikipedia template stubs): every planted duplicate found
and counted by reason with the kept original named and the Jaccard measured, read = written + skipped,
the same bytes for 1 and 2 workers and 2 MPI ranks, kill -9 and resume.

Sizes: the test runs use 100-400 KB units, so the corpus is many units (byte ranges of the same file
among them) spread over workers and ranks, and duplicates are found across units, files and ranks -
the exchange path, not a single-unit shortcut."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from lmforge.common.launch_env import SingleProcess
from lmforge.data_pipeline.manifest import load_manifest
from lmforge.data_pipeline.preprocess import dedup
from lmforge.data_pipeline.preprocess.dedup import (
    _clusters,
    _group_edges,
    detection_probability,
    exact_key,
    jaccard_bound,
    lsh_params,
    normalize_exact,
    parse_modes,
    shingle_hashes,
    shingles,
)
from lmforge.data_pipeline.preprocess.plan import plan_units
from lmforge.data_pipeline.preprocess.settings import Settings
from lmforge.data_pipeline.readers import DOC, ReadOptions, expand_inputs, iter_documents
from tests.data_pipeline.test_preprocess import INPUTS, PY, _finished_units, preprocess, same_tree, tok  # noqa: F401
from tests.helpers.paths import BIN, CORPUS, ROOT, SAMPLE
from tests.helpers.planted import jaccard, plant
from tests.helpers.process import child_env, run_cmd

# Real Wikipedia template stubs (tests/data/corpus/README.md): 84 articles of WikiTasks in two runs, among
# them Hainan railway stations, Japanese snowboarders and Mitromorpha sea snails, each group sharing a
# template; LSH clusters 11 of them with another of their group at true Jaccard 0.51-0.64.
STUBS = CORPUS / "wiki_stubs" / "wiki_00"


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


def test_shingle_hashes_are_the_shingle_sets():
    """The check's Jaccard (64-bit hashes of the shingles) is the Jaccard of the shingle strings."""
    docs = [t for s in expand_inputs([str(p) for p in INPUTS]) for k, t, _ in iter_documents(s, ReadOptions())
            if k == DOC][:60]
    for t in docs + ["", "two words", "北京是中华人民共和国的首都"]:
        assert len(shingle_hashes(t, 5)) == len(set(shingles(t, 5)))
    for a, b in zip(docs, docs[1:]):
        assert abs(dedup.jaccard(shingle_hashes(a, 5), shingle_hashes(b, 5)) - jaccard(a, b)) < 1e-12
    assert jaccard_bound(Settings(dedup=("minhash",))) == pytest.approx(0.719, abs=5e-4)


def _edit(words: list[str], lo: int, hi: int) -> list[str]:
    return [f"{w}x" if lo <= i < hi and i % 2 == 0 else w for i, w in enumerate(words)]


def test_near_duplicates_are_checked_against_the_kept_document(tmp_path):
    """Given LSH edges (here chosen), a member is removed only at true Jaccard >= the bound with its
    group's first document, found by re-reading both: template stubs that share much but differ are
    kept, a real near copy is removed, and a chain A~B~C keeps C when C is not near A; the members left
    over are grouped again among themselves (D2 is a near copy of the kept C)."""
    stubs = [t for k, t, _ in iter_documents(expand_inputs([str(STUBS)])[0], ReadOptions())
             if k == DOC and "railway station of Hainan western ring" in t]
    long_ = [t for s in expand_inputs([str(SAMPLE / "wikipedia")]) for k, t, _ in iter_documents(s, ReadOptions())
             if k == DOC and len(t.split()) > 600][:2]
    w = long_[0].split(" ")
    n = len(w)
    a, b, c = long_[0], " ".join(_edit(w, 0, n // 10)), " ".join(_edit(_edit(w, 0, n // 10), n // 2, n // 2 + n // 10))
    d, d2 = long_[1], " ".join(_edit(long_[1].split(" "), 0, 30))
    docs = [a, b, c, *stubs, d, c + " the end", d2]  # ids 0..; c + " the end": a near copy of C
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    settings = Settings(dedup=("minhash",))
    sources = expand_inputs([str(f)])
    units = plan_units(sources, settings.unit_bytes)
    dedup.scan_unit(tmp_path, sources, 0, units[0], settings)
    sigs = {0: dedup.load_signatures(tmp_path, 0, settings)}
    A, B, C, S0, D = 0, 1, 2, 3, 3 + len(stubs)
    C2, D2 = D + 1, D + 2
    edges = np.array([[B, A], [C, B], *[[S0 + i, S0] for i in range(1, len(stubs))], [C2, B], [D2, D]], np.int64)
    found, stats = dedup._verified_near(SingleProcess(), edges, {0: 0}, units, sources, sigs, settings, 2)
    bound = jaccard_bound(settings)
    assert jaccard(a, b) >= bound > jaccard(a, c) and jaccard(b, c) >= bound  # the chain
    assert all(jaccard(stubs[0], x) < bound for x in stubs[1:]) and len(stubs) >= 8
    assert sorted(found) == [B, C2, D2], found
    assert found[B][0] == A and found[D2][0] == D and found[C2][0] == C  # C2: second round, rep C
    for x, (k, j) in found.items():
        assert j == pytest.approx(jaccard(docs[x], docs[k]), abs=1e-12) and j >= bound
    assert stats["candidates"] == 3 + len(stubs) - 1 + 1 and stats["removed"] == 3 and stats["rounds"] == 4


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
    removed = {loc: (why, kept, float(j)) for why, loc, kept, j in listed}
    assert [e["file"] for e in m["removed_lists"]["duplicates"]] == sorted(
        str(f.relative_to(tmp_path / "w1")) for f in (tmp_path / "w1" / "duplicates").glob("*.tsv"))
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
    # after normalisation, or a true 5-gram Jaccard of at least the bound, 0.719: each removal is checked
    # before it is made, and the list gives the Jaccard measured), wherever it is - real near-duplicates
    # in the corpus included.
    text_at = {loc: t for s in expand_inputs([str(p) for p in inputs])
               for k, t, loc in iter_documents(s, ReadOptions()) if k == DOC}
    for loc, (why, kept, j) in removed.items():
        if why == "duplicate-exact":
            assert normalize_exact(text_at[loc]) == normalize_exact(text_at[kept]) and j == 1.0
        else:
            assert abs(jaccard(text_at[loc], text_at[kept]) - j) < 1e-4 and j >= 0.719, (loc, kept, j)

    plain = preprocess(tok, tmp_path / "plain", "--workers", "2", "--unit-bytes", "200k", "--filter", "gopher",
                       inputs=inputs)
    assert plain.returncode == 0
    p = load_manifest(tmp_path / "plain")
    assert "dedup" not in p["settings"] and not (tmp_path / "plain" / "duplicates").exists()
    assert p["records"]["written"] - r["written"] == len(listed)


@pytest.mark.slow
def test_template_stubs_kept_near_copies_removed(tok, tmp_path):  # noqa: F811
    """Real Wikipedia template stubs that LSH clusters (transitive clusters removed 11 of them, at true
    Jaccard 0.51-0.64 with the kept one) are all kept; the real near duplicates (two dumps' revisions of
    the same articles, Jaccard >= 0.94) are removed, with the Jaccard measured in the list; the same bytes
    with 2 workers and 2 MPI ranks."""
    inputs = [STUBS, CORPUS / "wikipedia/Wikipedia_Json2conll", SAMPLE / "wikipedia"]
    args = ("--dedup", "minhash", "--unit-bytes", "100k")
    p = preprocess(tok, tmp_path / "w2", "--workers", "2", *args, inputs=inputs)
    preprocess(tok, tmp_path / "mpi", "--workers", "1", *args, inputs=inputs, launcher=[BIN / "mpirun", "-n", "2"])
    same_tree(tmp_path / "w2", tmp_path / "mpi")
    line = next(x for x in p.stderr.splitlines() if x.startswith("dedup:"))
    candidates, removed = map(int, re.search(r"([\d,]+) LSH candidate\(s\), ([\d,]+) removed", line).groups())
    rows = [r.split("\t") for f in sorted((tmp_path / "w2" / "duplicates").glob("*.tsv"))
            for r in f.read_text().splitlines()]
    assert removed == len(rows) == 6 and candidates >= removed + 11, line
    for why, loc, kept, j in rows:
        assert why == "duplicate-near" and "sample_corpus" in loc and "Json2conll" in kept and float(j) > 0.94
    assert load_manifest(tmp_path / "w2")["skipped"]["duplicate-near"] == 6


# The phases of a --dedup run (run.preprocess), each told by the files it has left so far: "start" (the
# output claimed, .state/config.json, no signature file yet: the first units' scan may be under way), "scan"
# (some of the .state/dedup/unit_*.npz), "exchange" (every signature file, not every list of duplicates, no unit
# record: find_duplicates, its Jaccard check re-reading texts, the lists written last), "tokenize" (the lists,
# some of the unit records .state/unit_*.json and their shards), "final" (every unit record, no manifest: the
# lists of filtered documents, the tokenizer copy, the manifest).
PHASES = ("start", "scan", "exchange", "tokenize", "final")


def _files(out: Path) -> dict:
    return {"config": (out / ".state" / "config.json").exists(),
            "sigs": len(list((out / ".state" / "dedup").glob("unit_*.npz"))),
            "lists": len(list((out / dedup.LIST_DIR).glob("unit_*.tsv"))),
            "units": _finished_units(out), "manifest": (out / "manifest.json").exists()}


def _phase(f: dict, units: int, lists: int) -> str:
    """The phase a run is in (or was killed in) from the files it left; ``units``, ``lists``: a whole run's."""
    if f["manifest"]:
        return "done"
    if f["units"] == units:
        return "final"
    if f["sigs"] < units:
        return "start" if f["sigs"] == 0 else "scan"
    return "exchange" if f["lists"] < lists and f["units"] == 0 else "tokenize"


def _job(pid: int) -> dict[int, tuple[int, str]]:
    """pid -> (process group, state) of ``pid`` and its descendants, from /proc."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rpartition(")")[2].split()
            except OSError:  # gone meanwhile
                continue
            procs[int(d.name)] = (fields[0], int(fields[1]), int(fields[2]))  # state, parent, group
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if p in procs and p not in tree:
            tree[p] = (procs[p][2], procs[p][0])
            todo.extend(c for c, (_, parent, _) in procs.items() if parent == p)
    return tree


def _kill_job(pid: int) -> set[int]:
    """kill -9 of a whole job at one moment, as a machine failure would: every process group of the tree started
    as ``pid`` (mpirun's proxy and ranks each start a session of their own) is stopped, then all are killed.
    Returns the processes killed."""
    killed: set[int] = set()
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        job = _job(pid)
        killed |= set(job)
        for group in {g for g, _ in job.values()}:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
    return killed


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_dedup_kill_9_and_resume_is_byte_identical(tok, tmp_path):  # noqa: F811
    """kill -9 of the whole job at a random moment inside each phase of a run with --dedup exact,minhash and the
    quality filters on (PHASES: start, scan, exchange, tokenize, final, one trial each, then the exchange again
    under mpirun -n 2), then the same command: the output is byte-identical to an uninterrupted run (the lists of
    duplicates and of filtered documents included), verify passes, the killed run's temporary files are gone, and
    each kill landed in the phase it meant (told from the files left). The moment is found by watching the files
    each phase writes, not by a clock (a busy machine must not let the run finish first), and drawn within the
    length of the phase in the uninterrupted run; the final phase (~10 ms) is widened by the test hook
    LMFORGE_INJECT_FINISH_PAUSE. The inputs hold planted copies and a streamed exact copy of a book; a signature
    file damaged after the scan's kill is scanned again."""
    from lmforge.data_pipeline.preprocess.run import FINISH_PAUSE_ENV
    from lmforge.data_pipeline.tools import verify

    t_start = time.monotonic()
    inputs, _, _ = planted_inputs(tmp_path)
    book = (SAMPLE / "books/pg1952.txt").read_bytes()  # 50 KB, streamed in pieces of 40 KB
    (tmp_path / "streamed_copy.txt").write_bytes(book.replace(b"\n", b"\r\n"))
    inputs.append(tmp_path / "streamed_copy.txt")
    cmd = [PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", *map(str, inputs), "--tokenizer", str(tok),
           "--no-progress", "--unit-bytes", "100k", "--max-shard-bytes", "300k", "--valid-fraction", "0.05",
           "--max-doc-bytes", "40k", "--workers", "2", "--dedup", "exact,minhash", "--filter", "gopher,repetition",
           "--min-tokens", "200"]
    pause = 0.2

    def start(out: Path, launcher=(), **env) -> subprocess.Popen:
        with open(out.parent / f"{out.name}.log", "w") as log:
            return subprocess.Popen([*map(str, launcher), *cmd, "--output", str(out)], cwd=ROOT, env=child_env(**env),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def watch(proc: subprocess.Popen, out: Path, until=lambda f: False) -> list[tuple[float, dict]]:
        """Poll the files until ``until`` holds for them or the run ends; returns (time, files) at each change."""
        t0, seen = time.monotonic(), [(0.0, {})]
        deadline = t0 + 120
        while proc.poll() is None and time.monotonic() < deadline:
            f = _files(out)
            if f != seen[-1][1]:
                seen.append((time.monotonic() - t0, f))
            if until(f):
                break
            time.sleep(0.002)
        return seen[1:]

    clean = tmp_path / "clean"
    proc = start(clean)
    seen = watch(proc, clean)
    assert proc.wait() == 0, (tmp_path / "clean.log").read_text()[-3000:]
    units, lists = _finished_units(clean), len(list((clean / dedup.LIST_DIR).glob("unit_*.tsv")))
    assert units >= 20 and lists >= 3 and (clean / "filtered").exists()
    m = load_manifest(clean)
    assert m["skipped"]["duplicate-exact"] >= 6 and m["skipped"]["duplicate-near"] >= 10
    assert m["dedup"]["streamed_exact_only"] and m["skipped"]["filter-min_tokens"]
    # How long each phase lasted in the uninterrupted run (seconds; "start" from the claim of the output).
    entered: dict[str, float] = {}
    for t, f in seen:
        if f["config"]:
            entered.setdefault(_phase(f, units, lists), t)
    ends = [*PHASES, "done"]
    durations = {ph: entered[ends[i + 1]] - entered[ph] for i, ph in enumerate(PHASES)
                 if ph in entered and ends[i + 1] in entered}
    assert {"start", "exchange"} <= set(durations), seen
    rng = random.Random(23)
    trials = [(phase, ()) for phase in PHASES] + [("exchange", (BIN / "mpirun", "-n", "2"))]
    kills: list[str] = []
    for trial, (phase, launcher) in enumerate(trials):
        for attempt in range(3):  # a kill that missed its phase (a busy machine) is checked too, then tried again
            out = tmp_path / f"killed{trial}.{attempt}"
            if phase in ("scan", "tokenize"):  # a random number of units done, then a moment in the next ones
                key, target = ("sigs" if phase == "scan" else "units"), rng.randint(1, units - 2)
                until, delay = (lambda f, key=key, target=target: f[key] >= target), rng.uniform(0, 0.01)
            else:  # a moment within the first half of the phase's length (the final one widened by the hook)
                until = lambda f, phase=phase: f["config"] and _phase(f, units, lists) == phase  # noqa: E731
                delay = rng.uniform(0, 2.5 * pause if phase == "final" else 0.5 * durations[phase])
            proc = start(out, launcher, **({FINISH_PAUSE_ENV: pause} if phase == "final" else {}))
            watch(proc, out, until)
            time.sleep(delay)
            killed = _kill_job(proc.pid)
            proc.wait()
            f = _files(out)
            got = _phase(f, units, lists)
            kills.append(f"{phase}{' (2 ranks)' if launcher else ''} -> {got}: {f['sigs']}/{units} signature files, "
                         f"{f['lists']}/{lists} lists of duplicates, {f['units']}/{units} units, filtered lists "
                         f"{'written' if (out / 'filtered').exists() else 'not yet'}, tokenizer "
                         f"{'copied' if (out / tok.name).exists() else 'not yet'}, {len(killed)} processes killed")
            time.sleep(0.1)
            assert not [q for q in killed if _alive(q)], f"processes of the killed job left: {kills[-1]}"
            if list(out.rglob("*.tmp.*")):
                kills[-1] += f", {len(list(out.rglob('*.tmp.*')))} temporary files left"
            if got == "scan":  # a damaged signature file (truncated) must be scanned again, not trusted
                sig = sorted((out / ".state" / "dedup").glob("unit_*.npz"))[0]
                sig.write_bytes(sig.read_bytes()[:100])
                # What kills while writing a signature file and a list of duplicates leave (removed on resume).
                for x in (dedup.sig_path(out, 1), dedup.removed_list_path(out, 1)):
                    x.parent.mkdir(parents=True, exist_ok=True)
                    (x.parent / f".{x.name}.tmp.999.0badf00d").write_bytes(b"partial")
            leftovers = list(out.rglob("*.tmp.*"))
            p = run_cmd([*launcher, *cmd, "--output", out])  # the same command again resumes
            if f["units"] and not launcher:
                assert f"{f['units']} unit(s) verified and kept" in p.stderr, p.stderr[-3000:]
            same_tree(clean, out)
            assert verify(out) == []
            assert not [x for x in leftovers if x.exists()]  # temporary files of the killed run cleaned up
            if got == phase:
                break
        else:
            raise AssertionError(f"3 kills meant for the {phase} phase landed elsewhere:\n" + "\n".join(kills))
    print(f"\n{len(kills)} kills in {time.monotonic() - t_start:.1f}s (phases of the uninterrupted run: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in durations.items()) + "):\n  " + "\n  ".join(kills))

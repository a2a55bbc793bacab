"""preprocess end to end with real SentencePiece on real text (tests/data/corpus and the demo's sample
corpus): determinism across workers and MPI ranks, exact chunked tokenization, bad-input accounting,
resume after kill -9; the same for a local hf: dataset of several files, read in units of its shards."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from lmforge.data_pipeline.indexed_dataset import IndexedDataset
from lmforge.data_pipeline.manifest import load_manifest, shard_prefixes
from lmforge.data_pipeline.preprocess import BACKEND_ENV, resolve_backend, split_exact
from lmforge.data_pipeline.readers import DOC, ReadOptions, expand_inputs, fingerprint, iter_documents
from lmforge.data_pipeline.tools import verify
from tests.helpers.hfdata import corpus_documents, write_jsonl_dir
from tests.helpers.paths import BIN, CORPUS, ROOT, SAMPLE
from tests.helpers.process import child_env, run_cmd

PY = sys.executable
# Three books (one with BOM, CRLF and the Gutenberg header, one not UTF-8), 37 long Wikipedia articles,
# WikiExtractor stubs and Chinese: 1.6 MB, six sources.
INPUTS = [
    SAMPLE / "books/pg1952.txt", CORPUS / "books/1342-0.txt", CORPUS / "books/74-0.txt",
    SAMPLE / "wikipedia", CORPUS / "wikipedia/WikiTasks/AA/wiki_00", CORPUS / "wikipedia/zhwiki",
]


# A local hf: dataset: the documents of these inputs (650 KB) in 8 JSON-lines files, one shard each.
HF_INPUTS = [CORPUS / "wikipedia/Wikipedia_Json2conll", CORPUS / "wikipedia/zhwiki", CORPUS / "wikipedia/WikiTasks",
             SAMPLE / "books/pg1952.txt"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    records = [{"text": t} for t in corpus_documents(HF_INPUTS)]
    records.insert(len(records) // 2, {"text": ""})  # counted as skipped, at its file:row
    out = tmp_path_factory.mktemp("hf") / "dataset"
    write_jsonl_dir(out, records, 8)
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    run_cmd([PY, "-m", "lmforge.data_pipeline", "train-tokenizer", "--input", *INPUTS, "--vocab-size", "1200",
             "--character-coverage", "0.98", "--output", out, "--threads", "1"])
    return out / "tokenizer.model"


def preprocess(tok: Path, out: Path, *extra, inputs=INPUTS, check=True, launcher=()) -> subprocess.CompletedProcess:
    return run_cmd([*launcher, PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", *inputs, "--tokenizer", tok,
                    "--output", out, "--no-progress", "--unit-bytes", "400k", "--max-shard-bytes", "300k",
                    "--valid-fraction", "0.05", *extra], check=check)


def same_tree(a: Path, b: Path) -> None:
    """Every shard and the manifest byte-identical (the .state/ bookkeeping is excluded)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and ".state" not in p.parts)
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and ".state" not in p.parts)
    assert files_a == files_b
    bad = [str(f) for f in files_a if not filecmp.cmp(a / f, b / f, shallow=False)]
    assert not bad, f"differ: {bad}"


def test_tokenizer_is_deterministic_and_llama_ids(tok, tmp_path):
    run_cmd([PY, "-m", "lmforge.data_pipeline", "train-tokenizer", "--input", *INPUTS, "--vocab-size", "1200",
             "--character-coverage", "0.98", "--output", tmp_path, "--threads", "1"])
    assert (tmp_path / "tokenizer.model").read_bytes() == tok.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert all(sum(c.isdigit() for c in piece) <= 1 for piece in sp.encode("in 2024, 31415", out_type=str))
    text = "naïve 数学 ½ \u2603 tabs\tand  spaces\n"
    assert sp.decode(sp.encode(text)) == text  # byte fallback + identity normalization: lossless
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta["settings"]["byte_fallback"] and meta["settings"]["split_digits"]
    assert len(meta["sources"]) == 6 and meta["corpus_fingerprint"]


def test_split_exact_matches_whole_document_tokens(tok):
    """The chunked tokenization the pipeline uses for long texts gives exactly the whole-text tokens."""
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    texts = [t for s in expand_inputs([str(p) for p in INPUTS] + [str(CORPUS / "wikipedia/wikitext-2-raw")])
             for k, t, _ in iter_documents(s, ReadOptions()) if k == DOC]
    long = [t for t in texts if len(t) > 4000]
    assert len(long) > 20
    for t in long:
        pieces = split_exact(t, chunk=1000)
        assert len(pieces) > 1 or " " not in t[1000:]
        assert sum(sp.encode(pieces), []) == sp.encode(t)


def test_workers_1_and_2_byte_identical_and_accounted(tok, tmp_path, monkeypatch):
    preprocess(tok, tmp_path / "w1", "--workers", "1")
    preprocess(tok, tmp_path / "w2", "--workers", "2")
    same_tree(tmp_path / "w1", tmp_path / "w2")
    # Both tokenizer backends (auto picks threads with this SentencePiece): the same bytes.
    assert resolve_backend() == "thread", "SentencePiece without numpy output: update this test"
    monkeypatch.setenv(BACKEND_ENV, "process")
    preprocess(tok, tmp_path / "w2p", "--workers", "2")
    same_tree(tmp_path / "w1", tmp_path / "w2p")
    m = load_manifest(tmp_path / "w2")
    assert m["format"] == "lmforge-shards-v1" and m["tokenizer"]["eos_id"] == 2
    assert len(m["splits"]["train"]) > 3 and len(m["splits"]["valid"]) >= 1  # several units and shards
    r = m["records"]
    assert r["read"] == r["written"] + r["skipped"] and r["skipped"] == sum(m["skipped"].values())
    assert m["skipped"]["invalid_utf8"] == 1 and m["skip_examples"]["invalid_utf8"][0].endswith("74-0.txt:50")
    assert m["skipped"]["empty"] == 203  # WikiTasks stubs (tests/data/corpus/README.md)
    docs = 0
    for split in ("train", "valid"):
        for prefix, sh in zip(shard_prefixes(tmp_path / "w2", split), m["splits"][split]):
            ds = IndexedDataset(prefix)
            assert ds.num_documents == sh["documents"] and ds.num_tokens == sh["tokens"]
            assert os.path.getsize(prefix + ".bin") <= 300 * 1024 + 2 * ds.sequence_lengths.max()
            ends = np.cumsum(ds.sequence_lengths.astype(np.int64)) - 1
            assert (ds.tokens[ends] == 2).all()  # EOD closes every document
            docs += ds.num_documents
    assert docs == r["written"]
    assert verify(tmp_path / "w2") == []


def test_bad_inputs_skip_and_fail(tok, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_bytes(b'{"text": "fine text here"}\n{oops\n{"text": 7}\n{"text": "\\ud800 lone"}\n'
                                  b'{"text": "caf\xe9"}\n\n{"text": ""}\n{"body": "x"}\n')
    (bad / "b.txt").write_bytes((CORPUS / "books/74-0.txt").read_bytes()[:20000])
    p = preprocess(tok, tmp_path / "out", inputs=[bad])
    m = load_manifest(tmp_path / "out")
    assert m["skipped"] == {"blank_line": 1, "empty": 1, "invalid_json": 1, "invalid_utf8": 2,
                            "missing_text": 1, "non_string_text": 1, "unencodable_text": 1}
    assert m["records"] == {"read": 9, "written": 1, "skipped": 8}
    assert "invalid_json: 1" in p.stdout and "a.jsonl:2" in p.stdout
    p = preprocess(tok, tmp_path / "out2", "--on-error", "fail", inputs=[bad], check=False)
    assert p.returncode == 2 and "a.jsonl:2: invalid_json" in p.stderr and "Traceback" not in p.stderr


def test_bad_input_exits_2_with_one_error_line(tok, tmp_path):
    """Every user-facing failure is a typed error: ``error: ...`` and exit 2, never a traceback (exit 1
    with a traceback is kept for bugs)."""
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    cases = [
        (["preprocess", "--input", tmp_path / "missing.jsonl", "--tokenizer", tok, "--output", tmp_path / "o1"],
         "missing.jsonl: no such file or directory"),
        (["preprocess", "--input", INPUTS[0], "--tokenizer", garbage, "--output", tmp_path / "o2"],
         "not a SentencePiece model"),
        (["train-tokenizer", "--input", INPUTS[0], "--vocab-size", "100000", "--output", tmp_path / "t"],
         "SentencePiece training failed"),
        (["inspect", tmp_path], "no manifest"),
    ]
    for args, message in cases:
        p = run_cmd([PY, "-m", "lmforge.data_pipeline", *args], check=False)
        assert (p.returncode, p.stderr.count("error: "), "Traceback" in p.stderr) == (2, 1, False), p.stderr
        assert message in p.stderr


def token_stream(out: Path) -> dict[str, np.ndarray]:
    """Each split's tokens, shards concatenated in manifest order."""
    return {split: np.concatenate([np.asarray(IndexedDataset(p).tokens) for p in shard_prefixes(out, split)]
                                  or [np.zeros(0, np.uint16)])
            for split in ("train", "valid")}


def test_big_files_split_into_byte_ranges(tok, tmp_path):
    """A 344 KB .jsonl and a 1 MB WikiExtractor file cut into 100 KB ranges: same bytes for 1 and 2
    workers; the same token stream, counts and absolute error lines as reading each file as one unit."""
    lines = (CORPUS / "wikipedia/Wikipedia_Json2conll/AA/wiki_00").read_bytes().splitlines(keepends=True)
    bad_at = {len(lines) // 3: b"{oops\n", 2 * len(lines) // 3: b'{"text": "caf\xe9"}\n'}
    for i in sorted(bad_at, reverse=True):
        lines.insert(i, bad_at[i])
    (tmp_path / "big.jsonl").write_bytes(b"".join(lines))
    inputs = [tmp_path / "big.jsonl", SAMPLE / "wikipedia/wiki_00"]
    for name, unit, workers in (("r1", "100k", "1"), ("r2", "100k", "2"), ("whole", "1G", "2")):
        preprocess(tok, tmp_path / name, "--unit-bytes", unit, "--workers", workers, "--max-shard-bytes", "1G",
                   inputs=inputs)
    same_tree(tmp_path / "r1", tmp_path / "r2")
    ranged, whole = load_manifest(tmp_path / "r2"), load_manifest(tmp_path / "whole")
    assert len(list((tmp_path / "r2" / ".state").glob("unit_*.json"))) == 4 + 11  # the two files' ranges
    assert len(ranged["splits"]["train"]) > len(whole["splits"]["train"])
    for split, toks in token_stream(tmp_path / "r2").items():
        assert np.array_equal(toks, token_stream(tmp_path / "whole")[split]), split
    for key in ("records", "skipped", "totals"):
        if key == "totals":
            for s in ("train", "valid"):
                assert {k: v for k, v in ranged[key][s].items() if k != "shards"} == \
                    {k: v for k, v in whole[key][s].items() if k != "shards"}
        else:
            assert ranged[key] == whole[key], key
    big = str(tmp_path / "big.jsonl")
    expect = {"invalid_json": [f"{big}:{min(bad_at) + 1}"], "invalid_utf8": [f"{big}:{max(bad_at) + 2}"]}
    for m in (ranged, whole):
        assert {r: m["skip_examples"][r] for r in expect} == expect
    p = preprocess(tok, tmp_path / "fail", "--unit-bytes", "100k", "--on-error", "fail", inputs=inputs[:1],
                   check=False)
    assert p.returncode == 2 and f"{big}:{min(bad_at) + 1}: invalid_json" in p.stderr


def test_bad_bytes_after_streamed_pieces_roll_the_document_back(tok, tmp_path):
    """A document longer than --max-doc-bytes with invalid UTF-8 (or no </doc>) after pieces of it were
    written is removed whole and counted: read = written + skipped, and the shards hold exactly what the
    input without that document gives."""
    wiki = (SAMPLE / "wikipedia/wiki_00").read_bytes()
    docs = wiki.split(b"</doc>\n")[:6]
    body = b"\n".join([b"A long paragraph of plain words that goes on and on."] * 2000)
    bad_doc = b'<doc id="x" title="Bad">\nBad\n\n' + body + b"\ncaf\xe9\n" + body + b"\n"
    good = b"</doc>\n".join(docs[:3]) + b"</doc>\n"
    rest = b"</doc>\n".join(docs[3:]) + b"</doc>\n"
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    (tmp_path / "with/wiki_00").write_bytes(good + bad_doc + b"</doc>\n" + rest + b'<doc id="y">\nY\n' + body)
    (tmp_path / "without/wiki_00").write_bytes(good + rest)
    for name in ("with", "without"):
        preprocess(tok, tmp_path / f"out_{name}", "--max-doc-bytes", "20k", "--workers", "2",
                   inputs=[tmp_path / name])
    m = load_manifest(tmp_path / "out_with")
    r = m["records"]
    assert r["read"] == r["written"] + r["skipped"] == 8 and m["skipped"] == {"invalid_utf8": 1, "unterminated_doc": 1}
    bad_line = (good + bad_doc).split(b"caf\xe9")[0].count(b"\n") + 1
    assert m["skip_examples"]["invalid_utf8"] == [f"{tmp_path / 'with/wiki_00'}:{bad_line}"]
    assert load_manifest(tmp_path / "out_without")["records"]["written"] == r["written"]
    for split, toks in token_stream(tmp_path / "out_with").items():
        assert np.array_equal(toks, token_stream(tmp_path / "out_without")[split]), split
    assert verify(tmp_path / "out_with") == []


def test_fingerprint_methods(tok, tmp_path):
    """sampled (default) misses a same-size edit between its blocks, full does not; the method is in the
    manifest and a rerun with another method is refused with a clear reason."""
    f = tmp_path / "big.jsonl"
    line = json.dumps({"text": "word " * 200}).encode() + b"\n"
    f.write_bytes(line * (3 * (1 << 20) // len(line)))
    (src,) = expand_inputs([str(f)])
    before = {m: fingerprint(src, m) for m in ("sampled", "full")}
    data = bytearray(f.read_bytes())
    mid = len(data) // 2 + (1 << 15) + 100  # between two sampled 64 KiB blocks
    data[mid] = ord("W") if data[mid] == ord("w") else ord("w")
    f.write_bytes(bytes(data))
    assert fingerprint(src, "sampled") == before["sampled"]
    assert fingerprint(src, "full") != before["full"]
    assert fingerprint(src, "full") == hashlib.sha256(f"{f}|{len(data)}|".encode() + bytes(data)).hexdigest()
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "one two three"}\n')
    preprocess(tok, tmp_path / "out", "--fingerprint", "full", inputs=[small])
    m = load_manifest(tmp_path / "out")
    assert m["fingerprint_method"] == "full"
    p = preprocess(tok, tmp_path / "out", inputs=[small], check=False)
    assert p.returncode == 2 and "fingerprint method differs" in p.stderr


def test_changed_input_is_refused_then_overwrite(tok, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "one two three"}\n')
    preprocess(tok, tmp_path / "out", inputs=[f])
    f.write_text('{"text": "one two three four"}\n')
    p = preprocess(tok, tmp_path / "out", inputs=[f], check=False)
    assert p.returncode == 2 and "changed" in p.stderr and "--overwrite" in p.stderr
    preprocess(tok, tmp_path / "out", "--overwrite", inputs=[f])
    assert load_manifest(tmp_path / "out")["totals"]["train"]["documents"] + \
        load_manifest(tmp_path / "out")["totals"]["valid"]["documents"] == 1


def test_inspect_verify_merge(tok, tmp_path):
    preprocess(tok, tmp_path / "a", inputs=INPUTS[:3])
    preprocess(tok, tmp_path / "b", inputs=INPUTS[4:5])
    p = run_cmd([PY, "-m", "lmforge.data_pipeline", "inspect", tmp_path / "a", "--samples", "1"])
    assert "sample 0:" in p.stdout and "doc length" in p.stdout
    run_cmd([PY, "-m", "lmforge.data_pipeline", "merge", tmp_path / "a", tmp_path / "b", "--output", tmp_path / "ab"])
    m = load_manifest(tmp_path / "ab")
    ma, mb = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "b")
    assert m["totals"]["train"]["tokens"] == ma["totals"]["train"]["tokens"] + mb["totals"]["train"]["tokens"]
    assert verify(tmp_path / "ab") == []
    shard = Path(shard_prefixes(tmp_path / "ab", "train")[0] + ".bin")
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    p = run_cmd([PY, "-m", "lmforge.data_pipeline", "verify", tmp_path / "ab"], check=False)
    assert p.returncode == 1 and "sha256 mismatch" in p.stderr


def test_hf_dataset_read_in_shard_units(tok, hf_dir, tmp_path):
    """hf:DIR of 8 JSON-lines files is 8 sources (one per shard) planned into several units: the same bytes
    for 1 and 2 workers; the same shards, counts and skip locations as the same files given directly; the
    same token stream as one unit holding every shard; a changed file is refused on a rerun."""
    spec = f"hf:{hf_dir}"
    for name, workers in (("w1", "1"), ("w2", "2")):
        preprocess(tok, tmp_path / name, "--workers", workers, "--unit-bytes", "200k", inputs=[spec])
    same_tree(tmp_path / "w1", tmp_path / "w2")
    assert _finished_units(tmp_path / "w2") >= 3
    preprocess(tok, tmp_path / "direct", "--workers", "2", "--unit-bytes", "200k", inputs=[hf_dir])
    preprocess(tok, tmp_path / "one", "--workers", "2", "--unit-bytes", "1G", inputs=[spec])
    assert _finished_units(tmp_path / "one") == 1
    m, direct = load_manifest(tmp_path / "w2"), load_manifest(tmp_path / "direct")
    files = sorted(hf_dir.iterdir())
    assert [(src["path"], src["file"], src["size"]) for src in m["sources"]] == \
        [(f"{spec}[shard {i} of 8]", str(f), f.stat().st_size) for i, f in enumerate(files)]
    assert m["splits"] == direct["splits"]  # shard files listed with their sha256s: byte-identical
    for key in ("records", "skipped", "skip_examples", "totals"):
        assert m[key] == direct[key], key
    assert m["skipped"] == {"empty": 1} and m["skip_examples"]["empty"][0].startswith(str(hf_dir / "part-0000"))
    for split, toks in token_stream(tmp_path / "one").items():
        assert np.array_equal(toks, token_stream(tmp_path / "w2")[split]), split
    assert verify(tmp_path / "w2") == []
    with open(files[5], "a") as f:
        f.write('{"text": "one more document"}\n')
    p = preprocess(tok, tmp_path / "w2", "--unit-bytes", "200k", inputs=[spec], check=False)
    assert p.returncode == 2 and f"input {spec}[shard 5 of 8] changed" in p.stderr


@pytest.mark.slow
def test_mpirun_2_ranks_byte_identical(tok, tmp_path):
    preprocess(tok, tmp_path / "one", "--workers", "1")
    preprocess(tok, tmp_path / "mpi", "--workers", "1", launcher=[BIN / "mpirun", "-n", "2"])
    same_tree(tmp_path / "one", tmp_path / "mpi")


@pytest.mark.slow
def test_hf_dataset_mpirun_2_ranks_byte_identical(tok, hf_dir, tmp_path):
    for name, launcher in (("one", []), ("mpi", [BIN / "mpirun", "-n", "2"])):
        preprocess(tok, tmp_path / name, "--workers", "1", "--unit-bytes", "200k", inputs=[f"hf:{hf_dir}"],
                   launcher=launcher)
    same_tree(tmp_path / "one", tmp_path / "mpi")


def _finished_units(out: Path) -> int:
    return len(list((out / ".state").glob("unit_*.json")))


@pytest.mark.slow
def test_kill_9_and_resume_is_byte_identical(tok, tmp_path):
    """kill -9 of the whole process group mid-run, then the same command again: the output is
    byte-identical to an uninterrupted run. Every file of the test corpora (2.8 MB) in 100 KB units; each
    run is killed a random moment after a random number of its units finished (watching the unit state
    files, not a clock: a busy machine must not let the run finish first), so others are in flight."""
    _kill_9_and_resume([*INPUTS, SAMPLE / "books", CORPUS / "books", CORPUS / "wikipedia"], tok, tmp_path)


@pytest.mark.slow
def test_hf_dataset_kill_9_and_resume_is_byte_identical(tok, hf_dir, tmp_path):
    """The same for hf:DIR, whose 8 shards are 8 units of 100 KB: resumed per shard."""
    _kill_9_and_resume([f"hf:{hf_dir}"], tok, tmp_path)


def _kill_9_and_resume(inputs: list, tok: Path, tmp_path: Path, unit_bytes: str = "100k",
                       max_shard_bytes: str = "300k", valid_fraction: str = "0.05", trials: int = 3,
                       least: int = 2) -> None:
    """Run ``trials`` times: kill -9 of the whole group a random moment after a random number of units
    finished, the same command again, byte-identical to an uninterrupted run; at least ``least`` kills must
    land between the first and the last unit."""
    cmd = [PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", *map(str, inputs), "--tokenizer", str(tok),
           "--no-progress", "--unit-bytes", unit_bytes, "--max-shard-bytes", max_shard_bytes, "--valid-fraction",
           valid_fraction, "--workers", "2"]
    run_cmd([*cmd, "--output", tmp_path / "clean"])
    units = _finished_units(tmp_path / "clean")
    rng = random.Random(0)
    kills = mid_way = 0
    for trial in range(trials):
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen([*cmd, "--output", str(out)], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        target = round(rng.uniform(0.2, 0.8) * units)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _finished_units(out) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.01))  # somewhere inside the next units' work
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: main process and its workers
            kills += 1
        proc.wait()
        finished = _finished_units(out)
        mid_way += 0 < finished < units
        leftovers = list(out.rglob("*.tmp.*"))
        p = run_cmd([*cmd, "--output", out])  # the same command again resumes
        assert (f"{finished} unit(s) verified and kept" in p.stderr) == (finished > 0)
        same_tree(tmp_path / "clean", out)
        assert verify(out) == []
        assert not [f for f in leftovers if f.exists()]  # temporary files of the killed run cleaned up
    assert kills >= least, "runs finished before the kill"
    assert mid_way >= least, f"fewer than {least} kills landed between the first and the last of {units} units"


def test_unusable_inputs_are_an_error_not_an_empty_dataset(tok, tmp_path):
    """A zero-byte file, a damaged .jsonl.gz and JSON lines without the text field each write nothing: exit 2
    with the reason, examples and what to check, and no manifest (a trainer would find no shards)."""
    import gzip

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    damaged = tmp_path / "damaged.jsonl.gz"
    damaged.write_bytes(gzip.compress(b'{"text": "a real line of text"}\n' * 50)[:30])
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"body": "x"}\n{"body": "y"}\n')
    for path, reason, hint in ((empty, "empty 1", "empty files"),
                               (damaged, "truncated_compressed", "a damaged or incomplete compressed file"),
                               (no_text, "missing_text 2", "--text-key")):
        out = tmp_path / f"out_{path.name}"
        p = preprocess(tok, out, inputs=[path], check=False)
        assert p.returncode == 2, p.stderr
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: no document written from 1 input file(s)"), p.stderr
        assert reason in last and hint in last and str(path) in last, last
        assert not (out / "manifest.json").exists()
    # Beside files that have documents, each file that yields none is named in a warning, once: the two
    # above and the corpus's book whose bytes are not UTF-8 (tests/data/corpus/README.md: a trap file).
    p = preprocess(tok, tmp_path / "mixed", inputs=[empty, no_text, *INPUTS])
    warned = [x for x in p.stderr.splitlines() if x.startswith("warning: ")]
    assert [w.split(":")[1].strip() for w in warned] == [str(empty), str(no_text), str(CORPUS / "books/74-0.txt")]

"""Documents streamed in pieces (longer than --max-doc-bytes) are exact-deduplication candidates
(data_pipeline/preprocess/dedup.py, ``ExactKeyStream``): the key computed over the pieces is the key of the
whole text (random cuts through whitespace runs, combining marks, Hangul jamo and other-script
whitespace; a real book streamed against its in-memory twin); inside preprocess a streamed copy of a
streamed book, and a streamed copy of a document held whole, are removed (none of their pieces written),
a streamed near copy is kept (streamed documents are no MinHash candidates) and counted in the manifest's
``dedup.streamed_exact_only``, a stream that turns bad before its end is no candidate and shifts no
numbering; the same bytes for 1 and 2 workers and 2 MPI ranks."""

from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
import pytest

from lmforge.data_pipeline.manifest import load_manifest
from lmforge.data_pipeline.preprocess.dedup import ExactKeyStream, exact_key
from lmforge.data_pipeline.readers import DOC, LAST, PART, ReadOptions, expand_inputs, iter_documents
from tests.data_pipeline.test_preprocess import (  # noqa: F401
    _finished_units,
    preprocess,
    same_tree,
    tok,
    token_stream,
)
from tests.helpers.paths import BIN, CORPUS, SAMPLE

BOOK = SAMPLE / "books/pg1952.txt"  # 50 KB
PLAY = CORPUS / "books/tinyshakespeare/input.txt"  # 50 KB


def stream_key(pieces: list[str]) -> bytes:
    s = ExactKeyStream()
    for p in pieces:
        s.update(p)
    return s.digest()


def test_stream_key_is_the_whole_texts_key_for_any_cut():
    """Random texts of characters that NFC composes or reorders across a cut (e + U+0301, U+0327; Hangul
    L V T jamo; U+0F73 and its parts), whitespace runs of ASCII and other whitespace (U+3000, U+00A0,
    U+2000 which NFC maps to U+2002), cut anywhere into pieces, empty ones included."""
    alphabet = ["a", "b", "e", "x", "\u00e9", "\u0301", "\u0327", "\u1100", "\u1161", "\u11a8", "\u4e2d", "\u0f71",
                "\u0f72", "\u0f73", "\u0b47", "\u0b3e", " ", "  ", "\t", "\n", "\r\n", "\u3000", "\u00a0", "\u2000"]
    rnd = random.Random(0)
    naive_differs = 0
    for _ in range(3000):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 60)))
        cuts = sorted(rnd.choices(range(len(text) + 1), k=rnd.randint(0, 8)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert stream_key(pieces) == exact_key(text), pieces
        # Normalising each piece on its own would not do (so the cases above test something).
        naive_differs += exact_key(" ".join(unicodedata.normalize("NFC", p) for p in pieces)) != exact_key(text)
    assert naive_differs > 1000


def test_streamed_book_has_its_in_memory_twins_key():
    """A real book read in pieces of ~5 KB and the same book read whole: one key; so is its copy with CRLF
    line ends, doubled spaces and decomposed (NFD) accents."""
    (src,) = expand_inputs([str(SAMPLE / "books/11-0.txt")])
    pieces = [(k, t) for k, t, _ in iter_documents(src, ReadOptions(max_doc_bytes=5000))]
    assert [k for k, _ in pieces] == [PART] * (len(pieces) - 1) + [LAST] and len(pieces) > 20
    ((kind, whole, _),) = iter_documents(src, ReadOptions())
    assert kind == DOC and stream_key([t for _, t in pieces]) == exact_key(whole)
    variant = unicodedata.normalize("NFD", whole).replace(" ", "  ").replace("\n", "\r\n")
    assert variant != whole and stream_key([variant[i : i + 777] for i in range(0, len(variant), 777)]) == \
        exact_key(whole)


@pytest.mark.slow
def test_streamed_documents_are_exact_candidates_only(tok, tmp_path):  # noqa: F811
    book, play = BOOK.read_bytes(), PLAY.read_bytes()
    mid = book.index(b" ", len(book) // 2) + 1
    near = book[:mid] + b"very " + book[mid:]  # one word added: a near copy
    files = {
        "a_book.txt": book,  # streamed, kept
        "b_bad.txt": book + b"\ncaf\xe9\n" + book,  # streamed, then invalid UTF-8: skipped, no candidate
        "c_copy.txt": book.replace(b"\n", b"\r\n").replace(b" ", b"  "),  # streamed exact copy of a: removed
        "d_record.jsonl": json.dumps({"text": play.decode()}).encode() + b"\n",  # held whole, kept
        "e_play.txt": play,  # streamed exact copy of d: removed, none of its pieces written
        "f_near.txt": near,  # streamed near copy of a: no MinHash candidate, kept
        "g_near.jsonl": json.dumps({"text": play.decode().replace("Citizen", "Citizens", 1)}).encode() + b"\n",
    }
    (tmp_path / "in").mkdir()
    for name, data in files.items():
        (tmp_path / "in" / name).write_bytes(data)
    args = ["--max-doc-bytes", "20k", "--unit-bytes", "60k", "--dedup", "exact,minhash"]
    preprocess(tok, tmp_path / "w1", "--workers", "1", *args, inputs=[tmp_path / "in"])
    preprocess(tok, tmp_path / "w2", "--workers", "2", *args, inputs=[tmp_path / "in"])
    preprocess(tok, tmp_path / "mpi", "--workers", "1", *args, inputs=[tmp_path / "in"],
               launcher=[BIN / "mpirun", "-n", "2"])
    same_tree(tmp_path / "w1", tmp_path / "w2")
    same_tree(tmp_path / "w1", tmp_path / "mpi")
    m = load_manifest(tmp_path / "w2")
    loc = {name: f"{tmp_path / 'in' / name}:1" for name in files}
    assert m["skipped"] == {"duplicate-exact": 2, "duplicate-near": 1, "invalid_utf8": 1}, m["skipped"]
    assert m["duplicate_examples"] == {
        "duplicate-exact": [{"loc": loc["c_copy.txt"], "kept": loc["a_book.txt"]},
                            {"loc": loc["e_play.txt"], "kept": loc["d_record.jsonl"]}],
        "duplicate-near": [{"loc": loc["g_near.jsonl"], "kept": loc["d_record.jsonl"]}]}
    assert m["dedup"] == {"streamed_exact_only": 4}  # a, c, e, f (b turned bad before its end)
    assert m["records"] == {"read": 7, "written": 3, "skipped": 4}
    # All in one unit, scanned a source per worker process: the same documents found and removed.
    preprocess(tok, tmp_path / "one", "--workers", "2", *args, "--unit-bytes", "1M", inputs=[tmp_path / "in"])
    one = load_manifest(tmp_path / "one")
    assert _finished_units(tmp_path / "one") == 1 and _finished_units(tmp_path / "w2") >= 5
    assert {k: one[k] for k in ("records", "skipped", "duplicate_examples", "dedup")} == \
        {k: m[k] for k in ("records", "skipped", "duplicate_examples", "dedup")}
    for split, toks in token_stream(tmp_path / "w2").items():
        assert np.array_equal(toks, token_stream(tmp_path / "one")[split]), split
    # Exactly the kept documents were written: the token streams of a run over just them.
    keep = tmp_path / "keep"
    keep.mkdir()
    for name in ("a_book.txt", "d_record.jsonl", "f_near.txt"):
        (keep / name).write_bytes(files[name])
    preprocess(tok, tmp_path / "kept", *args[:4], inputs=[keep])
    for split, toks in token_stream(tmp_path / "w2").items():
        assert np.array_equal(toks, token_stream(tmp_path / "kept")[split]), split

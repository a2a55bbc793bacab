"""Streaming readers on the real test corpus (tests/data/corpus, the demo's sample corpus) and on crafted
bad input."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import zstandard

from lmforge.data_pipeline.readers import (
    DOC,
    LAST,
    PART,
    SKIP,
    InputError,
    ReadOptions,
    ReadRange,
    Source,
    expand_inputs,
    fingerprint,
    iter_documents,
)
from lmforge.data_pipeline.readers import hf as hf_reader
from lmforge.data_pipeline.readers import lines as reader_lines
from lmforge.data_pipeline.readers import text as text_reader
from lmforge.data_pipeline.readers import wikidoc as wikidoc_reader
from tests.helpers.hfdata import corpus_documents, write_jsonl_dir
from tests.helpers.paths import CORPUS, SAMPLE


def read_all(path, **opts):
    (src,) = expand_inputs([str(path)])
    return src, list(iter_documents(src, ReadOptions(**opts)))


def test_wikiextractor_doc_format():
    src, items = read_all(SAMPLE / "wikipedia/wiki_00")
    assert src.format == "wikidoc"
    docs = [t for k, t, _ in items if k == DOC]
    assert len(docs) == 37  # README: 37 articles
    assert docs[0].startswith("Anarchism\n") and "<doc" not in docs[0] and "</doc>" not in docs[0]


def test_wikiextractor_empty_docs_are_counted_not_lost():
    _, items = read_all(CORPUS / "wikipedia/WikiTasks/AA/wiki_00")
    docs = sum(k == DOC for k, _, _ in items)
    empty = [loc for k, r, loc in items if k == SKIP and r == "empty"]
    assert (docs, len(empty)) == (122, 203)  # most are title-only stubs (tests/data/corpus/README.md)
    assert empty[0].endswith("wiki_00:1")  # file:line of the <doc> tag


def test_wikiextractor_json_lines():
    src, items = read_all(CORPUS / "wikipedia/Wikipedia_Json2conll/AA/wiki_00")
    assert src.format == "jsonl"
    assert sum(k == DOC for k, _, _ in items) == len(items) == 8  # its first 8 articles


def test_book_bom_crlf_and_gutenberg_strip():
    _, items = read_all(CORPUS / "books/1342-0.txt")
    (kind, text, _), = items
    assert kind == DOC and "\r" not in text and not text.startswith("\ufeff")
    assert "START OF THIS PROJECT GUTENBERG" in text
    _, items = read_all(CORPUS / "books/1342-0.txt", strip_gutenberg=True)
    text = items[0][1]
    assert "PROJECT GUTENBERG" not in text.upper()[:3000] and "End of the Project Gutenberg" not in text
    assert "It is a truth universally acknowledged" in text[:5000]
    # a body-only book is left alone by the stripper
    _, plain = read_all(SAMPLE / "books/11-0.txt")
    _, stripped = read_all(SAMPLE / "books/11-0.txt", strip_gutenberg=True)
    assert plain == stripped


def test_windows_1252_book_is_skipped_with_location():
    _, items = read_all(CORPUS / "books/74-0.txt")
    assert items == [(SKIP, "invalid_utf8", f"{CORPUS / 'books/74-0.txt'}:50")]


def test_huge_document_is_streamed_in_pieces():
    _, items = read_all(SAMPLE / "books/84-0.txt", max_doc_bytes=100_000)  # Frankenstein, 421 KB
    kinds = [k for k, _, _ in items]
    assert kinds[-1] == LAST and set(kinds[:-1]) == {PART} and len(kinds) >= 3
    assert max(len(t) for _, t, _ in items) <= 100_000 + 1_000  # bounded by the limit plus one line
    _, whole = read_all(SAMPLE / "books/84-0.txt")
    assert "".join(t for _, t, _ in items).strip("\n") == whole[0][1]


def test_bad_jsonl_every_reason(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b"{not json",
        json.dumps({"txt": "wrong key"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        b"",
        b'{"text": "caf\xe9"}',  # Latin-1 byte: invalid UTF-8
        json.dumps({"text": "x" * 5000}).encode(),  # too long for max_line_bytes below
        json.dumps({"text": "good two"}).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    _, items = read_all(p, max_line_bytes=1000)
    got = [(k, t if k == SKIP else "DOC", loc.rsplit(":", 1)[1]) for k, t, loc in items]
    assert got == [
        (DOC, "DOC", "1"), (SKIP, "invalid_json", "2"), (SKIP, "missing_text", "3"),
        (SKIP, "non_string_text", "4"), (SKIP, "empty", "5"), (SKIP, "blank_line", "6"),
        (SKIP, "invalid_utf8", "7"), (SKIP, "line_too_long", "8"), (DOC, "DOC", "9"),
    ]


def test_compressed_and_truncated(tmp_path):
    payload = b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(2000))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(payload))
    z = zstandard.ZstdCompressor().compress(payload)
    (tmp_path / "b.jsonl.zst").write_bytes(z)
    (tmp_path / "c.jsonl.zst").write_bytes(z[: len(z) // 2])
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        _, items = read_all(tmp_path / name)
        assert [k for k, _, _ in items] == [DOC] * 2000
    _, items = read_all(tmp_path / "c.jsonl.zst")
    assert items[-1][0] == SKIP and items[-1][1] == "truncated_compressed"
    assert 0 < sum(k == DOC for k, _, _ in items) < 2000


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha beta", None, "", "gamma"]}), tmp_path / "t.parquet")
    _, items = read_all(tmp_path / "t.parquet")
    assert [(k, t if k == SKIP else t) for k, t, _ in items] == [
        (DOC, "alpha beta"), (SKIP, "missing_text"), (SKIP, "empty"), (DOC, "gamma")]


def test_expand_inputs_dirs_globs_and_errors(tmp_path):
    srcs = expand_inputs([str(CORPUS / "wikipedia"), str(SAMPLE / "books/*.txt"), str(CORPUS / "wikipedia/zhwiki")])
    paths = [s.path for s in srcs]
    assert len(paths) == 4 + 3 and paths[:4] == sorted(paths[:4])  # zhwiki listed once, in the directory
    assert [s.format for s in srcs] == ["wikidoc", "jsonl", "text", "wikidoc", "text", "text", "text"]
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.jsonl")])


@pytest.mark.parametrize("direct", [64, 2])  # ds.shard on the whole dataset; via sqrt(N) blocks
def test_hf_dataset_is_read_per_shard(tmp_path, monkeypatch, direct):
    """An hf: directory of 7 JSON-lines files is 7 sources, one per shard, each knowing its file and size;
    their items in order are the whole dataset's (as one reader reads it) and the files' own, at
    ``file:row``. A bad JSON line ends its shard in one read_error; the other shards are read; a changed
    file changes its shard's fingerprint only."""
    monkeypatch.setattr(hf_reader, "_DIRECT", direct)
    hf_reader._resolve.cache_clear()
    docs = corpus_documents([CORPUS / "wikipedia/Wikipedia_Json2conll", CORPUS / "wikipedia/zhwiki"])
    records = [{"text": t} for t in docs] + [{"text": ""}, {"text": "last one"}]
    files = write_jsonl_dir(tmp_path / "ds", records, 7)
    spec = f"hf:{tmp_path / 'ds'}"
    srcs = expand_inputs([spec, spec])  # listed once
    assert [s.path for s in srcs] == [f"{spec}[shard {i} of 7]" for i in range(7)]
    assert [(s.format, s.file, s.size) for s in srcs] == [("hf", str(f), f.stat().st_size) for f in files]
    shards = [it for s in srcs for it in iter_documents(s, ReadOptions())]
    direct_items = [it for f in files for it in iter_documents(expand_inputs([str(f)])[0], ReadOptions())]
    assert shards == direct_items  # jsonl has no blank lines here: row = line
    assert [(k, t) for k, t, _ in hf_reader.read(spec, ReadOptions())] == [(k, t) for k, t, _ in shards]
    assert [k for k, _, _ in shards].count(DOC) == len(docs) + 1 and shards[-2][1] == "empty"
    assert shards[0][2] == f"{files[0]}:1" and shards[-1][2] == f"{files[-1]}:{len(files[-1].read_text().splitlines())}"

    prints = [fingerprint(s) for s in srcs]
    lines = files[3].read_bytes().splitlines(keepends=True)
    files[3].write_bytes(lines[0] + b"{oops\n" + b"".join(lines[1:]))
    hf_reader._resolve.cache_clear()
    srcs2 = expand_inputs([spec])
    assert [fingerprint(s) for s in srcs2] != prints and [fingerprint(s) for s in srcs2[:3]] == prints[:3]
    # The json builder parses a file in blocks: the error loses the block (here the whole small file).
    (item,) = iter_documents(srcs2[3], ReadOptions())
    assert item[:2] == (SKIP, "read_error") and item[2].startswith(f"{files[3]}:1 (ArrowInvalid: JSON parse error")
    assert [it for s in srcs2[4:] for it in iter_documents(s, ReadOptions())] == \
        [it for s in srcs[4:] for it in iter_documents(s, ReadOptions())]


def test_hf_single_shard_and_bad_specs(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one/data.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    spec = f"hf:{tmp_path / 'one'}"
    (src,) = expand_inputs([spec + "@train"])
    assert (src.path, src.file) == (spec + "@train", str(tmp_path / "one/data.jsonl"))
    assert list(iter_documents(src, ReadOptions())) == [
        (DOC, "alpha", f"{tmp_path / 'one/data.jsonl'}:1"), (DOC, "beta", f"{tmp_path / 'one/data.jsonl'}:2")]
    for bad, message in [
        ("hf:", "no dataset name"),
        ("hf::cfg@train", "no dataset name"),
        (spec + "@", "empty split"),
        (spec + "@validation", "cannot open the dataset"),
        (f"hf:{tmp_path / 'missing'}", "cannot open the dataset"),
        (spec + "[shard 0 of 1]", "name a whole dataset"),
    ]:
        with pytest.raises(InputError, match=message) as e:
            expand_inputs([bad])
        assert str(e.value).startswith(bad + ":")


def _read_in_ranges(path, unit: int, **opts) -> list:
    """Items of every byte range of ``unit`` bytes, in order, with line numbers made absolute from the
    ranges' line counts (what the pipeline does for the manifest)."""
    (src,) = expand_inputs([str(path)])
    out, base = [], 0
    for start in range(0, max(src.size, 1), unit):
        rng = ReadRange(start, min(start + unit, src.size))
        for kind, text, loc in iter_documents(src, ReadOptions(**opts), rng):
            p, line = loc.rsplit(":", 1)
            out.append((kind, text, f"{p}:{base + int(line)}"))
        base += rng.lines
    return out


def test_byte_ranges_read_exactly_the_whole_file(tmp_path):
    """Any split into byte ranges yields the whole file's items, locations included: real JSON lines and
    WikiExtractor files plus crafted edge cases (text outside documents, a '</doc>' inside nothing,
    invalid UTF-8, blank and oversized lines, a document longer than several ranges, CRLF, BOM)."""
    wiki = (SAMPLE / "wikipedia/wiki_00").read_bytes()
    crafted = tmp_path / "crafted"
    crafted.write_bytes(
        b"\xef\xbb\xbf<doc id=\"1\" title=\"A\">\r\nA\r\n\r\nfirst body\r\n</doc>\r\nstray text\n</doc>\n"
        + b"<doc id=\"2\">\nB\n" + b"long line " * 300 + b"\n" + b"x" * 3000 + b"\n</doc>\n"
        + b"<doc id=\"3\">\nC\ncaf\xe9\n</doc>\n<doc id=\"4\">\nD\nbody\n</doc>\n" + wiki[:5000]
        + b"<doc id=\"5\">\nE\nunterminated\n")
    jsonl = tmp_path / "crafted.jsonl"
    jsonl.write_bytes((CORPUS / "wikipedia/Wikipedia_Json2conll/AA/wiki_00").read_bytes()[:60000]
                      + b'\n{bad json\n\n{"text": "caf\xe9"}\n' + b'{"text": "' + b"y" * 5000 + b'"}\n'
                      + b'{"text": "last, no newline"}')
    cases = [(SAMPLE / "wikipedia/wiki_00", {}), (crafted, {"max_line_bytes": 2000}),
             (jsonl, {"max_line_bytes": 2000}), (CORPUS / "wikipedia/Wikipedia_Json2conll/AA/wiki_00", {})]
    for path, opts in cases:
        (src,) = expand_inputs([str(path)])
        whole = list(iter_documents(src, ReadOptions(**opts)))
        assert len(whole) > 5
        for unit in (5, 97, 1000, 4096, 65536, src.size, src.size + 1):
            if unit < 50 and src.size > 50_000:
                continue  # thousands of ranges each scanning to a boundary: slow, and no new case
            assert _read_in_ranges(path, unit, **opts) == whole, (path, unit)
    (src,) = expand_inputs([str(crafted)])
    kinds = {t if k == SKIP else k for k, t, _ in iter_documents(src, ReadOptions(max_line_bytes=2000))}
    assert {"text_outside_doc", "invalid_utf8", "line_too_long", "unterminated_doc", DOC} <= kinds


def test_invalid_utf8_after_streamed_pieces_skips_the_document(tmp_path):
    """A document streamed in PART pieces whose later line is not UTF-8 ends in a SKIP, not a LAST:
    the consumer drops what it wrote of it, so nothing is silently truncated."""
    book = (SAMPLE / "books/pg1952.txt").read_bytes()
    (tmp_path / "bad.txt").write_bytes(book + b"\ncaf\xe9\n" + book)
    _, items = read_all(tmp_path / "bad.txt", max_doc_bytes=5000)
    kinds = [k for k, _, _ in items]
    assert kinds[:-1] == [PART] * (len(kinds) - 1) and len(kinds) > 2
    assert items[-1][0] == SKIP and items[-1][1] == "invalid_utf8"
    bad_line = (book + b"\ncaf").count(b"\n") + 1
    assert items[-1][2].endswith(f":{bad_line}")


def _line_items(src, opts):
    """The line readers' items (the reference the block readers must reproduce)."""
    reader = text_reader if src.format == "text" else wikidoc_reader
    return list(reader.read_lines(src.path, opts))


@pytest.mark.parametrize("block_bytes", [1 << 20, 4096, 61])
def test_block_readers_match_line_readers(tmp_path, monkeypatch, block_bytes):
    """Uncompressed text and WikiExtractor files are read in blocks; the items must be exactly the line
    readers' (same PART cuts, locations and skip reasons), on every such file of the test corpora and
    on crafted edge cases, with blocks small enough that lines and documents straddle them."""
    monkeypatch.setattr(reader_lines, "BLOCK_BYTES", block_bytes)
    crafted = {
        "crlf_bom.txt": b"\xef\xbb\xbfline one\r\nline two\r\r\n\r\nlast line without newline\r",
        "bad_utf8.txt": b"good\n" * 40 + b"bad \xff byte\n" + b"more\n" * 40,
        "long_line.txt": b"ok\n" + b"x" * 300 + b"\nafter\n",
        "long_last.txt": b"ok\n" + b"y" * 300,
        "docs.wiki": (b"<doc id=1 title=a>\r\nA\r\n\r\nbody one\r\n</doc>  \r\n\n"
                      b"stray text\n<doc id=2>\nB\n</doc>\n"  # title only: empty
                      b"<doc id=3>\nC\nbad \xc3 utf8\nrest\n</doc>\n"
                      b"<doc id=4>\nD\n" + b"z" * 300 + b"\nafter the long line\n</doc>\n"
                      b"<doc id=5>\nE\n" + b"words and more words\n" * 30 + b"</doc>\n"
                      b"<doc id=7>\nG\ntext with </doc> inside\n  </doc>\n</doc>x\nmore\n</doc>\t\x0c\n"
                      b"<doc id=6>\nF\nno end"),
    }
    for name, data in crafted.items():
        (tmp_path / name).write_bytes(data)
    sources = [s for s in expand_inputs([str(CORPUS / "books"), str(CORPUS / "wikipedia"), str(SAMPLE), str(tmp_path)])
               if s.format in ("text", "wikidoc") and not s.path.endswith((".gz", ".zst"))]
    fmt = {"docs.wiki": "wikidoc"}
    sources = [Source(s.path, fmt.get(os.path.basename(s.path), s.format), s.size) for s in sources]
    assert len(sources) == 6 + 5 + 5  # test corpus, sample corpus (with its README), crafted
    small = block_bytes < 1000  # (the block readers need max_line_bytes >= the block size)
    for src in sources:
        for opts in (ReadOptions(max_line_bytes=max(block_bytes, 200 if small else block_bytes)),
                     ReadOptions(max_doc_bytes=700, max_line_bytes=max(block_bytes, 256))):
            blocks = list(iter_documents(src, opts))
            assert blocks == _line_items(src, opts), (src.path, opts)
    reasons = {t for s in sources for k, t, _ in iter_documents(s, ReadOptions(max_line_bytes=256))
               if k == SKIP} if small else set()
    if small:
        assert {"invalid_utf8", "line_too_long", "text_outside_doc", "empty", "unterminated_doc"} <= reasons


@pytest.mark.parametrize("block_bytes", [1 << 20, 61])
def test_wikidoc_without_titles_same_on_both_paths(tmp_path, monkeypatch, block_bytes):
    """--no-titles (``ReadOptions(titles=False)``): a WikiExtractor document without its title line (the first
    line that is not blank), the same items on the block and line paths; a document that was only its title
    is ``empty`` (kept as "" with --keep-empty), and every other document is its titled text less the title."""
    monkeypatch.setattr(reader_lines, "BLOCK_BYTES", block_bytes)
    crafted = (b"<doc id=1>\nTitle only\n</doc>\n"
               b"<doc id=2>\nOne line\r\nThe whole article.\n</doc>\n"
               b"<doc id=3>\n\n\nLate title\n\nbody after blank lines\n</doc>\n"
               b"<doc id=4>\nD\n\n" + b"words and more words\n" * 30 + b"</doc>\n"
               b"<doc id=5>\nbad \xc3 title\nbody\n</doc>\n"
               b"<doc id=6>\nF\n\n\n</doc>\n"
               b"<doc id=7>\n</doc>\n")
    (tmp_path / "docs.wiki").write_bytes(crafted)
    sources = [Source(str(tmp_path / "docs.wiki"), "wikidoc", len(crafted)),
               *(s for s in expand_inputs([str(CORPUS / "wikipedia"), str(SAMPLE / "wikipedia")])
                 if s.format == "wikidoc")]
    assert len(sources) == 4
    big = max(block_bytes, 256)
    for src in sources:
        for opts in (ReadOptions(titles=False, max_line_bytes=big), ReadOptions(titles=False, keep_empty=True,
                     max_line_bytes=big), ReadOptions(titles=False, max_doc_bytes=40, max_line_bytes=big)):
            assert list(iter_documents(src, opts)) == _line_items(src, opts), (src.path, opts)
        titled, untitled = (list(iter_documents(src, ReadOptions(titles=t, max_line_bytes=big))) for t in (True, False))
        assert len(titled) == len(untitled)
        for (kind, text, loc), got in zip(titled, untitled, strict=True):
            rest = text.partition("\n")[2].strip("\n") if kind == DOC else ""
            want = (DOC, rest, loc) if rest.strip() else (SKIP, "empty", loc) if kind == DOC else (kind, text, loc)
            assert got == want, (src.path, loc)
    wiki = str(tmp_path / "docs.wiki")
    items = list(iter_documents(sources[0], ReadOptions(titles=False, max_line_bytes=big)))
    assert items == [(SKIP, "empty", f"{wiki}:1"), (DOC, "The whole article.", f"{wiki}:4"),
                     (DOC, "body after blank lines", f"{wiki}:8"),
                     (DOC, "\n".join(["words and more words"] * 30), f"{wiki}:15"),
                     (SKIP, "invalid_utf8", f"{wiki}:50"), (SKIP, "empty", f"{wiki}:53"), (SKIP, "empty", f"{wiki}:58")]
    kept = list(iter_documents(sources[0], ReadOptions(titles=False, keep_empty=True, max_line_bytes=big)))
    texts = ["", "The whole article.", "body after blank lines", items[3][1], "", ""]
    assert [t for k, t, _ in kept if k == DOC] == texts

"""Raw MediaWiki dumps read by preprocess (readers/mediawiki.py) on a small real multistream dump with its
real-format index (tests/data/mediawiki: 135 English Wikipedia pages in 27 bz2 streams): articles as plain
text, redirects and other namespaces counted, ranges of whole streams that tile the dump for any cut, the
same bytes for any worker/rank count, kill -9 resume, a bad index refused, damaged streams counted, and
deduplication re-reading pages by their file:PAGEID locations."""

from __future__ import annotations

import bz2
import functools
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data_pipeline.cli import build_parser
from lmforge.data_pipeline.manifest import load_manifest
from lmforge.data_pipeline.readers import (
    DOC,
    SKIP,
    ReadOptions,
    ReadRange,
    Source,
    StreamPool,
    expand_inputs,
    iter_documents,
    mediawiki,
    split_ranges,
)
from lmforge.data_pipeline.readers.mediawiki import wikitext_to_text
from lmforge.data_pipeline.tools import verify
from tests.data_pipeline.test_preprocess import _kill_9_and_resume, same_tree
from tests.helpers.paths import BIN, ROOT, TEST_DATA
from tests.helpers.process import child_env, run_cmd

PY = sys.executable
DATA = TEST_DATA / "mediawiki"
DUMP = DATA / "enwiki-sample-pages-articles-multistream.xml.bz2"
INDEX = DATA / "enwiki-sample-pages-articles-multistream-index.txt.bz2"
ARTICLES, REDIRECTS, OTHER_NS = 35, 99, 1  # the 135 pages (README.md)
STREAMS = 29  # bz2 streams: the <siteinfo> header, 27 of pages (the index's offsets), </mediawiki>


def _source(path: Path = DUMP, index: Path | None = INDEX) -> Source:
    return Source(str(path), "mediawiki", path.stat().st_size, str(index) if index else "")


def _items(src: Source, rng: ReadRange | None = None, pool: StreamPool | None = None) -> list[tuple[int, str, str]]:
    return list(iter_documents(src, ReadOptions(), rng, pool))


@functools.cache
def _whole() -> list[tuple[int, str, str]]:
    """The items of the committed dump read whole (read once: wikitext parsing is most of the time)."""
    return _items(_source())


def _index_lines(index: Path = INDEX) -> list[tuple[int, int, str]]:
    rows = []
    for line in bz2.decompress(index.read_bytes()).decode().splitlines():
        off, pid, title = line.split(":", 2)
        rows.append((int(off), int(pid), title))
    return rows


def _rebuild(tmp: Path, edit_stream, name: str = "dump") -> tuple[Path, Path]:
    """A copy of the dump whose stream holding page 330 (Actrius) is replaced by ``edit_stream(compressed)``,
    with its index rewritten for the new offsets (Wikimedia's format)."""
    data = DUMP.read_bytes()
    rows = _index_lines()
    starts = sorted({0, *(o for o, _, _ in rows)})
    streams = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)])]
    target = next(o for o, p, _ in rows if p == 330)
    k = starts.index(target)
    streams[k] = edit_stream(streams[k])
    new_starts = [sum(map(len, streams[:i])) for i in range(len(streams))]
    moved = dict(zip(starts, new_starts))
    dump, index = tmp / f"{name}-multistream.xml.bz2", tmp / f"{name}-multistream-index.txt.bz2"
    dump.write_bytes(b"".join(streams))
    index.write_bytes(bz2.compress("".join(f"{moved[o]}:{p}:{t}\n" for o, p, t in rows).encode()))
    return dump, index


def _stream_pages(pid: int) -> list[int]:
    rows = _index_lines()
    off = next(o for o, p, _ in rows if p == pid)
    return [p for o, p, _ in rows if o == off]


# --------------------------------------------------------------------------------------------------
# The reader


def test_articles_as_plain_text_and_skips_by_reason():
    items = _whole()
    kinds = Counter(text if kind == SKIP else "doc" for kind, text, _ in items)
    assert kinds == {"doc": ARTICLES, "redirect": REDIRECTS, "namespace": OTHER_NS}
    assert len(items) == len(_index_lines())  # every page is an item
    assert [int(loc.rpartition(":")[2]) for _, _, loc in items] == [p for _, p, _ in _index_lines()]
    docs = {int(loc.rpartition(":")[2]): text for kind, text, loc in items if kind == DOC}
    assert docs[330].startswith("Actrius\n\nActresses (Catalan: Actrius) is a 1997 Catalan language Spanish drama "
                                "film produced and directed by Ventura Pons and based on the award-winning stage "
                                "play E.R. by Josep Maria Benet i Jornet.")
    assert "\nCast\nNúria Espert as Glòria Marc\n" in docs[330]  # a heading and a list, as lines
    assert docs[772].startswith("Ampere\n\nThe ampere (SI unit symbol: A), often shortened to \"amp\", is the SI "
                                "unit of electric current")
    for text in docs.values():
        for markup in ("{{", "}}", "[[", "]]", "<ref", "</", "{|", "''", "&nbsp;", "Category:", "thumb|"):
            assert markup not in text
    # the redirect AccessibleComputing (page 10) and the Wikipedia: page (724, a redirect too: ns first)
    assert items[0] == (SKIP, "redirect", f"{DUMP}:10")
    assert (SKIP, "namespace", f"{DUMP}:724") in items


def test_wikitext_to_text_keeps_prose_drops_markup():
    wikitext = ("{{Infobox film|name=X}}\n'''X''' is a [[film]] by [[Jane Doe|Doe]]<ref>{{cite web|url=u}}</ref> "
                "({{lang-fr|x}}) [http://example.org label] &amp; more.__NOTOC__\n\n== Plot ==\n* one\n* two\n"
                "{| class=\"wikitable\"\n|-\n| cell\n|}\n[[File:X.jpg|thumb|A caption]]\n<!-- comment -->\n"
                "[[Category:Films]]\n[[:Category:Films|films list]]")
    assert wikitext_to_text(wikitext) == "X is a film by Doe label & more.\n\nPlot\none\ntwo\n\nfilms list"


@pytest.mark.parametrize("unit_bytes", [1, 20000])
def test_stream_ranges_tile_the_dump(unit_bytes):
    """split_ranges cuts at stream starts the index lists; the ranges' items, in order, are the whole dump's."""
    src = _source()
    whole = _whole()
    ranges = split_ranges(src, unit_bytes)
    assert ranges is not None and ranges[0][0] == 0 and ranges[-1][1] == src.size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    starts = {o for o, _, _ in _index_lines()}
    assert all(lo in starts for lo, _ in ranges[1:])
    if unit_bytes == 1:
        assert len(ranges) == len(starts)  # a stream per range (the header stream with the first)
    parts = []
    for lo, hi in ranges:
        rng = ReadRange(lo, hi)
        parts += _items(src, rng)
        assert rng.absolute
    assert parts == whole


def test_any_byte_cut_owns_the_streams_starting_in_it():
    """Cut anywhere (a wrong index): a range owns the streams that start in it, read to their end."""
    src = _source()
    whole = _whole()
    rnd = random.Random(0)
    for _ in range(2):
        cuts = sorted(rnd.sample(range(1, src.size), 6))
        parts = []
        for lo, hi in zip([0, *cuts], [*cuts, src.size]):
            parts += _items(src, ReadRange(lo, hi))
        assert parts == whole


def test_without_index_and_uncompressed_the_same_pages(tmp_path):
    with_index = _whole()
    assert _items(_source(index=None)) == with_index  # read sequentially, stream after stream
    xml = tmp_path / "dump.xml"
    xml.write_bytes(bz2.decompress(DUMP.read_bytes()))  # the concatenated streams: one XML document
    plain = _items(Source(str(xml), "mediawiki", xml.stat().st_size))
    assert [(k, t, loc.replace(str(xml), str(DUMP))) for k, t, loc in plain] == with_index


def test_expansion_finds_the_index_and_detects_the_format(tmp_path):
    d = tmp_path / "dumps"
    d.mkdir()
    (d / DUMP.name).symlink_to(DUMP)
    (d / INDEX.name).symlink_to(INDEX)
    xml = d / "other.xml"
    xml.write_bytes(b'<?xml version="1.0"?>\n' + bz2.decompress(DUMP.read_bytes()))
    sources = expand_inputs([str(d)])
    assert [(Path(s.path).name, s.format, Path(s.file).name if s.file else "") for s in sources] == [
        (DUMP.name, "mediawiki", INDEX.name), ("other.xml", "mediawiki", "")]  # the index is no input
    assert sum(k == DOC for k, _, _ in _items(sources[1])) == ARTICLES
    [alone] = expand_inputs([str(DUMP)], wiki_indexes=[str(INDEX)])
    assert alone.file == str(INDEX)


def _damage_bytes(stream: bytes) -> bytes:
    b = bytearray(stream)
    for i in range(len(b) // 2, len(b) // 2 + 8):
        b[i] ^= 0x55
    return bytes(b)


def _damage_xml(stream: bytes) -> bytes:
    return bz2.compress(bz2.decompress(stream).replace(b"</title>", b"</titel>", 1), 9)


@pytest.mark.parametrize("damage,reason", [(_damage_bytes, "invalid_bz2"), (_damage_xml, "invalid_xml")])
def test_a_damaged_stream_counts_its_pages_and_the_rest_is_read(tmp_path, damage, reason):
    dump, index = _rebuild(tmp_path, damage)
    lost = _stream_pages(330)
    items = _items(_source(dump, index))
    assert [(k, t, loc) for k, t, loc in items if t == reason] == [(SKIP, reason, f"{dump}:{p}") for p in lost]
    good = {loc.rpartition(":")[2]: (k, t) for k, t, loc in _whole()}
    mine = {loc.rpartition(":")[2]: (k, t) for k, t, loc in items if t != reason}
    assert mine == {p: v for p, v in good.items() if int(p) not in lost}  # every other page as before
    # without the index: the stream is one skip naming its offset
    items = _items(_source(dump, None))
    bad = [loc for k, t, loc in items if t == reason]
    assert len(bad) == 1 and "stream at byte" in bad[0]
    assert {loc.rpartition(":")[2] for k, t, loc in items if t != reason} == set(mine)


# --------------------------------------------------------------------------------------------------
# Streams converted on processes (StreamPool): the same items


@pytest.fixture(scope="module")
def pool():
    with StreamPool(2) as p:
        yield p


def _counts(pool: StreamPool) -> tuple[int, int]:
    return pool.converted, pool.here


def test_pool_reads_the_same_items_for_any_range(pool):
    src = _source()
    before = _counts(pool)
    assert _items(src, pool=pool) == _whole()
    assert _counts(pool) == (before[0] + STREAMS, before[1])  # every stream converted by the processes
    for ranges in (split_ranges(src, 1), split_ranges(src, 20000)):
        assert [it for lo, hi in ranges for it in _items(src, ReadRange(lo, hi), pool)] == _whole()
    rnd = random.Random(1)
    cuts = sorted(rnd.sample(range(1, src.size), 6))  # anywhere: a range starting inside a stream
    assert [it for lo, hi in zip([0, *cuts], [*cuts, src.size]) for it in _items(src, ReadRange(lo, hi), pool)
            ] == _whole()
    assert _items(_source(index=None), pool=pool) == _whole()  # no index: the scan finds the streams


@pytest.mark.parametrize("damage", [_damage_bytes, _damage_xml])
def test_pool_counts_a_damaged_stream_the_same(pool, tmp_path, damage):
    dump, index = _rebuild(tmp_path, damage)
    for idx in (index, None):
        src = _source(dump, idx)
        assert _items(src, pool=pool) == _items(src)
    # a stream cut off at the end of the file (truncated_compressed)
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(DUMP.read_bytes()[: DUMP.stat().st_size - 3000])
    src = Source(str(cut), "mediawiki", cut.stat().st_size)
    assert _items(src, pool=pool) == _items(src)
    assert any(t == "truncated_compressed" for _, t, _ in _items(src, pool=pool))


def test_pool_reads_big_and_unpredicted_streams_here(pool, tmp_path, monkeypatch):
    """A stream the processes do not take is read in the main process: with no other header within
    _BIG_STREAM bytes (a single-stream file), at a header the scan did not predict, or holding _HOLD_CHARS
    of text before its end; the items are the same."""
    single = tmp_path / "single.xml.bz2"
    single.write_bytes(bz2.compress(bz2.decompress(DUMP.read_bytes())))  # one stream
    src = Source(str(single), "mediawiki", single.stat().st_size)
    converted, here = _counts(pool)
    plain = [(k, t, loc.replace(str(single), str(DUMP))) for k, t, loc in _items(src, pool=pool)]
    assert plain == _whole() and _counts(pool) == (converted + 1, here)
    monkeypatch.setattr(mediawiki, "_BIG_STREAM", 1000)  # (read by the main process's scan)
    assert _items(src, pool=pool) == _items(src) and _counts(pool) == (converted + 1, here + 1)
    assert _items(_source(), pool=pool) == _whole()
    monkeypatch.undo()
    # the scan's guesses passed by, and a position that is no stream the scan found
    ahead = mediawiki._Ahead(pool, str(DUMP), DUMP.stat().st_size, DUMP.stat().st_size, ReadOptions(), str(INDEX))
    try:
        starts = sorted({o for o, _, _ in _index_lines()})
        assert ahead.take(0) == ([], starts[0])  # the <siteinfo> stream; starts[0], ... submitted ahead
        items, nxt = ahead.take(starts[3])  # starts[0..2] dropped
        assert nxt == starts[4] and items == [it for it in _whole() if int(it[2].rpartition(":")[2]) in
                                              {p for o, p, _ in _index_lines() if o == starts[3]}]
        assert ahead.take(starts[4] + 1) is None and len(ahead.queue) > 0
    finally:
        ahead.close()
    # a stream holding _HOLD_CHARS of text: the processes give it up (the patch is theirs too: forked after it)
    monkeypatch.setattr(mediawiki, "_HOLD_CHARS", 2000)
    with StreamPool(2) as small:
        assert _items(_source(), pool=small) == _whole()
        assert small.here > 0 and small.converted > 0 and small.here + small.converted == STREAMS


def test_pool_processes_die_with_the_main_process():
    """kill -9 of the main process leaves no conversion process waiting for work (PR_SET_PDEATHSIG)."""
    script = ("import time\nfrom lmforge.data_pipeline.readers import StreamPool\n"
              "p = StreamPool(2)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([PY, "-c", script], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        kids = [int(k) for k in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(kids) >= 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.02)
    assert not any(_alive(k) for k in kids)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_help_explains_wiki_index():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["preprocess"].format_help().split())
    assert "--wiki-index PATH" in help_text and "multistream-index.txt.bz2" in help_text
    assert "without one it is one unit" in help_text
    assert "--titles, --no-titles" in help_text
    assert "other formats (JSON lines, text, parquet, hf:) ignore it" in help_text


# --------------------------------------------------------------------------------------------------
# preprocess end to end


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mwtok")
    run_cmd([PY, "-m", "lmforge.data_pipeline", "train-tokenizer", "--input", DUMP, "--vocab-size", "800",
             "--output", out, "--threads", "1"])
    return out / "tokenizer.model"


def preprocess(tok: Path, out: Path, *extra, inputs=(DUMP,), check=True, launcher=()) -> subprocess.CompletedProcess:
    return run_cmd([*launcher, PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", *inputs, "--tokenizer", tok,
                    "--output", out, "--no-progress", "--unit-bytes", "20k", "--max-shard-bytes", "100k",
                    "--valid-fraction", "0.1", *extra], check=check)


@pytest.fixture(scope="module")
def clean(tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mwclean") / "out"
    preprocess(tok, out, "--workers", "1")
    return out


def test_preprocess_counts_and_byte_identical_for_workers_and_ranks(tok, clean, tmp_path):
    m = load_manifest(clean)
    assert m["skipped"] == {"namespace": OTHER_NS, "redirect": REDIRECTS}
    assert m["records"] == {"read": 135, "written": ARTICLES, "skipped": REDIRECTS + OTHER_NS}
    assert m["sources"][0]["format"] == "mediawiki" and m["sources"][0]["file"] == str(INDEX)
    units = {p.name.split("_")[1] for p in (clean / "train").glob("shard_*.bin")}
    assert len(units) >= 4  # several units of whole streams
    assert verify(clean) == []
    p = preprocess(tok, tmp_path / "w2", "--workers", "2")
    assert f"[rank 0] mediawiki: {STREAMS} bz2 stream(s) converted on 2 processes\n" in p.stderr, p.stderr
    same_tree(clean, tmp_path / "w2")
    preprocess(tok, tmp_path / "mpi", "--workers", "1", launcher=[BIN / "mpirun", "-n", "2"])
    same_tree(clean, tmp_path / "mpi")


def test_bad_index_exits_2_with_one_error_line(tok, tmp_path):
    rows = _index_lines()
    cases = {
        "decreasing": [*rows[:20], (rows[5][0], 999999, "Back"), *rows[20:]],
        "past_end": [*rows, (DUMP.stat().st_size + 10, 999999, "Beyond")],
        "garbage": [*rows[:3], None, *rows[3:]],
    }
    expected = {"decreasing": ":21: stream offset", "past_end": f":{len(rows) + 1}: stream offset",
                "garbage": ":4: not an index line"}
    for name, lines in cases.items():
        index = tmp_path / f"{name}-index.txt.bz2"
        text = "".join("oops\n" if r is None else f"{r[0]}:{r[1]}:{r[2]}\n" for r in lines)
        index.write_bytes(bz2.compress(text.encode()))
        p = preprocess(tok, tmp_path / name, "--wiki-index", index, check=False)
        assert (p.returncode, p.stderr.count("error: "), "Traceback" in p.stderr) == (2, 1, False), p.stderr
        assert f"{index}{expected[name]}" in p.stderr, p.stderr
    p = preprocess(tok, tmp_path / "two", "--wiki-index", INDEX, INDEX, check=False)
    assert p.returncode == 2 and "names 2 index(es) for 1" in p.stderr


def test_damaged_stream_in_preprocess(tok, tmp_path):
    dump, index = _rebuild(tmp_path, _damage_bytes)
    p = preprocess(tok, tmp_path / "out", "--workers", "2", inputs=[dump])  # the index beside it
    assert f"mediawiki: {STREAMS} bz2 stream(s) converted on 2 processes\n" in p.stderr, p.stderr
    m = load_manifest(tmp_path / "out")
    lost = _stream_pages(330)
    assert m["skipped"]["invalid_bz2"] == len(lost)
    articles = {int(loc.rpartition(":")[2]) for k, _, loc in _whole() if k == DOC}
    assert m["records"]["read"] == 135 and m["records"]["written"] == ARTICLES - len(articles & set(lost))
    assert articles & set(lost) == {309, 330}  # An American in Paris, Actrius
    p = preprocess(tok, tmp_path / "w1", "--workers", "1", inputs=[dump])
    assert "converted on" not in p.stderr
    same_tree(tmp_path / "out", tmp_path / "w1")


def _copies(tmp_path: Path) -> tuple[Path, list[tuple[int, str]]]:
    """A <doc> file holding copies of some of the dump's articles (one exact, three with a word changed)."""
    docs = {int(loc.rpartition(":")[2]): t for k, t, loc in _whole() if k == DOC}
    copies = [(330, docs[330]), (332, docs[332].replace("illustrated", "drawn", 1)),
              (772, docs[772].replace("ampere", "Ampere", 1)), (344, docs[344].replace("pioneering", "early", 1))]
    wiki = tmp_path / "wiki_00"
    wiki.write_text("".join(f'<doc id="{p}" url="?curid={p}" title="x">\n{t}\n</doc>\n' for p, t in copies))
    return wiki, copies


def test_dedup_rereads_pages_by_location(tok, clean, tmp_path):
    """A <doc> file after the dump holding copies of some of its articles (one exact, three with a word
    changed): they are removed as duplicates of the dump's pages, found again at file:PAGEID."""
    wiki, copies = _copies(tmp_path)
    out = tmp_path / "out"
    preprocess(tok, out, "--dedup", "exact,minhash", inputs=[DUMP, wiki])
    m = load_manifest(out)
    assert m["skipped"]["duplicate-exact"] == 1 and m["skipped"]["duplicate-near"] == 3
    rows = [line.split("\t") for f in sorted((out / "duplicates").glob("*.tsv")) for line in f.read_text().splitlines()]
    assert sorted(r[2] for r in rows) == sorted(f"{DUMP}:{p}" for p, _ in copies)
    assert all(r[1].startswith(f"{wiki}:") for r in rows)


def test_dedup_of_one_unit_converts_the_dump_on_the_workers(tok, tmp_path):
    """One unit (fewer than the workers): deduplication's scan reads the dump in the main process, and so does
    its near-duplicate check's re-read of the dump and the <doc> copies, the dump's streams converted on the
    workers (StreamPool): the same output as with one worker."""
    wiki, _ = _copies(tmp_path)
    for inputs in ([DUMP], [DUMP, wiki]):  # the scan of a one-source unit; the re-read of a one-unit job
        outs = [tmp_path / f"{len(inputs)}w{w}" for w in (1, 2)]
        for w, out in zip((1, 2), outs):
            preprocess(tok, out, "--dedup", "exact,minhash", "--unit-bytes", "1M", "--workers", str(w), inputs=inputs)
        same_tree(*outs)
    m = load_manifest(outs[1])
    assert m["skipped"]["duplicate-exact"] == 1 and m["skipped"]["duplicate-near"] == 3


def test_no_titles_gives_the_text_alone_and_dedup_rereads_it(tok, tmp_path):
    """--no-titles: a page is its text alone (the same pages, skips and locations), and a <doc> file read the
    same way drops its title line, so the dump's pages and <doc> copies of their text under other titles are
    duplicates: removed (one exact, three near), each with the true Jaccard of the untitled texts (deduplication
    re-reads both without their titles, as the scan read them)."""
    from lmforge.data_pipeline.preprocess.dedup import jaccard, shingle_hashes

    untitled = list(iter_documents(_source(), ReadOptions(titles=False)))
    assert [(k, loc) for k, _, loc in untitled] == [(k, loc) for k, _, loc in _whole()]
    for (kind, titled, _), (_, text, _) in zip(_whole(), untitled, strict=True):
        if kind == DOC:
            assert titled.partition("\n\n")[2] == text
    docs = {int(loc.rpartition(":")[2]): t for k, t, loc in untitled if k == DOC}
    assert docs[330].startswith("Actresses (Catalan: Actrius) is a 1997 Catalan language Spanish drama film")
    copies = {330: docs[330], 332: docs[332].replace("illustrated", "drawn", 1),
              772: docs[772].replace("ampere", "Ampere", 1), 344: docs[344].replace("pioneering", "early", 1)}
    wiki = tmp_path / "wiki_00"
    wiki.write_text("".join(f'<doc id="{p}" url="?curid={p}" title="x">\nAnother title {p}\n\n{t}\n</doc>\n'
                            for p, t in copies.items()))
    out = tmp_path / "out"
    preprocess(tok, out, "--no-titles", "--dedup", "exact,minhash", inputs=[DUMP, wiki])
    m = load_manifest(out)
    assert m["settings"]["titles"] is False
    assert m["skipped"]["duplicate-exact"] == 1 and m["skipped"]["duplicate-near"] == 3
    rows = [line.split("\t") for f in sorted((out / "duplicates").glob("*.tsv")) for line in f.read_text().splitlines()]
    measured = {int(r[2].rpartition(":")[2]): r[3] for r in rows}
    titled = {int(loc.rpartition(":")[2]): t for k, t, loc in _whole() if k == DOC}
    for p, copy in copies.items():
        want = jaccard(shingle_hashes(docs[p], 5), shingle_hashes(copy, 5))
        with_titles = jaccard(shingle_hashes(titled[p], 5), shingle_hashes(f"Another title {p}\n\n{copy}", 5))
        assert measured[p] == f"{want:.4f}" and (p == 330 or f"{with_titles:.4f}" != measured[p]), p


@pytest.mark.slow
def test_kill_9_and_resume_is_byte_identical(tok, tmp_path):
    """kill -9 of the whole process group after some of the dump's units (runs of bz2 streams, converted on
    the 2 workers' stream pool) finished, then the same command again: byte-identical to an uninterrupted run
    (test_preprocess's kill test, on the dump in 6 KB units)."""
    _kill_9_and_resume([DUMP], tok, tmp_path, unit_bytes="6k", max_shard_bytes="100k", valid_fraction="0.1",
                       trials=2, least=1)


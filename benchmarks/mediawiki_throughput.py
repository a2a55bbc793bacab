"""Reading a raw MediaWiki dump (``--format mediawiki``) against reading the same articles already extracted
to WikiExtractor ``<doc>`` files (``--format wikidoc``): pages/s, documents/s and MB/s of the readers alone
(one process, no tokenizer; but the rows of N processes and of ``preprocess``), best of ``--repeat`` runs.

Rows:

- ``bz2 only``: decompressing the dump (``bz2.decompress`` of the whole file), the floor of any dump reader;
- ``dump, no wikitext``: the mediawiki reader with the wikitext conversion replaced by the identity
  (decompression, XML parsing, page accounting);
- ``dump -> text``: the mediawiki reader as preprocess runs it (mwparserfromhell and the cleanup);
- ``dump -> text, N processes``: the same reader with its streams converted on a ``StreamPool`` of N processes
  (``--workers``, default 2: how ``preprocess --workers N`` reads a ``.bz2`` dump), the main process taking
  their items in order (the pool is started before the timing; its output is checked to be the same);
- ``<doc> files``: the wikidoc reader on the same articles extracted to ``<doc>`` format: WikiExtractor's own
  output of the dump when ``--wikiextractor DIR`` names a folder holding the ``wikiextractor`` package
  (``pip install --target DIR wikiextractor``), else the mediawiki reader's documents written as ``<doc>``
  blocks (same titles, same text);
- ``WikiExtractor``: with ``--wikiextractor``, its extraction of the dump (``--processes 1``), i.e. the step
  reading the dump directly saves;
- ``preprocess --workers N``: with ``--preprocess TOKENIZER``, ``python -m lmforge.data_pipeline preprocess`` of
  the dump end to end (start-up, reading, tokenizing, writing; one unit: ``--unit-bytes`` above the dump's size)
  for N = 1 and each ``--workers``, the outputs checked byte-identical. ``--copies K`` makes the dump K copies
  of itself one after the other (without an index: read as one unit), long enough for start-up not to count.

MB/s is of the input bytes (compressed for a dump). The dump is ``tests/data/mediawiki``'s sample (135 pages
in streams of 5), or with ``--source`` gensim's whole 206-page test dump (the wheel or sdist of gensim 4.4.0,
``pip download gensim==4.4.0 --no-deps``) re-cut by ``tests/data/mediawiki/make_sample.py`` into streams of
100 pages as Wikimedia writes them, or any ``--dump`` (with ``--wiki-index`` or the index beside it).

    python benchmarks/mediawiki_throughput.py [--source gensim-4.4.0-....whl] [--wikiextractor DIR] [--repeat 3]
        [--workers 2,4] [--preprocess TOKENIZER [--copies K]]
"""

from __future__ import annotations

import argparse
import bz2
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests/data/mediawiki/enwiki-sample-pages-articles-multistream.xml.bz2"


def best(repeat: int, fn):
    """(best seconds, fn's result)."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def read_all(src, opts, pool=None) -> tuple[int, int, int]:
    """(items, documents, UTF-8 bytes of the documents) of a source read whole (a dump's streams converted on
    ``pool``, a ``StreamPool``, when given)."""
    from lmforge.data_pipeline.readers import DOC, iter_documents

    items = docs = nbytes = 0
    for kind, text, _ in iter_documents(src, opts, pool=pool):
        items += 1
        if kind == DOC:
            docs += 1
            nbytes += len(text.encode("utf-8"))
    return items, docs, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", default=None, help=f"a multistream .xml.bz2 dump (default {SAMPLE.relative_to(ROOT)})")
    ap.add_argument("--wiki-index", default=None, help="its index (default: beside it)")
    ap.add_argument("--source", default=None, help="gensim 4.4.0's wheel/sdist: its whole test dump, streams of 100")
    ap.add_argument("--wikiextractor", default=None, metavar="DIR", help="a folder holding the wikiextractor package")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", default="2", help="process counts of the pooled rows, comma-separated (\"\": none)")
    ap.add_argument("--preprocess", default=None, metavar="TOKENIZER", help="also preprocess end to end with it")
    ap.add_argument("--copies", type=int, default=1, help="the dump repeated K times (no index)")
    a = ap.parse_args()
    workers = [int(w) for w in a.workers.split(",") if w.strip()]
    load = os.getloadavg()[0]

    from lmforge.data_pipeline.readers import ReadOptions, StreamPool, expand_inputs, mediawiki

    tmp = Path(tempfile.mkdtemp(prefix="mwbench"))
    dump = Path(a.dump) if a.dump else SAMPLE
    if a.source:
        subprocess.run([sys.executable, str(ROOT / "tests/data/mediawiki/make_sample.py"), a.source, str(tmp),
                        "--max-page-bytes", "0", "--pages-per-stream", "100"], check=True, stdout=subprocess.DEVNULL)
        dump = tmp / "enwiki-sample-pages-articles-multistream.xml.bz2"
    if a.copies > 1:
        data = dump.read_bytes()
        dump = tmp / f"copies{a.copies}.xml.bz2"
        dump.write_bytes(data * a.copies)
    [src] = expand_inputs([str(dump)], "mediawiki", wiki_indexes=[a.wiki_index] if a.wiki_index else ())
    opts = ReadOptions()
    size = src.size
    streams = len(mediawiki.stream_offsets(src.file, size)) if src.file else 0

    rows = []
    t, raw = best(a.repeat, lambda: len(bz2.decompress(dump.read_bytes())))
    rows.append(("bz2 only", t, None, None, size, raw))
    convert = mediawiki.wikitext_to_text
    mediawiki.wikitext_to_text = lambda text: text  # type: ignore[assignment]
    try:
        t, (pages, _, nbytes) = best(a.repeat, lambda: read_all(src, opts))
    finally:
        mediawiki.wikitext_to_text = convert
    rows.append(("dump, no wikitext", t, pages, None, size, nbytes))
    t, (pages, docs, nbytes) = best(a.repeat, lambda: read_all(src, opts))
    rows.append(("dump -> text", t, pages, docs, size, nbytes))
    for n in workers:
        with StreamPool(n) as pool:
            t, got = best(a.repeat, lambda: read_all(src, opts, pool))
        assert got == (pages, docs, nbytes), (n, got)
        rows.append((f"dump -> text, {n} process{'es' if n > 1 else ''}", t, pages, docs, size, nbytes))

    wiki_dir = tmp / "wikidoc"
    if a.wikiextractor:
        env = dict(os.environ, PYTHONPATH=f"{a.wikiextractor}:{os.environ.get('PYTHONPATH', '')}")
        cmd = [sys.executable, "-m", "wikiextractor.WikiExtractor", str(dump), "-o", str(wiki_dir), "--processes", "1",
               "-q"]
        t_extract, _ = best(a.repeat, lambda: subprocess.run(cmd, env=env, check=True, capture_output=True))
        doc_label = "<doc> files (WikiExtractor's)"
    else:
        from lmforge.data_pipeline.readers import DOC, iter_documents

        (wiki_dir / "AA").mkdir(parents=True)
        with open(wiki_dir / "AA" / "wiki_00", "w", encoding="utf-8") as f:
            for kind, text, loc in iter_documents(src, opts):
                if kind == DOC:
                    pid = loc.rpartition(":")[2]
                    title = text.split("\n", 1)[0]
                    f.write(f'<doc id="{pid}" url="?curid={pid}" title="{title}">\n{text}\n</doc>\n')
        doc_label = "<doc> files (this reader's text)"
    doc_sources = expand_inputs([str(wiki_dir)], "wikidoc")
    doc_bytes = sum(s.size for s in doc_sources)

    def read_docs() -> tuple[int, int, int]:
        totals = [read_all(s, opts) for s in doc_sources]
        return tuple(sum(x) for x in zip(*totals))  # type: ignore[return-value]

    t, (items, docs_w, nbytes_w) = best(a.repeat, read_docs)
    if a.wikiextractor:  # (the documents it wrote, as the wikidoc reader counts them)
        rows.append(("WikiExtractor (extract)", t_extract, pages, docs_w, size, nbytes_w))
    rows.append((doc_label, t, items, docs_w, doc_bytes, nbytes_w))

    if a.preprocess:
        outs = []
        for n in dict.fromkeys([1, *workers]):
            out = tmp / f"pre{n}"
            cmd = [sys.executable, "-m", "lmforge.data_pipeline", "preprocess", "--input", str(dump), "--tokenizer",
                   a.preprocess, "--output", str(out), "--no-progress", "--overwrite", "--workers", str(n),
                   "--unit-bytes", str(2 * size + (1 << 20))]
            if src.file:
                cmd += ["--wiki-index", src.file]
            t, _ = best(a.repeat, lambda cmd=cmd: subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True))
            rec = json.loads((out / "manifest.json").read_text())["records"]
            rows.append((f"preprocess --workers {n}", t, rec["read"], rec["written"], size, None))
            outs.append(out)
        names = sorted(f.relative_to(outs[0]) for f in outs[0].rglob("*") if f.is_file() and ".state" not in f.parts)
        for other in outs[1:]:
            assert all(filecmp.cmp(outs[0] / f, other / f, shallow=False) for f in names), f"{other} differs"

    print(f"dump: {dump.name}, {size:,} bytes, {streams} indexed bz2 streams, {raw:,} bytes of XML; "
          f"{pages} pages, {docs} articles, {nbytes:,} bytes of text; best of {a.repeat}, one process "
          f"(but the N processes' rows), python {sys.version.split()[0]}, {os.cpu_count()} cores, load average "
          f"{load:.2f} at the start")
    print(f"{'reader':32s} {'s':>7s} {'pages/s':>9s} {'docs/s':>8s} {'input MB/s':>11s} {'text MB/s':>10s}")
    for name, t, n_pages, n_docs, in_bytes, out_bytes in rows:
        pages_s = f"{n_pages / t:,.0f}" if n_pages else "-"
        docs_s = f"{n_docs / t:,.0f}" if n_docs else "-"
        out_s = f"{out_bytes / t / 1e6:.2f}" if out_bytes else "-"
        print(f"{name:32s} {t:7.3f} {pages_s:>9s} {docs_s:>8s} {in_bytes / t / 1e6:11.2f} {out_s:>10s}")


if __name__ == "__main__":
    main()

"""Regenerate the sample multistream dump in this folder from gensim's real English Wikipedia test dump.

The source is ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
from the gensim 4.4.0 wheel or sdist on PyPI (``pip download gensim==4.4.0 --no-deps``): 206 real pages of a
2016 English Wikipedia ``pages-articles`` dump (100 redirects, one ``Wikipedia:`` page), in one bz2 stream.
This script keeps its ``<mediawiki><siteinfo>`` header as it is, a subset of its pages byte for byte in dump
order (every redirect, every page outside the article namespace, and the articles of at most
``--max-page-bytes`` of XML), and writes them the way Wikimedia writes a ``pages-articles-multistream``
dump: the header in the first bz2 stream, then ``--pages-per-stream`` pages per stream (Wikimedia uses 100; the
sample uses 5 so that a small file has many streams), then ``</mediawiki>`` in a last stream; and the index
``OFFSET:PAGEID:TITLE`` (the byte offset of the page's stream, the page id, the title as written in the XML),
bz2-compressed. Deterministic: the same source and options give the same bytes.

    python tests/data/mediawiki/make_sample.py gensim-4.4.0-....whl tests/data/mediawiki
    python tests/data/mediawiki/make_sample.py SOURCE OUTDIR --max-page-bytes 0 --pages-per-stream 100  # all
"""

from __future__ import annotations

import argparse
import bz2
import re
import zipfile
from pathlib import Path

GENSIM_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NAME = "enwiki-sample-pages-articles-multistream"
_PAGE = re.compile(rb"  <page>\n.*?</page>\n", re.S)


def read_source(path: str) -> bytes:
    """The decompressed XML of gensim's dump: from the wheel/sdist (zip or tar) or the .bz2 itself."""
    if path.endswith(".whl") or path.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            return bz2.decompress(z.read(GENSIM_MEMBER))
    if path.endswith(".tar.gz"):
        import tarfile

        with tarfile.open(path) as t:
            member = next(m for m in t.getmembers() if m.name.endswith(GENSIM_MEMBER))
            return bz2.decompress(t.extractfile(member).read())  # type: ignore[union-attr]
    return bz2.decompress(Path(path).read_bytes())


def _field(page: bytes, tag: bytes) -> bytes:
    m = re.search(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.S)
    assert m is not None, tag
    return m.group(1)


def keep(page: bytes, max_page_bytes: int) -> bool:
    if not max_page_bytes:
        return True
    return b"<redirect" in page or _field(page, b"ns") != b"0" or len(page) <= max_page_bytes


def write_multistream(xml: bytes, out: Path, name: str, pages_per_stream: int,
                      max_page_bytes: int) -> tuple[Path, Path]:
    first = _PAGE.search(xml)
    assert first is not None
    header = xml[: first.start()]
    pages = [m.group(0) for m in _PAGE.finditer(xml)]
    footer = xml[xml.rindex(b"</page>\n") + len(b"</page>\n"):]
    assert footer.strip() == b"</mediawiki>", footer[:200]
    pages = [p for p in pages if keep(p, max_page_bytes)]
    out.mkdir(parents=True, exist_ok=True)
    dump, index = out / f"{name}.xml.bz2", out / f"{name}-index.txt.bz2"
    lines = []
    with open(dump, "wb") as f:
        f.write(bz2.compress(header, 9))
        for i in range(0, len(pages), pages_per_stream):
            offset = f.tell()
            group = pages[i : i + pages_per_stream]
            for p in group:
                lines.append(b"%d:%s:%s\n" % (offset, _field(p, b"id"), _field(p, b"title")))
            f.write(bz2.compress(b"".join(group), 9))
        f.write(bz2.compress(footer, 9))
    index.write_bytes(bz2.compress(b"".join(lines), 9))
    return dump, index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="gensim's wheel/sdist, or the .bz2 test dump itself")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--pages-per-stream", type=int, default=5)
    ap.add_argument("--max-page-bytes", type=int, default=20_000, help="0: keep every page")
    a = ap.parse_args()
    dump, index = write_multistream(read_source(a.source), Path(a.out), a.name, a.pages_per_stream, a.max_page_bytes)
    print(f"{dump} ({dump.stat().st_size:,} bytes), {index} ({index.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()

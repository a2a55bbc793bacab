"""What ``preprocess --filter`` removes from real books and Wikipedia (ISSUE18): books, documents and
tokens per rule set, and which books.

The corpus (``--corpora``, default ``../shared/corpora``: 19 Project Gutenberg books and tiny-shakespeare
in ``books/``, Wikipedia in three dump formats and Chinese Wikipedia in ``wikipedia/``) is read as
preprocess reads it with ``--strip-gutenberg``; every document is judged by each rule set
(``quality.check``, what preprocess applies to each document) and tokenized with a SentencePiece model of
``--vocab`` trained on the corpus once (cached in ``--cache``), so the table says how many books, other
documents and tokens each rule set removes, by reason, and how fast the rules run. With ``--pipeline`` the
real command runs too and must agree:

    python -m lmforge.data_pipeline preprocess --input BOOKS WIKIPEDIA --strip-gutenberg \\
        --filter gopher,repetition ...

(its skip counts, ``OUT/filtered/*.tsv`` rows and tokens written against the table's).

To measure an older version of the rules, run this file with that version's source first on the path
(``PYTHONPATH=/path/to/old/src`` holding ``lmforge/data_pipeline``): it uses only ``quality.check``.

    python benchmarks/filter_quality.py [--corpora ../shared/corpora] [--extra-books DIR] [--pipeline]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: an older source put there is measured (docstring)

RULE_SETS = ("gopher", "repetition", "gopher,repetition")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", default=str(ROOT.parent / "shared" / "corpora"))
    ap.add_argument("--extra-books", nargs="*", default=[],
                    help="more book files or directories (e.g. tests/data/corpus/books_en_de_zh: German, Chinese)")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lmforge_bench"))
    ap.add_argument("--pipeline", action="store_true", help="also run preprocess --filter gopher,repetition")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import sentencepiece as spm

    from lmforge.data_pipeline.preprocess import quality
    from lmforge.data_pipeline.readers import DOC, ReadOptions, expand_inputs, iter_documents

    corpora = Path(args.corpora)
    books_in = [str(corpora / "books"), *args.extra_books]
    wiki_in = [str(corpora / "wikipedia")]
    cache = Path(args.cache)
    model = cache / f"tok{args.vocab}" / "tokenizer.model"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "lmforge.data_pipeline", "train-tokenizer", "--input", *books_in,
                        *wiki_in, "--vocab-size", str(args.vocab), "--output", str(model.parent)], cwd=ROOT,
                       check=True)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    opts = ReadOptions(strip_gutenberg=True)
    docs: list[tuple[str, str, str]] = []  # (kind, location, text)
    for kind, inputs in (("book", books_in), ("wiki", wiki_in)):
        for s in expand_inputs(inputs):
            docs.extend((kind, loc, t) for k, t, loc in iter_documents(s, opts) if k == DOC)
    tokens = [len(x) for x in sp.encode([t for _, _, t in docs])]
    total = {k: sum(n for (kk, _, _), n in zip(docs, tokens) if kk == k) for k in ("book", "wiki")}
    count = Counter(k for k, _, _ in docs)
    chars = sum(len(t) for _, _, t in docs)
    version = getattr(quality, "VERSION", 1)
    print(f"quality rules version {version} ({quality.__file__})")
    print(f"corpus: {count['book']} books ({total['book']:,} tokens), {count['wiki']:,} Wikipedia documents "
          f"({total['wiki']:,} tokens), {chars / 1e6:.1f} M characters; tokenizer {model} (vocab {args.vocab})")
    print(f"{'--filter':20s} {'books removed':>14s} {'book tokens':>18s} {'wiki docs removed':>18s} "
          f"{'wiki tokens':>18s} {'all tokens':>11s} {'rules M char/s':>14s}  reasons")
    removed_books: dict[str, list[str]] = {}
    results = {}
    for spec in RULE_SETS:
        rules = quality.parse_rules(spec)
        t0 = time.perf_counter()
        verdicts = [quality.check(t, rules) for _, _, t in docs]
        dt = time.perf_counter() - t0
        gone = {k: [(loc, n, v) for (kk, loc, _), n, v in zip(docs, tokens, verdicts) if kk == k and v]
                for k in ("book", "wiki")}
        gone_tok = {k: sum(n for _, n, _ in gone[k]) for k in gone}
        reasons = Counter(v for v in verdicts if v)
        results[spec] = (gone, reasons)
        removed_books[spec] = [f"{Path(loc.rsplit(':', 1)[0]).name} ({v})" for loc, _, v in gone["book"]]
        all_tok = (gone_tok["book"] + gone_tok["wiki"]) / max(total["book"] + total["wiki"], 1)
        print(f"{spec:20s} {len(gone['book']):>6d} of {count['book']:<5d} "
              f"{gone_tok['book']:>10,} ({gone_tok['book'] / max(total['book'], 1):4.0%}) "
              f"{len(gone['wiki']):>7,} of {count['wiki']:<7,} "
              f"{gone_tok['wiki']:>9,} ({gone_tok['wiki'] / max(total['wiki'], 1):4.1%}) {all_tok:>10.1%} "
              f"{chars / dt / 1e6:>14.1f}  {dict(sorted(reasons.items()))}")
    for spec in RULE_SETS:
        print(f"books removed by --filter {spec}: {', '.join(removed_books[spec]) or 'none'}")

    if args.pipeline:
        out = cache / "filter_out"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lmforge.data_pipeline", "preprocess", "--input", *books_in, *wiki_in,
                        "--tokenizer", str(model), "--output", str(out), "--overwrite", "--no-progress",
                        "--workers", str(args.workers), "--strip-gutenberg", "--filter", "gopher,repetition"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        m = json.loads((out / "manifest.json").read_text())
        gone, reasons = results["gopher,repetition"]
        skipped = {k: v for k, v in m["skipped"].items() if k.startswith("filter-")}
        rows = [r.split("\t") for f in sorted((out / "filtered").glob("*.tsv")) for r in f.read_text().splitlines()]
        listed = {loc for _, loc, _ in rows} if rows and len(rows[0]) == 3 else set()
        expect = {loc for k in gone for loc, _, _ in gone[k]}
        written = sum(t["tokens"] - t["documents"] for t in m["totals"].values())  # without the EODs
        kept_tokens = total["book"] + total["wiki"] - sum(n for k in gone for _, n, _ in gone[k])
        print(f"preprocess --filter gopher,repetition ({dt:.1f}s, {args.workers} workers): skipped "
              f"{dict(sorted(skipped.items()))}; {len(rows):,} rows in OUT/filtered/ "
              f"(same documents as above: {listed == expect}); tokens written {written:,} "
              f"(above: {kept_tokens:,})")
        if skipped != dict(reasons) or listed != expect or written != kept_tokens:
            sys.exit("the pipeline disagrees with the table")


if __name__ == "__main__":
    main()

"""Recall and false positives of ``preprocess --dedup`` on a real corpus with planted duplicates (ISSUE12).

The corpus (``--corpora``, default ``../shared/corpora``: Wikipedia in three dump formats, Chinese
Wikipedia and Gutenberg books) is read as given, followed by one JSON-lines file of altered copies of
its documents (``tests/helpers/planted.py``: exact copies re-spaced and in NFD, 1/3/5% of words edited,
paragraphs reordered, a different header line; ``--per-kind`` of each). Then

    python -m lmforge.data_pipeline preprocess --dedup exact,minhash [--minhash-threshold T] ...

runs on it, and every removed document (``OUT/duplicates/*.tsv``) is compared with the document kept
for it, by the true 5-gram Jaccard similarity that MinHash estimates:

- recall per planted kind: the share of planted copies removed (with their true Jaccard range, and the
  detection probability 1 - (1 - s^rows)^bands the LSH settings give at that similarity);
- removed documents of the corpus itself (real duplicates: the dumps overlap) by similarity band;
- false positives: removed documents whose true Jaccard with the kept one is below 0.5, or whose
  kept document is not an earlier document; removals below the LSH threshold (every near duplicate is
  checked against the kept document before it is removed, ISSUE18) and the most removals made for one
  kept document (transitive clusters made dozens of template stubs duplicates of one).

With ``--cost`` it instead measures what the near-duplicate check costs against the signature scan:

    python -m lmforge.data_pipeline preprocess --input CORPORA/wikipedia --dedup minhash ...

``--repeat`` times (best of), reading the scan's and the check's seconds from the run's ``dedup:`` line.

    python benchmarks/dedup_quality.py [--corpora ../shared/corpora] [--per-kind 40] [--threshold 0.72]
    python benchmarks/dedup_quality.py --cost [--repeat 3] [--workers 2] [--extra "--unit-bytes 1M"]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", default=str(ROOT.parent / "shared" / "corpora"))
    ap.add_argument("--per-kind", type=int, default=40)
    ap.add_argument("--threshold", type=float, default=None, help="--minhash-threshold (default: the default)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lmforge_bench"))
    ap.add_argument("--cost", action="store_true", help="time the near-duplicate check against the scan")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--extra", default="", help="more preprocess arguments for --cost, e.g. '--unit-bytes 1M'")
    args = ap.parse_args()

    from lmforge.data_pipeline.preprocess.dedup import detection_probability, normalize_exact
    from lmforge.data_pipeline.readers import DOC, ReadOptions, expand_inputs, iter_documents
    from tests.helpers.planted import KINDS, jaccard, plant

    corpora = Path(args.corpora)
    inputs = [str(corpora / "wikipedia"), str(corpora / "books")]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = cache / "tok8000" / "tokenizer.model"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "lmforge.data_pipeline", "train-tokenizer", "--input", *inputs,
                        "--vocab-size", "8000", "--output", str(model.parent)], cwd=ROOT, check=True)
    if args.cost:
        cost(corpora / "wikipedia", model, cache, args)
        return
    text_at: dict[str, str] = {}
    docs: list[str] = []
    for s in expand_inputs(inputs):
        for k, t, loc in iter_documents(s, ReadOptions()):
            if k == DOC:
                text_at[loc] = t
                docs.append(t)
    copies = plant(docs, seed=0, per_kind=args.per_kind)
    planted = cache / "planted.jsonl"
    with open(planted, "w") as f:
        for line, (_, _, text) in enumerate(copies, start=1):
            f.write(json.dumps({"text": text}) + "\n")
            text_at[f"{planted}:{line}"] = text

    out = cache / "dedup_out"
    extra = [] if args.threshold is None else ["--minhash-threshold", str(args.threshold)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmforge.data_pipeline", "preprocess", "--input", *inputs, str(planted),
                    "--tokenizer", str(model), "--output", str(out), "--overwrite", "--no-progress",
                    "--workers", str(args.workers), "--dedup", "exact,minhash", *extra], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    bands, rows = settings["minhash_bands"], settings["minhash_rows"]
    removed = {}
    for f in sorted((out / "duplicates").glob("*.tsv")):
        for line in f.read_text().splitlines():
            why, loc, kept = line.split("\t")[:3]  # (and the Jaccard measured, since ISSUE18)
            removed[loc] = (why, kept)

    print(f"corpus: {len(docs):,} documents + {len(copies)} planted copies; --dedup exact,minhash with "
          f"{bands} bands x {rows} rows over {settings['minhash_ngram']}-grams "
          f"(threshold {args.threshold or 'default'}, 50% point {(1 / bands) ** (1 / rows):.3f}); "
          f"preprocess {dt:.1f}s with {args.workers} workers")
    print(f"{'planted kind':14s} {'found':>7s}  {'true Jaccard':>13s}  {'expected by LSH':>15s}  reasons")
    by_kind: dict[str, list] = defaultdict(list)
    for line, (kind, i, text) in enumerate(copies, start=1):
        got = removed.get(f"{planted}:{line}")
        by_kind[kind].append((got, jaccard(docs[i], text)))
    for kind in KINDS:
        rows_ = by_kind[kind]
        found = sum(g is not None for g, _ in rows_)
        js = [j for _, j in rows_]
        expect = sum(1.0 if kind == "exact" else detection_probability(j, bands, rows) for j in js) / len(js)
        reasons = Counter(g[0] for g, _ in rows_ if g is not None)
        print(f"{kind:14s} {found:3d}/{len(rows_):<3d}  {min(js):.3f}-{max(js):.3f}  {expect * 100:14.1f}%  "
              f"{dict(reasons)}")
    near = [(g, j) for k in KINDS if k != "exact" for g, j in by_kind[k]]
    hi = [(g, j) for g, j in near if j >= 0.85]
    print(f"recall on planted near-duplicates with true Jaccard >= 0.85: "
          f"{sum(g is not None for g, _ in hi)}/{len(hi)}; >= 0.75: "
          f"{sum(g is not None for g, j in near if j >= 0.75)}/{sum(j >= 0.75 for _, j in near)}")

    real = {loc: v for loc, v in removed.items() if not loc.startswith(str(planted))}
    bands_hist: Counter = Counter()
    false_pos = []
    for loc, (why, kept) in removed.items():
        a, b = text_at.get(loc), text_at.get(kept)
        if a is None or b is None:
            false_pos.append((loc, kept, "location not found"))
            continue
        if why == "duplicate-exact":
            ok = normalize_exact(a) == normalize_exact(b)
            j = 1.0
        else:
            j = jaccard(a, b)
            ok = j >= 0.5
        if not ok or kept.startswith(str(planted)):
            false_pos.append((loc, kept, f"{why} at Jaccard {j:.3f}"))
        if loc in real:
            bands_hist["exact" if why == "duplicate-exact" else f"{min(int(j * 10) / 10, 0.9):.1f}+"] += 1
    print(f"removed from the corpus itself (real duplicates): {len(real):,} of {len(docs):,} documents; "
          f"by true Jaccard: {dict(sorted(bands_hist.items()))}")
    print(f"false positives (true Jaccard < 0.5, or a later document kept): {len(false_pos)} of "
          f"{len(removed):,} removed = {len(false_pos) / max(len(removed), 1) * 100:.2f}%")
    for fp in false_pos[:5]:
        print("   ", *fp)
    near = [(loc, kept) for loc, (why, kept) in removed.items() if why == "duplicate-near"]
    point = (1 / bands) ** (1 / rows)
    below = [jaccard(text_at[a], text_at[b]) for a, b in near if a in text_at and b in text_at]
    per_kept = Counter(b for _, b in near).most_common(1)
    print(f"near-duplicate removals below the threshold {point:.3f}: {sum(j < point for j in below)} of "
          f"{len(near)} (lowest Jaccard {min(below, default=1.0):.3f}); most removed for one kept document: "
          f"{per_kept[0][1] if per_kept else 0}")


def cost(wikipedia: Path, model: Path, cache: Path, args) -> None:
    """Best of ``--repeat`` runs of preprocess --dedup minhash on Wikipedia: the scan's and the near-duplicate
    check's seconds (from the run's ``dedup:`` line on stderr)."""
    out = cache / "dedup_cost"
    best: dict[str, float] = {}
    line = ""
    for _ in range(args.repeat):
        p = subprocess.run([sys.executable, "-m", "lmforge.data_pipeline", "preprocess", "--input", str(wikipedia),
                            "--tokenizer", str(model), "--output", str(out), "--overwrite", "--no-progress",
                            "--workers", str(args.workers), "--dedup", "minhash", *shlex.split(args.extra)],
                           cwd=ROOT, check=True, capture_output=True, text=True)
        line = next((x for x in p.stderr.splitlines() if x.startswith("dedup:")), "")
        for key, pattern in (("scan", r"scan ([\d.]+)s"), ("total", r"total ([\d.]+)s"),
                             ("check", r"near-duplicate check: .*?, ([\d.]+)s \(re-read"),
                             ("re-read", r"re-read ([\d.]+)s")):
            m = re.search(pattern, line)
            if m:
                best[key] = min(best.get(key, float("inf")), float(m.group(1)))
    print(f"last run: {line}")
    scan, check = best.get("scan"), best.get("check")
    print(f"best of {args.repeat} ({args.workers} workers{', ' + args.extra if args.extra else ''}): "
          + ", ".join(f"{k} {v:.2f}s" for k, v in best.items())
          + (f"; the check costs {check / scan:.0%} of the scan" if scan and check is not None else ""))


if __name__ == "__main__":
    main()

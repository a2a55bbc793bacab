"""Pipeline throughput vs raw SentencePiece on the shared corpora.

Prints, in one run on the same texts and tokenizer:
- raw batched ``SentencePieceProcessor.encode(texts, num_threads=N)`` tokens/s (texts already in memory);
- the pipeline's end-to-end tokens/s (``python -m data_pipeline preprocess``: files in -> shards out,
  including process start-up, reading, decoding, hashing, writing and checksumming);
- their ratio (target >= 0.85) and the pipeline's peak RSS (largest process), also with the corpus
  doubled (``--double``) to show that memory does not grow with the corpus.

    python benchmarks/preprocess_throughput.py [--corpora ../shared/corpora] [--vocab 32000] [--double]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.preprocess import CHUNK_CHARS, split_exact  # noqa: E402
from data_pipeline.readers import DOC, LAST, PART, ReadOptions, expand_inputs, iter_documents  # noqa: E402


def run_pipeline(inputs: list[str], model: str, out: str, workers: int, extra: list[str]):
    """-> (seconds, stdout, peak RSS in KiB of the run's largest process, from wait4)."""
    cmd = [sys.executable, "-m", "data_pipeline", "preprocess", "--input", *inputs, "--tokenizer", model,
           "--output", out, "--workers", str(workers), "--no-progress", "--overwrite", *extra]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fo, stderr=fe, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        if proc.returncode != 0:
            sys.exit(f"pipeline failed:\n{fe.read()}")
        return dt, fo.read(), usage.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", default=str(ROOT.parent / "shared" / "corpora"))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--double", action="store_true", help="also run on the corpus twice over (RSS check)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lmforge_bench"))
    args = ap.parse_args()

    import sentencepiece as spm

    corpora = Path(args.corpora)
    inputs = [str(corpora / "books"), str(corpora / "wikipedia")]
    cache = Path(args.cache)
    model = cache / f"tok{args.vocab}" / "tokenizer.model"
    if not model.exists():
        print(f"training a {args.vocab} BPE tokenizer into {model.parent} ...", flush=True)
        subprocess.run([sys.executable, "-m", "data_pipeline", "train-tokenizer", "--input", *inputs,
                        "--vocab-size", str(args.vocab), "--output", str(model.parent)], cwd=ROOT, check=True)

    runs = [("corpus", inputs)]
    if args.double:
        twice = cache / "double"
        if not twice.exists():
            for copy in ("a", "b"):
                for src in expand_inputs(inputs):
                    dst = twice / copy / Path(src.path).relative_to(corpora)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.symlink_to(Path(src.path).resolve())
        runs.append(("corpus x2", [str(twice)]))
    # Pipeline runs first: a forked child's peak RSS would otherwise include this process's pages (the
    # in-memory texts of the raw baseline below), and RSS must be measured on the pipeline alone.
    results = []
    for name, inp in runs:
        dt, out, peak_kb = run_pipeline(inp, str(model), str(cache / "out"), args.workers,
                                        ["--valid-fraction", "0.01"])
        toks = int(out.split(" tokens in ")[0].rsplit(" ", 1)[-1].replace(",", ""))
        results.append((name, toks, dt, peak_kb))

    # The same documents the pipeline tokenizes, in memory, for the raw baseline.
    opts = ReadOptions()
    texts = [t for s in expand_inputs(inputs) for k, t, _ in iter_documents(s, opts) if k in (DOC, PART, LAST)]
    nbytes = sum(len(t.encode()) for t in texts)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    sp.encode(texts[:100], num_threads=args.workers)  # warm up
    t0 = time.perf_counter()
    ids = sp.encode(texts, num_threads=args.workers)
    raw_s = time.perf_counter() - t0
    ntok = sum(map(len, ids))
    del ids
    raw_rate = ntok / raw_s
    print(f"corpus: {len(texts):,} documents, {nbytes / 1e6:.1f} MB of text, {ntok:,} tokens (vocab {args.vocab})")
    print(f"raw SentencePiece encode(list, num_threads={args.workers}) on whole documents: "
          f"{raw_rate / 1e6:.2f} M tokens/s ({raw_s:.2f}s)  <- the reference for the ratio")
    # The pipeline feeds SentencePiece pieces cut by split_exact (same tokens, shorter inputs); show what
    # raw SentencePiece does on those too, so the ratio's source is visible.
    pieces = [p for t in texts for p in (split_exact(t) if len(t) > CHUNK_CHARS else [t])]
    t0 = time.perf_counter()
    n2 = sum(map(len, sp.encode(pieces, num_threads=args.workers)))
    chunk_rate = n2 / (time.perf_counter() - t0)
    assert n2 == ntok
    print(f"raw SentencePiece on the same texts cut by split_exact (identical tokens): {chunk_rate / 1e6:.2f} "
          f"M tokens/s")

    for name, toks, dt, peak_kb in results:
        rate = toks / dt
        rss = f"{peak_kb / 1024:.0f} MiB"
        print(f"pipeline [{name}] ({args.workers} workers, end to end): {toks:,} tokens in {dt:.2f}s = "
              f"{rate / 1e6:.2f} M tokens/s; ratio to raw {rate / raw_rate:.2f} (target >= 0.85), "
              f"to raw on the cut texts {rate / chunk_rate:.2f}; peak RSS (largest process) {rss}")


if __name__ == "__main__":
    main()

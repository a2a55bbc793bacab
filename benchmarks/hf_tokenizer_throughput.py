"""Pipeline throughput with a Hugging Face tokenizer vs raw ``tokenizers`` batch encoding (ISSUE12 item 7).

The same corpus as ``preprocess_throughput.py`` (``--corpora``, default ``../shared/corpora``: books/ and
wikipedia/; the repository's ``tests/data/corpus`` works for a quick run). The tokenizer is ``--tokenizer``
(a tokenizer.json or a directory holding one), else a byte-level BPE of ``--vocab`` trained on the corpus
by ``train-tokenizer --type hf-bpe`` once and cached in ``--cache``.

Each repeat runs, one after the other, on all cores:
- the pipeline end to end (``python -m lmforge.data_pipeline preprocess``: files in -> shards out, including
  process start-up, reading, decoding, hashing, writing and checksumming; worker threads, each encoding
  its batches with ``encode_batch_fast``);
- raw ``Tokenizer.encode_batch_fast(texts, add_special_tokens=False)`` on the same documents already in
  memory, in one call (``tokenizers`` spreads it over its own thread pool of all cores), in a subprocess
  of its own: on whole documents, and on the same documents cut as the pipeline cuts them
  (``split_exact(keep_space=True)`` where ``hf_tokenizer.cuts_before_spaces`` holds: identical tokens,
  faster, since ``tokenizers`` is ~3x slower per token on a whole book); also ``encode_batch`` (which
  computes character offsets too) on whole documents.

The machine may be shared, so every figure is the best of ``--repeat`` runs and the load average is
printed; the ratio is taken against the strictest (fastest) raw figure. Tokens per CPU-second (all
threads) are printed too: a busy machine distorts them far less.

    python benchmarks/hf_tokenizer_throughput.py [--corpora ../shared/corpora] [--vocab 32000]
        [--tokenizer DIR_OR_JSON] [--repeat 3] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.preprocess_throughput import run_pipeline  # noqa: E402


def raw_reference(inputs: list[str], tokenizer: str) -> None:
    """(subprocess) Print JSON: raw tokenizers tokens/s on the documents, whole, as the pipeline encodes them."""
    from lmforge.common.tokenizer_files import resolve_tokenizer
    from lmforge.data_pipeline import hf_tokenizer
    from lmforge.data_pipeline.preprocess import CHUNK_CHARS, split_exact
    from lmforge.data_pipeline.readers import DOC, LAST, PART, ReadOptions, expand_inputs, iter_documents

    opts = ReadOptions()
    texts = [t for s in expand_inputs(inputs) for k, t, _ in iter_documents(s, opts) if k in (DOC, PART, LAST)]
    path = resolve_tokenizer(tokenizer).path
    tok = hf_tokenizer.load(path)
    runs = [("encode_batch_fast", texts), ("encode_batch", texts)]
    if hf_tokenizer.cuts_before_spaces(path):
        runs.append(("encode_batch_fast", [p for t in texts for p in (
            split_exact(t, keep_space=True) if len(t) > CHUNK_CHARS else [t])]))
    tok.encode_batch_fast(texts[:100], add_special_tokens=False)  # warm up (and start the thread pool)
    out = {"documents": len(texts), "bytes": sum(len(t.encode()) for t in texts)}
    for (method, batch), name in zip(runs, ("whole_fast", "whole", "cut_fast")):
        t0, c0 = time.perf_counter(), time.process_time()
        encodings = getattr(tok, method)(batch, add_special_tokens=False)
        ids = [e.ids for e in encodings]  # what a caller needs: the ids as Python lists (the pipeline's cost too)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[name] = {"tokens": sum(map(len, ids)), "seconds": dt, "cpu": cpu}
        del encodings, ids
    assert all(out[name]["tokens"] == out["whole"]["tokens"] for name in ("whole_fast", "cut_fast") if name in out)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", default=str(ROOT.parent / "shared" / "corpora"),
                    help="directory with books/ and wikipedia/ (default: ../shared/corpora)")
    ap.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer.json or a directory holding one")
    ap.add_argument("--vocab", type=int, default=32000, help="vocab of the hf-bpe trained without --tokenizer")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs of each measurement")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lmforge_bench"))
    ap.add_argument("--extra", default="", help="extra preprocess arguments, e.g. '--batch-chars 4M'")
    ap.add_argument("--raw-reference", nargs=2, metavar=("TOKENIZER", "INPUTS_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_reference:
        raw_reference(json.loads(args.raw_reference[1]), args.raw_reference[0])
        return

    corpora = Path(args.corpora)
    inputs = [str(corpora / "books"), str(corpora / "wikipedia")]
    if not all(Path(p).is_dir() for p in inputs):
        sys.exit(f"{corpora}: needs books/ and wikipedia/ directories (pass --corpora DIR)")
    cache = Path(args.cache)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = str(cache / f"hfbpe{args.vocab}")
        if not (Path(tokenizer) / "tokenizer.json").exists():
            print(f"training a {args.vocab} byte-level BPE into {tokenizer} ...", flush=True)
            subprocess.run([sys.executable, "-m", "lmforge.data_pipeline", "train-tokenizer", "--type", "hf-bpe",
                            "--input", *inputs, "--vocab-size", str(args.vocab), "--output", tokenizer],
                           cwd=ROOT, check=True)

    load0 = os.getloadavg()
    best: dict | None = None
    raw_best: dict[str, float] = {}
    raw_cpu_best: dict[str, float] = {}
    raw_info: dict = {}
    for _ in range(args.repeat):
        dt, out, peak_kb, cpu = run_pipeline(inputs, tokenizer, str(cache / "out_hf"), args.workers,
                                             ["--valid-fraction", "0.01", *args.extra.split()])
        toks = int(out.split(" tokens in ")[0].rsplit(" ", 1)[-1].replace(",", ""))
        if best is None:
            best = {"tokens": toks, "seconds": dt, "cpu": cpu, "peak_kb": peak_kb}
        best.update(seconds=min(best["seconds"], dt), cpu=min(best["cpu"], cpu), peak_kb=max(best["peak_kb"], peak_kb))
        p = subprocess.run([sys.executable, __file__, "--raw-reference", tokenizer, json.dumps(inputs)], cwd=ROOT,
                           capture_output=True, text=True, check=True)
        raw_info = json.loads(p.stdout)
        for k in ("whole_fast", "whole", "cut_fast"):
            if k in raw_info:
                raw_best[k] = max(raw_best.get(k, 0.0), raw_info[k]["tokens"] / raw_info[k]["seconds"])
                raw_cpu_best[k] = max(raw_cpu_best.get(k, 0.0), raw_info[k]["tokens"] / raw_info[k]["cpu"])
    load1 = os.getloadavg()
    assert best is not None
    if best["tokens"] != raw_info["whole"]["tokens"]:
        sys.exit(f"token counts differ: pipeline {best['tokens']:,}, raw {raw_info['whole']['tokens']:,}")

    print(f"load average before {load0[0]:.2f} / after {load1[0]:.2f} (1 min) on {os.cpu_count()} cores; "
          f"best of {args.repeat} runs each")
    print(f"corpus: {raw_info['documents']:,} documents, {raw_info['bytes'] / 1e6:.1f} MB of text, "
          f"{best['tokens']:,} tokens (tokenizer {tokenizer})")
    labels = {"whole_fast": "encode_batch_fast(whole documents)", "whole": "encode_batch(whole documents)",
              "cut_fast": "encode_batch_fast(documents cut as the pipeline cuts them: identical tokens)"}
    for k, label in labels.items():
        if k in raw_best:
            print(f"raw tokenizers {label}: {raw_best[k] / 1e6:.2f} M tokens/s "
                  f"({raw_cpu_best[k] / 1e6:.2f} M tokens per CPU-s)")
    ref_name = max(raw_best, key=raw_best.get)
    ref = raw_best[ref_name]
    rate = best["tokens"] / best["seconds"]
    print(f"pipeline ({args.workers} workers, end to end): {best['tokens']:,} tokens in {best['seconds']:.2f}s = "
          f"{rate / 1e6:.2f} M tokens/s; ratio {rate / ref:.2f} to the strictest raw figure ({ref_name}), "
          f"{rate / raw_best['whole_fast']:.2f} to raw encode_batch_fast on whole documents; "
          f"peak RSS {best['peak_kb'] / 1024:.0f} MiB")
    cpu_rate = best["tokens"] / best["cpu"]
    print(f"  CPU: {best['cpu']:.2f} CPU-s (start-up included) = {cpu_rate / 1e6:.2f} M tokens per CPU-s; "
          f"{cpu_rate / max(raw_cpu_best.values()):.2f} of the best raw tokens per CPU-s")


if __name__ == "__main__":
    main()

"""Cost of the trainer's data side: index build, cache load, sample reads, batch assembly, blending.

Writes a synthetic MMIDIDX dataset (random token ids, document lengths ~ geometric) into a temp dir,
then prints the time of each stage, and per-step data time for a given global batch, so it can be
compared with step time (the goal is data wait < 1% of a step; with prefetch the read overlaps the step).

    .venv/bin/python benchmarks/data_loading.py --tokens 50_000_000 --seq-len 2048 --global-batch 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmforge.data_pipeline.gpt_dataset import PackedDataset, _blend_indices  # noqa: E402
from lmforge.data_pipeline.indexed_dataset import IndexedDatasetWriter  # noqa: E402
from lmforge.trainer.batching import DistributedSampleIterator, make_batch  # noqa: E402


def timed(label: str, fn):
    t0 = time.perf_counter()
    out = fn()
    print(f"{label:<48} {time.perf_counter() - t0:8.3f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--mean-doc-len", type=int, default=500)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=3.0, help="num_samples as a multiple of one epoch")
    ap.add_argument("--blend-samples", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/synthetic"

        def write() -> int:
            n_docs = 0
            with IndexedDatasetWriter(prefix, np.uint16) as w:
                left = args.tokens
                while left > 0:
                    lengths = np.minimum(rng.geometric(1 / args.mean_doc_len, size=10_000), 65_000)
                    block = rng.integers(3, 32000, size=int(lengths.sum()), dtype=np.uint16)
                    for piece in np.split(block, np.cumsum(lengths)[:-1]):
                        w.add_document(piece)
                    n_docs += len(lengths)
                    left -= len(block)
            return n_docs

        n_docs = timed(f"write ~{args.tokens / 1e6:.0f}M tokens", write)
        probe = PackedDataset([prefix], args.seq_len, 0, seed=1)
        num_samples = int(len(probe) * args.epochs)
        print(f"{n_docs} documents, {probe.tokens_per_epoch} tokens, {num_samples} samples "
              f"of {args.seq_len + 1} tokens")
        ds = PackedDataset([prefix], args.seq_len, num_samples, seed=1, cache_dir=f"{tmp}/cache")
        timed("fingerprint (sha256 of .idx)", lambda: ds.fingerprint)
        timed("build index arrays + write cache", ds.build_cache)
        cached = timed("construct + load from cache (mmap)",
                       lambda: PackedDataset([prefix], args.seq_len, num_samples, 1, f"{tmp}/cache")._ensure())
        print(f"cache size: {sum(a.nbytes for a in cached.values()) / 2**20:.1f} MiB "
              f"({', '.join(f'{k} {a.dtype}' for k, a in cached.items())})")
        steps = 20
        it = DistributedSampleIterator(ds, args.global_batch, 1, 0, 1)
        t0 = time.perf_counter()
        for _ in range(steps):
            (mb,) = it.next_microbatches()
            make_batch(mb, 2, mask_eod_loss=True, reset_position_ids=True, intra_doc_attention=True)
        per_step = (time.perf_counter() - t0) / steps
        print(f"{'read + make_batch per global batch of ' + str(args.global_batch):<48} "
              f"{per_step * 1e3:8.1f} ms ({args.global_batch * (args.seq_len + 1) / per_step / 1e6:.1f}M tokens/s)")
        weights = np.array([0.5, 0.3, 0.2])
        timed(f"blend indices for {args.blend_samples} samples, 3 datasets",
              lambda: _blend_indices(weights, args.blend_samples))


if __name__ == "__main__":
    main()

"""Long context: peak memory per rank and tokens/s with and without Ulysses sequence parallelism (ISSUE11).

CPU section (default): the real trainer (``deepspeed --num_gpus S --module lmforge.trainer.train``, gloo) on the
shipped sample corpus, one sample of ``seq`` tokens per step (micro batch 1, data-parallel 1, so S = 1
and S = 2 train the same samples), ZeRO-1, fp32, every layer's activations recomputed
(``activation_checkpointing: 1``), document masking on. For each preset and sequence length it prints
the steady-state tokens/s (the mean over the steps after the first) and rank 0's peak RSS, and the
RSS of the same run at a short sequence as the baseline (weights, optimizer, libraries), so that
"activations" = peak - baseline is what sequence parallelism divides. Runs use a fixed glibc mmap
threshold (``MALLOC_MMAP_THRESHOLD_``) so that freed memory goes back to the system and peak RSS
measures live memory.

GPU section (``--gpu``, on a lent GPU machine): the longest sequence the ``1b`` preset trains on one GPU
in bf16 with activation checkpointing and the flex document kernel, doubling from 16k until a step runs
out of memory (micro batch 1, ZeRO-1), with tokens/s and peak memory at each length, and the arithmetic
for 128k on 8 GPUs (S = 8).

    python benchmarks/long_context.py [--presets tiny,125m] [--seqs 8192,16384,32768] [--sp 1,2] [--steps 3]
    python benchmarks/long_context.py --gpu [--preset 1b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _data(cache: Path) -> dict:
    from tests.helpers.runs import build_tiny_data

    if not (cache / "data" / "manifest.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        build_tiny_data(cache)
    return {"tokenizer": cache / "tok" / "tokenizer.model", "data": cache / "data"}


def run(data: dict, work: Path, name: str, preset: str, seq: int, sp: int, steps: int, precision: str,
        kernel: str = "auto") -> dict:
    """One training run; returns its last rows' figures, or {"error": ...}."""
    from tests.helpers.process import free_port
    from tests.helpers.runs import deepspeed_args, read_metrics, write_config

    rd = work / name
    shutil.rmtree(rd, ignore_errors=True)
    cfg = write_config(work / f"{name}.yaml", data, rd,
                       model={"preset": preset, "max_position_embeddings": seq},
                       data={"seq_len": seq, "intra_doc_attention": True},
                       train={"micro_batch_size": 1, "grad_accum": 1, "max_steps": steps, "precision": precision},
                       parallel={"zero_stage": 1, "sequence_parallel": sp, "activation_checkpointing": 1,
                                 "attention_kernel": kernel},
                       checkpoint={"interval": 0}, log={"interval": 1})
    # A fixed mmap threshold: glibc otherwise raises it after large frees and keeps freed activations in the
    # heap, so peak RSS measured fragmentation, not live memory (125m at 8k, S = 1, checkpointing every
    # layer: 3.7 GiB peak RSS above the baseline with the default, 1.0 GiB with this).
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // sp)))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": threads,
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    p = subprocess.run([str(a) for a in deepspeed_args(cfg, [], sp, free_port())], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-600:]
        return {"error": "out of memory" if "out of memory" in tail.lower() else f"exit {p.returncode}: {tail}"}
    rows = read_metrics(rd)
    steady = rows[1:] or rows
    out = {"tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady), "wall_s": time.perf_counter() - t0}
    for key in ("rss_peak_gb", "mem_peak_gb"):
        if key in rows[-1]:
            out[key] = max(r[key] for r in rows)
    shutil.rmtree(rd, ignore_errors=True)
    return out


def cpu(args, data: dict, work: Path) -> None:
    print(f"CPU, {os.cpu_count()} cores; fp32, ZeRO-1, micro batch 1, activation checkpointing every layer, "
          f"document masking; {args.steps} steps each (tokens/s: mean after the first)")
    print(f"{'preset':7s} {'seq':>6s} {'S':>2s} {'tokens/s':>9s} {'peak RSS/rank':>14s} {'activations':>12s}")
    for preset in args.presets.split(","):
        base = run(data, work, "base", preset, 1024, 1, 2, "fp32")
        print(f"{preset:7s} {1024:6d} {1:2d} {base.get('tokens_per_s', 0):9.0f} {base.get('rss_peak_gb', 0):12.2f} G"
              f"  (baseline)")
        for seq in map(int, args.seqs.split(",")):
            res = {}
            for sp in map(int, args.sp.split(",")):
                r = res[sp] = run(data, work, f"{preset}_{seq}_{sp}", preset, seq, sp, args.steps, "fp32")
                if "error" in r:
                    print(f"{preset:7s} {seq:6d} {sp:2d}  {r['error'][:200]}")
                    continue
                act = r["rss_peak_gb"] - base.get("rss_peak_gb", 0)
                print(f"{preset:7s} {seq:6d} {sp:2d} {r['tokens_per_s']:9.0f} {r['rss_peak_gb']:12.2f} G {act:10.2f} G",
                      flush=True)
            if all("error" not in res.get(s, {"error": 1}) for s in (1, 2)):
                a1 = res[1]["rss_peak_gb"] - base["rss_peak_gb"]
                a2 = res[2]["rss_peak_gb"] - base["rss_peak_gb"]
                print(f"        S=2 / S=1: activations x{a2 / a1:.2f}, tokens/s x"
                      f"{res[2]['tokens_per_s'] / res[1]['tokens_per_s']:.2f}")


def gpu(args, data: dict, work: Path) -> None:
    import torch

    from lmforge.model import get_preset

    print(f"GPU: {torch.cuda.get_device_name()}; {args.preset}, bf16, ZeRO-1, micro batch 1, activation "
          "checkpointing every layer, flex document kernel")
    longest = 0
    seq = 16384
    while seq <= args.max_seq:
        r = run(data, work, f"gpu_{seq}", args.preset, seq, 1, args.steps, "bf16", kernel="flex")
        if "error" in r:
            print(f"  seq {seq:7d}: {r['error'][:200]}")
            break
        longest = seq
        print(f"  seq {seq:7d}: {r['tokens_per_s']:9.0f} tokens/s, peak {r.get('mem_peak_gb', 0):.1f} GiB", flush=True)
        seq *= 2
    m = get_preset(args.preset, vocab_size=32000)
    d, L = m.hidden_size, m.num_hidden_layers
    print(f"longest sequence on one GPU: {longest}")
    # With every layer recomputed, the activations kept are one (T, d) bf16 layer input per layer plus one
    # layer's working set while it is recomputed (~ 34·T·d bytes without attention scores: flash/flex
    # keep O(T) statistics), plus the loss (chunked).
    for t, s in ((131072, 1), (131072, 8)):
        kept = L * (t // s) * d * 2
        work_set = 34 * (t // s) * d
        print(f"128k arithmetic: T={t} S={s}: layer inputs kept {kept / 2**30:.1f} GiB + one layer's working set "
              f"~{work_set / 2**30:.1f} GiB per rank")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,125m")
    ap.add_argument("--seqs", default="8192,16384,32768")
    ap.add_argument("--sp", default="1,2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--preset", default="1b", help="--gpu: the preset")
    ap.add_argument("--max-seq", type=int, default=262144, help="--gpu: stop doubling here")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lmforge_bench" / "long_context"))
    args = ap.parse_args()
    cache = Path(args.cache)
    data = _data(cache / "data")
    work = cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    (gpu if args.gpu else cpu)(args, data, work)
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()

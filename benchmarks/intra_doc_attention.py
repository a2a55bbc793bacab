"""Step-time cost of intra-document attention vs plain causal attention.

Times forward+backward of a preset's model (``lmforge.model.build_model``) on packed rows (documents
separated by EOD) with
  * causal:     SDPA ``is_causal=True`` (documents attend across boundaries);
  * intra-doc:  ``segment_ids`` -> the trainer's attention policy (``trainer.batching.document_attention``):
                causal SDPA on each document's span, or one dense mask for very short documents, plus
                position ids reset per document (what the trainer passes with ``data.intra_doc_attention``).
                (The earlier dense boolean (B, 1, T, T) SDPA mask cost 1-12% here, 12% at seq 1024.)
The two variants alternate every iteration so background load hits both alike. Two clocks: CPU time of
this process (robust on a shared machine: time spent descheduled by neighbours is not counted; with
--threads 1 it is exactly the work done) and wall time; each is the minimum over iterations.

    .venv/bin/python benchmarks/intra_doc_attention.py --presets debug tiny --seq-lens 256 512 1024
On a GPU (bf16; ``--mode flex`` = the flex-attention block mask the trainer uses on CUDA):
    python benchmarks/intra_doc_attention.py --device cuda --presets 125m 1b --seq-lens 4096 8192 \
        --mean-doc-len 500 --mode flex
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmforge.model import CausalLM, build_model, get_preset  # noqa: E402
from lmforge.trainer.batching import (  # noqa: E402
    SPAN_ATTENTION_MIN_MEAN_TOKENS,
    document_attention,
    make_batch,  # noqa: E402
    on_device,
)

EOD = 2


def packed_rows(batch: int, seq_len: int, vocab: int, mean_doc: int, rng: np.random.Generator) -> np.ndarray:
    """(batch, seq_len+1) token rows with an EOD ending each document; lengths ~ geometric(mean_doc)."""
    rows = rng.integers(3, vocab, size=(batch, seq_len + 1))
    for row in rows:
        pos = -1
        while True:
            pos += int(rng.geometric(1.0 / mean_doc))
            if pos > seq_len:
                break
            row[pos] = EOD
    return rows


def time_step(model: CausalLM, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(cpu seconds, wall seconds) of one forward+backward."""
    cuda = batch["input_ids"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    c0, t0 = time.process_time(), time.perf_counter()
    loss = model(**on_device(batch))  # flex: the block mask is built inside the timed region
    loss.backward()
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.process_time() - c0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["debug", "tiny"])
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[256, 512, 1024])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=8000, help="the CPU demo's tokenizer size")
    ap.add_argument("--mean-doc-len", type=int, default=200, help="mean packed document length, tokens")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time = work)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--mode", choices=["auto", "spans", "mask", "flex"], default="auto",
                    help="intra-doc kernel: one SDPA call per document span, one call with a dense mask, or "
                         "the trainer's choice (mask when documents average < SPAN_ATTENTION_MIN_MEAN_TOKENS = "
                         f"{SPAN_ATTENTION_MIN_MEAN_TOKENS})")
    args = ap.parse_args()
    min_mean = {"auto": SPAN_ATTENTION_MIN_MEAN_TOKENS, "spans": 0, "mask": 10**9, "flex": 0}[args.mode]
    kernel = "flex" if args.mode == "flex" else "spans"
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, "
          f"vocab {args.vocab_size}, mean doc {args.mean_doc_len} tokens, {args.iters} iterations, "
          f"intra-doc mode {args.mode}")
    print(f"{'preset':>7} {'seq':>5} {'causal cpu ms':>14} {'intra cpu ms':>13} {'ratio cpu':>10} "
          f"{'causal wall ms':>15} {'intra wall ms':>14} {'ratio wall':>11}")
    for preset in args.presets:
        cfg = get_preset(preset, vocab_size=args.vocab_size,
                         max_position_embeddings=max(args.seq_lens + [get_preset(preset).max_position_embeddings]))
        model = build_model(cfg).to(dev, dtype).train()
        model.loss_chunk_tokens = 2048
        for seq_len in args.seq_lens:
            rows = packed_rows(args.batch_size, seq_len, args.vocab_size, args.mean_doc_len, rng)
            causal = make_batch(rows, EOD)
            intra = document_attention(make_batch(rows, EOD, reset_position_ids=True, intra_doc_attention=True),
                                       min_mean_tokens=min_mean, kernel=kernel)
            causal, intra = ({k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                             for b in (causal, intra))
            times: dict[str, list[tuple[float, float]]] = {"causal": [], "intra": []}
            for i in range(args.warmup + args.iters):
                for name, batch in (("causal", causal), ("intra", intra)):
                    dt = time_step(model, batch)
                    if i >= args.warmup:
                        times[name].append(dt)
            cc, ic = (min(t[0] for t in times[n]) for n in ("causal", "intra"))
            cw, iw = (min(t[1] for t in times[n]) for n in ("causal", "intra"))
            print(f"{preset:>7} {seq_len:>5} {cc * 1e3:>14.1f} {ic * 1e3:>13.1f} {ic / cc:>10.3f} "
                  f"{cw * 1e3:>15.1f} {iw * 1e3:>14.1f} {iw / cw:>11.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Peak memory and time of the loss head (lm_head + cross-entropy, forward and backward), whole vs chunked.

    .venv/bin/python benchmarks/loss_memory.py [--preset 125m] [--seq-len 4096] [--batch 4]
                                               [--dtype fp32 bf16] [--chunks 0 8192 2048]

Each (dtype, chunk) runs in a fresh subprocess, so its peak RSS is its own: the final hidden states
(B, T, d) and the lm_head weight of the preset at vocab 32,000 are built, RSS is read, then the loss
(``model.llama.LMHead`` with ``chunk_tokens`` for chunk > 0, the whole-logits ``F.cross_entropy`` for 0) is
computed and back-propagated, and the peak RSS growth, the seconds and the loss are printed, with the
ratios to the unchunked run. The whole-logits path holds the (B*T, V) logits, their fp32 copy (bf16) and
the log-softmax; the chunked one a chunk of each. CPU figures; on a GPU the same holds for allocated
memory (``torch.cuda.max_memory_allocated``), which this script reports when CUDA is present.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.memory import rss_mib  # noqa: E402


def child(preset: str, seq_len: int, batch: int, dtype: str, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lmforge.model import IGNORE_INDEX, get_preset
    from lmforge.model.common import LMHead

    torch.manual_seed(0)
    cfg = get_preset(preset, vocab_size=32000)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False).to(dev, dt)
    h = torch.randn(batch, seq_len, cfg.hidden_size, device=dev, dtype=dt, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=dev)
    base = rss_mib()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if chunk:
        loss = head(h, labels, chunk)
    else:
        logits = head(h)
        loss = F.cross_entropy(logits.float().view(-1, cfg.vocab_size), labels.view(-1), ignore_index=IGNORE_INDEX)
    loss.backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt_s = time.perf_counter() - t0
    out = {"dtype": dtype, "chunk": chunk, "seconds": dt_s, "loss": loss.item(),
           "growth_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}
    if dev == "cuda":
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--chunks", nargs="+", type=int, default=[0, 8192, 2048], help="0 = whole logits")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.preset, a.seq_len, a.batch, a.child[0], int(a.child[1]))))
        return
    print(f"loss head of {a.preset} (vocab 32000), batch {a.batch} x seq {a.seq_len} = {a.batch * a.seq_len} tokens")
    print(f"{'dtype':<6}{'chunk':>7}{'peak growth MiB':>17}{'vs whole':>10}{'seconds':>9}{'vs whole':>10}"
          f"{'loss':>11}")
    for dtype in a.dtype:
        ref = None
        for chunk in a.chunks:
            cmd = [sys.executable, __file__, "--preset", a.preset, "--seq-len", str(a.seq_len), "--batch",
                   str(a.batch), "--child", dtype, str(chunk)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            ref = ref or r
            mem = r.get("cuda_peak_mib", r["growth_mib"])
            ref_mem = ref.get("cuda_peak_mib", ref["growth_mib"])
            print(f"{dtype:<6}{chunk or 'whole':>7}{mem:>17.0f}{mem / ref_mem:>10.2f}{r['seconds']:>9.2f}"
                  f"{r['seconds'] / ref['seconds']:>10.2f}{r['loss']:>11.6f}", flush=True)


if __name__ == "__main__":
    main()

"""Activation checkpointing: peak memory and gradients of one forward+backward, per mode (CPU).

    .venv/bin/python benchmarks/activation_checkpointing.py [--preset 125m] [--seq-len 1024] [--batch 1]

Each mode runs in a fresh subprocess (so peak RSS is its own): build the model (seeded, identical in
every mode), measure RSS, run forward+backward on a fixed batch, and report the peak RSS growth over the
built model (activations + gradients + allocator slack), the time, and the max |grad difference| to the
mode without checkpointing. Modes:

* ``off``          no checkpointing
* ``every2``       torch non-reentrant checkpoint on every 2nd decoder layer (parallel.activation_checkpointing=2)
* ``every1``       torch non-reentrant checkpoint on every layer (parallel.activation_checkpointing=1)
* ``deepspeed``    deepspeed.checkpointing.checkpoint (reentrant, no partitioning; comparison only)

Timings on a shared 2-core machine are indicative only; the memory and gradient figures are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.memory import rss_mib  # noqa: E402

MODES = ("off", "every2", "every1", "deepspeed")


def child(mode: str, preset: str, seq_len: int, batch: int, grads_out: str) -> dict:
    import torch

    from lmforge.model import build_model, get_preset

    torch.manual_seed(0)
    model = build_model(get_preset(preset)).train()
    if mode == "deepspeed":
        import deepspeed

        from lmforge.trainer.parallel import distributed, transforms

        # Swap the trainer's checkpoint function for DeepSpeed's (the model itself never imports DeepSpeed).
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29571"))
        distributed.init()  # deepspeed.checkpointing.configure() asks for the rank
        deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=False)
        transforms.checkpoint = lambda fn, *args, use_reentrant=False: deepspeed.checkpointing.checkpoint(fn, *args)
        transforms.apply_activation_checkpointing(model, 1)
    else:
        from lmforge.trainer.parallel.transforms import apply_activation_checkpointing

        apply_activation_checkpointing(model, {"off": 0, "every2": 2, "every1": 1}[mode])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=gen)
    base = rss_mib()
    t0 = time.perf_counter()
    loss = model(ids[:, :-1], labels=ids[:, 1:])
    loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    torch.save({n: p.grad for n, p in model.named_parameters()}, grads_out)
    grads_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"mode": mode, "base_mib": base, "peak_mib": peak, "growth_mib": peak - base, "seconds": dt,
            "loss": loss.item(), "grads_mib": grads_mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--grads-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.preset, a.seq_len, a.batch, a.grads_out)))
        return

    import tempfile

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes.split(","):
            gpath = f"{tmp}/{mode}.pt"
            p = subprocess.run([sys.executable, __file__, "--child", mode, "--preset", a.preset, "--seq-len",
                                str(a.seq_len), "--batch", str(a.batch), "--grads-out", gpath],
                               env=env, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{mode}: failed\n{p.stderr[-2000:]}")
                continue
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["grads"] = gpath
            rows.append(row)
            print(f"ran {mode}", file=sys.stderr)
        ref = next((r for r in rows if r["mode"] == "off"), None)
        ref_grads = torch.load(ref["grads"], weights_only=True) if ref else None
        print(f"{a.preset}, batch {a.batch} × seq {a.seq_len}, fp32, one forward+backward on CPU")
        # Peak growth = gradients (fixed, listed) + activations kept for backward + logits/loss buffers.
        print(f"gradients: {rows[0]['grads_mib']:.0f} MiB of the growth in every mode" if rows else "no rows")
        head = ("mode", "peak growth MiB", "vs off", "minus grads", "vs off", "seconds", "max |dgrad|", "loss")
        print(f"{head[0]:10s} {head[1]:>16s} {head[2]:>7s} {head[3]:>12s} {head[4]:>7s} {head[5]:>8s} {head[6]:>12s} "
              f"{head[7]:>10s}")
        for r in rows:
            g = torch.load(r["grads"], weights_only=True)
            diff = max((g[n] - ref_grads[n]).abs().max().item() for n in g) if ref_grads else float("nan")
            ratio = r["growth_mib"] / ref["growth_mib"] if ref else float("nan")
            act = r["growth_mib"] - r["grads_mib"]
            act_ratio = act / (ref["growth_mib"] - ref["grads_mib"]) if ref else float("nan")
            print(f"{r['mode']:10s} {r['growth_mib']:16.0f} {ratio:7.2f} {act:12.0f} {act_ratio:7.2f} "
                  f"{r['seconds']:8.1f} {diff:12.3g} {r['loss']:10.6f}")


if __name__ == "__main__":
    main()

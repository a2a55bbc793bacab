"""``python -m lmforge.trainer.plan CONFIG [section.key=value ...] --gpus N --gpus-per-node G --gpu NAME``
(also ``lmforge plan ...``): will the run fit each GPU, how fast will it run, and which layouts fit, best
first (docs/planning.md). Nothing is allocated: the model runs on fake tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmforge.common.errors import run_cli

from ..config import load_config
from .gpus import GPUS, parse_gpu
from .search import plan

LINES = (("weights", "weights"), ("gradients", "grads"), ("optimizer_states", "optim"),
         ("gradients_fp32", "fp32 g"), ("activations", "acts"), ("loss_head", "head"), ("buffers", "buffers"),
         ("reserve", "reserve"))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="lmforge plan",
        description="Plan a run config on a GPU cluster: per-GPU memory (weights, gradients, optimizer states, "
        "activations measured from the model's code on fake tensors, loss head, DeepSpeed buffers, allocator "
        "reserve), whether it fits, predicted step time, tokens/s and MFU, and the layouts that fit, best first. "
        "Never allocates the model.",
        epilog="Example: python -m lmforge.trainer.plan configs/llama_1b.yaml --gpus 32 --gpus-per-node 8 --gpu h100")
    ap.add_argument("config", help="run config YAML (as for training)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides (YAML values), as for training")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    ap.add_argument("--gpu", default="h100", help=f"{' | '.join(GPUS)} | custom:MEM_GIB,PEAK_TFLOPS,INTRA_GBPS,"
                    "INTER_GBPS (default h100)")
    ap.add_argument("--top", type=int, default=8, help="how many fitting layouts to list (default 8; 0 = none)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON to FILE")
    a = ap.parse_args(argv)
    if a.gpus < 1 or a.gpus_per_node < 1:
        ap.error("--gpus and --gpus-per-node must be >= 1")
    try:
        a.gpu_spec = parse_gpu(a.gpu)
    except ValueError as e:
        ap.error(str(e))
    return a


def _gib(x: float) -> str:
    return f"{x:.1f}"


def _layout_name(lay: dict) -> str:
    s = f"ZeRO-{lay['zero_stage']}"
    if lay["tp"] > 1:
        s += f" tp{lay['tp']}"
    if lay["sp"] > 1:
        s += f" sp{lay['sp']}"
    if lay["ep"]:
        s += f" ep{lay['ep']}"
    if lay["activation_checkpointing"]:
        s += f" ac{lay['activation_checkpointing']}"
    if lay["offload"] != "none":
        s += " off:" + ("opt" if lay["offload"] == "optimizer" else "opt+p")
    if lay["hpz"] > 1:
        s += f" hpz{lay['hpz']}"
    return s


def _row(i, r: dict) -> list[str]:
    lay, t, m = r["layout"], r.get("time", {}), r["memory_gib"]
    return ([str(i), _layout_name(lay), f"{lay['micro_batch']}×{lay['grad_accum']}",
             f"{t['step_s']:.3f}" if t else "-", f"{t['tokens_per_s']:,.0f}" if t else "-",
             f"{100 * t['mfu']:.1f}%" if t else "-"]
            + [_gib(m[k]) for k, _ in LINES] + [_gib(r["total_gib"]), _gib(r.get("free_gib", 0.0))])


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "  ".join(str(x).rjust(w) if j else str(x).ljust(w) for j, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def render(p: dict, elapsed: float | None = None) -> str:
    m, c, run = p["model"], p["cluster"], p["run"]
    gpu = c["gpu"]
    active = f", {m['active_params'] / 1e9:.2f} B active" if m["active_params"] != m["params"] else ""
    tokens = p["global_batch"] * p["seq_len"]
    nodes = max(1, c["gpus"] // c["gpus_per_node"])
    out = [f"lmforge plan: {m['preset'] or m['family']} ({m['family']}, {m['params'] / 1e9:.2f} B params{active}, "
           f"{m['layers']} layers, vocab {m['vocab_size']:,}) | {p['precision']} | seq {p['seq_len']} | global batch "
           f"{p['global_batch']} × {p['seq_len']} = {tokens:,} tokens/step | {c['gpus']} × {gpu['name']} "
           f"({gpu['memory_gib']} GiB, {gpu['peak_tflops']:g} TFLOP/s) on {nodes} node{'s' if nodes > 1 else ''}"]
    for n in p["notes"]:
        out.append(f"note: {n}")
    lay = run["layout"]
    out.append(f"\nrun config: {_layout_name(lay)}, micro-batch {lay['micro_batch']} × accumulation "
               f"{lay['grad_accum']}{', compiled layers' if p['compiled'] else ''}")
    out.append(f"  {run['verdict']}")
    if "time" in run:
        t, eff = run["time"], p["assumptions"]["efficiency"]
        out.append(f"  predicted: {t['step_s']:.3f} s/step (compute {t['compute_s']:.3f}, exposed communication "
                   f"{t['comm_exposed_s']:.3f} of {t['comm_total_s']:.3f}"
                   + (f", offload {t['offload_s']:.3f}" if t["offload_s"] else "")
                   + f") | {t['tokens_per_s']:,.0f} tokens/s | MFU {100 * t['mfu']:.1f}%")
        out.append(f"  compute efficiency {eff['mfu']:.3f} = MFU measured on one H200 ({eff['variant']}: "
                   f"{eff['what']}; {eff['source']})")
    if "memory_gib" in run:
        mem = run["memory_gib"]
        out.append("  per GPU (GiB): " + " | ".join(f"{label} {_gib(mem[k])}" for k, label in LINES)
                   + f" | total {_gib(run['total_gib'])} (allocated peak {_gib(run['peak_allocated_gib'])})")
        if run.get("host_gib_per_node"):
            out.append(f"  host memory for offload: {run['host_gib_per_node']:.0f} GiB per node")
        out.append(f"  as overrides: {run['overrides']}")
    layouts = p.get("layouts")
    if layouts is not None:
        head = ["#", "layout", "mb×acc", "step s", "tokens/s", "MFU", *(label for _, label in LINES), "total", "free"]
        if layouts:
            out.append(f"\nlayouts that fit, best first (same global batch; memory per GPU in GiB; reserve = "
                       f"{p['assumptions']['reserve']}):")
            out.append(_table([_row(i + 1, r) for i, r in enumerate(layouts)], head))
            out.append(f"best as overrides: {layouts[0]['overrides']}")
        else:
            out.append("\nno layout fits this model at this global batch on these GPUs")
    if elapsed is not None:
        out.append(f"(planned in {elapsed:.1f} s)")
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)

    def go() -> int:
        t0 = time.perf_counter()
        cfg = load_config(a.config, a.overrides)
        p = plan(cfg, a.gpus, a.gpus_per_node, a.gpu_spec, top=a.top, search_layouts=a.top > 0)
        print(render(p, time.perf_counter() - t0))
        if a.json:
            path = Path(a.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(p, indent=1, default=str) + "\n")
        return 0

    return run_cli(go, prog="lmforge plan")


if __name__ == "__main__":
    sys.exit(main())

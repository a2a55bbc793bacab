#!/usr/bin/env bash
# The prepared GPU check: one command that runs on a bare GPU machine (a lent H200: 15 device minutes per
# issue, so this aims at <= 9 minutes and every section has its own time limit) and ends with one summary
# table plus a JSON of everything it measured.
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (the device tool's folder) or runs/gpu_check
#
# Sections, in order of value (a section that fails or runs out of time is reported and the next one runs):
#   1. env         GPU, driver, torch/DeepSpeed/transformers versions
#   2. throughput  benchmarks/train_throughput.py, 1b preset, bf16, seq 4096, micro batch 4, ZeRO-1, packed
#                  documents of ~500 tokens: eager vs compiled layers x causal vs intra-document attention
#                  (flex block mask; per-span SDPA eager only) -> tokens/s, TFLOP/s, MFU
#   3. tests       pytest tests/gpu (fp16 loss scaling, NCCL, flash and document-masked attention parity,
#                  the no-sync test, compiled flex training vs eager, bf16 ZeRO-1/ZeRO-3 through the
#                  trainer, bf16 export verified)
#   4. attention   benchmarks/intra_doc_attention.py on the GPU: 125m, seq 4096/8192, flex and spans vs causal
#   5. qwen3       benchmarks/train_throughput.py, qwen3-1.7b preset (vocab 151,936), bf16, seq 4096, micro batch 2,
#                  ZeRO-1, ~500-token documents, compiled layers with flex document masking -> tokens/s, MFU
#   6. moe         benchmarks/train_throughput.py, qwen3-moe-olmoe-1b-7b preset (OLMoE-1B-7B's shape: 64 experts of
#                  width 1024, top 8; vocab 50,304) cut to 8 of its 16 layers (3.56B total / 0.74B active params),
#                  bf16, seq 4096, micro batch 2, ZeRO-1, every layer recomputed, ~500-token documents, eager, one
#                  process: DeepSpeed AutoEP grouped-GEMM experts (--expert-parallel 1) vs the model's per-expert
#                  loop (--expert-parallel 0) -> tokens/s, active-parameter MFU, peak memory, step-time ratio;
#                  section 2's dense 1b eager:causal row printed beside
#
# Machines without DeepSpeed and the pipeline's extras (the H200 image has torch, transformers,
# sentencepiece, tensorboard, mpi4py, but no deepspeed, zstandard or pydantic): put their wheels in .whl/
# first (README, "The GPU check"); they are installed into /tmp/site and put on PYTHONPATH/PATH.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MASTER_ADDR=127.0.0.1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# lmforge's packages import as lmforge.* (pyproject.toml maps them onto the top-level folders). Without an
# installed lmforge (a bare GPU machine), a namespace folder of links to them does the same.
if ! "$PY" -c "import lmforge.trainer" 2>/dev/null; then
  mkdir -p /tmp/lmforge-src/lmforge
  for d in common data_pipeline model trainer; do ln -sfn "$PWD/$d" "/tmp/lmforge-src/lmforge/$d"; done
  export PYTHONPATH="/tmp/lmforge-src:$PYTHONPATH"
fi
T0=$(date +%s)
status() { echo "$1 $2 $(( $(date +%s) - T0 ))" >> "$OUT/sections.txt"; echo "=== [$(( $(date +%s) - T0 ))s] $1: $2"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi

# 1. env
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  "$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| cuda', torch.version.cuda,
'| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1 && status env ok || status env FAILED
cat "$OUT/env.txt"

# 2. throughput
timeout 170 "$PY" benchmarks/train_throughput.py --preset 1b --precision bf16 --seq-len 4096 --micro-batch 4 \
  --zero-stage 1 --warmup 2 --steps 8 --mean-doc-len 500 \
  --variants eager:causal,eager:flex,eager:spans,compiled:causal,compiled:flex \
  --json "$OUT/throughput.json" > "$OUT/throughput.log" 2>&1 && status throughput ok || status throughput "FAILED($?)"
grep -v -i "warn" "$OUT/throughput.log" | tail -12

# 3. tests
timeout 260 "$PY" -m pytest -q -p no:cacheprovider tests/gpu -rA --durations=0 --junitxml="$OUT/pytest.xml" \
  > "$OUT/pytest.log" 2>&1 && status tests ok || status tests "FAILED($?)"
grep -E "passed|failed|PASSED|FAILED|ERROR|Error|assert" "$OUT/pytest.log" | tail -25

# 4. attention
for mode in flex spans; do
  timeout 60 "$PY" benchmarks/intra_doc_attention.py --device cuda --presets 125m --seq-lens 4096 8192 \
    --mean-doc-len 500 --vocab-size 32000 --iters 5 --mode $mode > "$OUT/attention_$mode.log" 2>&1 \
    && status "attention_$mode" ok || status "attention_$mode" "FAILED($?)"
  tail -3 "$OUT/attention_$mode.log"
done

# 5. qwen3: the second family at a real size
timeout 120 "$PY" benchmarks/train_throughput.py --preset qwen3-1.7b --vocab-size 151936 --precision bf16 \
  --seq-len 4096 --micro-batch 2 --zero-stage 1 --warmup 2 --steps 6 --mean-doc-len 500 --variants compiled:flex \
  --json "$OUT/throughput_qwen3.json" > "$OUT/throughput_qwen3.log" 2>&1 && status qwen3 ok || status qwen3 "FAILED($?)"
grep -v -i "warn" "$OUT/throughput_qwen3.log" | tail -4

# 6. moe: OLMoE-1B-7B's shape in 8 of its 16 layers (3.56B total, 0.74B active params). All 16 layers do not fit
# one H200 at seq 4096: 6.9B params x 16 bytes (bf16 weights and gradients, fp32 masters, Adam's two moments)
# ~ 110 GB before activations. Every layer recomputed (MFU does not count the recomputation), so the dense row
# beside (section 2, no recomputation, micro batch 4) is a reference, not a like-for-like comparison; the two
# MoE rows differ only in the experts' implementation. AutoEP (grouped GEMM) first: it is the one that matters.
for ep in 1 0; do
  timeout 90 "$PY" benchmarks/train_throughput.py --preset qwen3-moe-olmoe-1b-7b --num-layers 8 --vocab-size 50304 \
    --precision bf16 --seq-len 4096 --micro-batch 2 --zero-stage 1 --activation-checkpointing 1 --warmup 2 --steps 5 \
    --mean-doc-len 500 --expert-parallel $ep --json "$OUT/throughput_moe_ep$ep.json" > "$OUT/throughput_moe_ep$ep.log" 2>&1 \
    && status "moe_ep$ep" ok || status "moe_ep$ep" "FAILED($?)"
  grep -v -i "warn" "$OUT/throughput_moe_ep$ep.log" | tail -3
done

"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"sections": {l.split()[0]: l.split()[1] for l in (out / "sections.txt").read_text().splitlines()},
           "env": (out / "env.txt").read_text().strip()}
rows = []
if (out / "throughput.json").exists():
    t = json.loads((out / "throughput.json").read_text())
    summary["throughput"] = t
    base = t.get("eager:causal", {}).get("step_time_median_s")
    for v in t["variants"]:
        r = t[v]
        rows.append((f"1b bf16 seq4096 mb4 {v}", f"{r['tokens_per_s']:,.0f} tok/s", f"{r['tflops_per_device']:.0f} TFLOP/s",
                     f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "MFU n/a",
                     f"x{r['step_time_median_s'] / base:.3f} vs eager:causal" if base else ""))
    rows.append(("compile time (first compiled step)", f"{t.get('compile_s') or 0:.0f} s", "", "", ""))
    rows.append(("peak memory", f"{t['peak_memory_gb']:.1f} GiB", "", "", ""))
if (out / "throughput_qwen3.json").exists():
    t = json.loads((out / "throughput_qwen3.json").read_text())
    summary["throughput_qwen3"] = t
    for v in t["variants"]:
        r = t[v]
        rows.append((f"qwen3-1.7b bf16 seq4096 mb2 {v}", f"{r['tokens_per_s']:,.0f} tok/s",
                     f"{r['tflops_per_device']:.0f} TFLOP/s", f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "MFU n/a",
                     f"peak {t['peak_memory_gb']:.1f} GiB"))
moe = {ep: json.loads((out / f"throughput_moe_ep{ep}.json").read_text())
       for ep in (1, 0) if (out / f"throughput_moe_ep{ep}.json").exists()}
for ep, t in moe.items():
    summary[f"throughput_moe_ep{ep}"] = t
    r = t["ours"]
    reserved = t.get("peak_memory_reserved_gb")
    rows.append((f"moe olmoe-1b-7b {t['num_layers']}/16 layers ({t['params_total'] / 1e9:.2f}B total, "
                 f"{t['params_active'] / 1e9:.2f}B active) bf16 seq{t['seq_len']} mb{t['micro_batch']} "
                 f"ckpt{t['activation_checkpointing']} EP{ep} " + ("AutoEP grouped GEMM" if ep else "reference loop"),
                 f"{r['tokens_per_s']:,.0f} tok/s", f"{r['tflops_per_device']:.0f} TFLOP/s",
                 f"MFU (active params) {100 * r['mfu']:.1f}%" if r.get("mfu") else "MFU n/a",
                 f"peak {t['peak_memory_gb']:.1f} GiB allocated"
                 + (f" / {reserved:.1f} GiB reserved" if reserved is not None else "")))
if len(moe) == 2:
    g, l = moe[1]["ours"]["step_time_median_s"], moe[0]["ours"]["step_time_median_s"]
    summary["moe_grouped_over_loop"] = g / l
    rows.append(("moe step time grouped GEMM / loop", f"x{g / l:.3f}", f"{1e3 * g:.0f} ms vs {1e3 * l:.0f} ms", "", ""))
if moe and "throughput" in summary and "eager:causal" in summary["throughput"]:
    t = summary["throughput"]
    r = t["eager:causal"]
    size = f" ({t['params_total'] / 1e9:.2f}B)" if t.get("params_total") else ""
    rows.append((f"beside moe: dense {t['preset']}{size} eager:causal seq{t['seq_len']} mb{t['micro_batch']} "
                 f"ckpt{t.get('activation_checkpointing', 0)} (section 2)",
                 f"{r['tokens_per_s']:,.0f} tok/s", f"{r['tflops_per_device']:.0f} TFLOP/s",
                 f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "MFU n/a",
                 f"peak {t['peak_memory_gb']:.1f} GiB allocated (all section-2 variants)"))
for mode in ("flex", "spans"):
    f = out / f"attention_{mode}.log"
    if f.exists():
        for line in f.read_text().splitlines():
            m = re.match(r"\s*(\S+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", line)
            if m:
                rows.append((f"attention {m[1]} seq {m[2]} {mode}", f"causal {m[3]} ms", f"intra {m[4]} ms",
                             f"x{m[5]}", ""))
                summary.setdefault("attention", []).append({"preset": m[1], "seq": int(m[2]), "mode": mode,
                                                            "causal_ms": float(m[3]), "intra_ms": float(m[4])})
p = out / "pytest.log"
if p.exists():
    tail = [l for l in p.read_text().splitlines() if re.search(r"\d+ (passed|failed)", l)]
    summary["tests"] = tail[-1] if tail else "no result line"
    rows.append(("pytest tests/gpu", summary["tests"], "", "", ""))
print("\n==== GPU check summary ====")
for k, v in summary["sections"].items():
    print(f"  section {k}: {v}")
for r in rows:
    print("  " + " | ".join(x for x in r if x))
(out / "summary.json").write_text(json.dumps(summary, indent=1))
EOF
echo "total $(( $(date +%s) - T0 ))s"

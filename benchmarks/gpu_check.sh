#!/usr/bin/env bash
# The prepared GPU check, v2: one command that runs on a bare GPU machine (a lent H200: 15 device minutes per
# issue, so the check holds itself to a 540-s budget) and ends with one summary table plus a JSON of everything
# it measured (summary.json under $OUT).
#
#   bash benchmarks/prepare_gpu_wheels.sh   # once, on a machine with PyPI: fills .whl/ (git-ignored; carry it)
#   bash benchmarks/gpu_check.sh            # on the GPU machine; results under $OUT (the device tool's folder)
#                                           # or runs/gpu_check
#
# Sections, in order of value (each under its own time limit; a section that fails or runs out of time is
# reported and the next one runs). Limits in seconds; each is also clipped to what is left of the budget
# (GPU_CHECK_BUDGET, default 540, less 10 s kept for the summary), and a section left with under 20 s is
# skipped and reported so: whatever runs long, the check ends within the budget (plus at most 5 s for a
# killed section's exit) and loses the least valuable sections. The ceilings add up to 1,040 s (1,115 s with
# the 7b ZeRO-3 fallback), the budget to 540 s. Expected (estimated from the 2026-11-29 run, v2 not yet run):
# setup ~15 s, a. ~145 s, b. ~50 s, c. ~65 s, d. ~165 s: ~440 s, leaving f. ~90 s, enough for
# test_fp8_gpu.py; test_gpu.py (195 s in 2026-11-29) is then cut, and runs whole with GPU_CHECK_BUDGET=800.
#   setup   75  install .whl/ into /tmp/site (45: what the image lacks: DeepSpeed, torchao, pydantic, ...);
#               the versions (30)
#   a. 1b, seq 4096, micro batch 4, ZeRO-1, compiled layers, flex document masking, ~500-token documents
#      (benchmarks/train_throughput.py): tokens/s, MFU (PaLM and causal_doc), peak memory
#      a_bf16                 75  bf16 (the 2026-11-29 best), plus e. below
#      a_fp8_tensorwise       70  train.precision fp8, tensorwise scaling (the trainer's conversion; MFU against
#                                 the bf16 peak)
#      a_fp8_rowwise          70  fp8, rowwise scaling
#   b. b_trainer              90  the product itself: 1b through `deepspeed --num_gpus 1 --module
#                                 lmforge.trainer.train` (benchmarks/trainer_throughput.py: the sample corpus cut
#                                 into ~500-token documents, tokenized into real shards, 30 steps, bf16, compiled,
#                                 flex) -> its own logged tokens/s and MFU (both conventions) beside a_bf16's
#   c. c_hf                   90  the same 1b shape as transformers' LlamaForCausalLM (SDPA causal), then with
#                                 its layers compiled, under the same DeepSpeed config on the same batches,
#                                 alternating rounds against ours (compiled, causal) -> tokens/s, ours/theirs
#   d. bigger models on the one GPU (memory arithmetic: docs/benchmarks.md), peak memory printed
#      d_7b_bf16              80  7b, ZeRO-1, micro batch 2, every layer recomputed, compiled flex
#      d_7b_bf16_zero3        75  only if d_7b_bf16 ran out of memory: the same at ZeRO-3 (its optimizer steps
#                                 in sub-groups: no whole-model fp32 gradient copy); d_7b_fp8 then uses ZeRO-3
#      d_7b_fp8               80  7b fp8 tensorwise, as d_7b_bf16
#      d_3b_bf16              55  3b, ZeRO-1, micro batch 4, no recomputation, compiled flex
#      d_3b_fp8               55  3b fp8 tensorwise
#   e. (inside a_bf16: --profile-sync 3) DeepSpeed's per-step host reads: host time blocked in CUDA
#      synchronisation per step, by phase (DeepSpeed's forward/backward/step vs the loop's own loss read), and
#      the GPU idle time that follows them -> ms per step and % of the step
#   f. f_tests               300  pytest -v tests/gpu: test_fp8_gpu.py first (fp8 parity against bf16 with
#                                 float8 kernels, both recipes; the fp8 benchmark and its sync profile, small;
#                                 fp8 ZeRO-3 through the trainer, exported and verified), then test_gpu.py (fp16
#                                 loss scaling, NCCL, flash and document-masked attention parity, the no-sync
#                                 test, compiled flex vs eager, bf16 ZeRO-3 export);
#                                 a cut run keeps the results of the tests that finished
# GPU_CHECK_EXTRA=1 (with a larger GPU_CHECK_BUDGET) also runs the v1 sections after them: the attention
# benchmark (125m), qwen3-1.7b, and the OLMoE-1B-7B-shaped MoE (AutoEP grouped GEMM vs the loop).
#
# Machines without DeepSpeed and the project's extras: prepare_gpu_wheels.sh writes .whl/install.txt and the
# wheels; they are installed here into /tmp/site (PYTHONPATH/PATH): "always" ones in any case, "if-absent" ones
# only where the image lacks the distribution. A .whl/ of bare wheels (no install.txt) is installed whole.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
RESERVE=10  # seconds kept for the summary
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MASTER_ADDR=127.0.0.1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# lmforge's packages import as lmforge.* (pyproject.toml maps them onto the top-level folders). Without an
# installed lmforge (a bare GPU machine), a namespace folder of links to them does the same.
if ! "$PY" -c "import lmforge.trainer" 2>/dev/null; then
  mkdir -p /tmp/lmforge-src/lmforge
  for d in common data_pipeline model trainer; do ln -sfn "$PWD/$d" "/tmp/lmforge-src/lmforge/$d"; done
  export PYTHONPATH="/tmp/lmforge-src:$PYTHONPATH"
fi
# A re-run into the same folder starts clean (a section that does not run leaves no result of an earlier run).
rm -f "$OUT"/{a,b,c,d}_*.{json,log} "$OUT"/b_trainer_metrics.jsonl "$OUT"/throughput*.{json,log} \
  "$OUT"/attention_*.log "$OUT"/{summary.json,pytest.log,pytest.xml,setup.log,env.txt,limits.txt}
T0=$(date +%s)
: > "$OUT/sections.txt"
elapsed() { echo $(( $(date +%s) - T0 )); }
status() { echo "$1 $2 $(elapsed)" >> "$OUT/sections.txt"; echo "=== [$(elapsed)s] $1: $2"; }
# run NAME CEILING LOG CMD...: CMD with stdout+stderr to LOG, under CEILING seconds clipped to the budget left.
run() {
  local name=$1 ceiling=$2 log=$3
  shift 3
  local left=$(( BUDGET - RESERVE - $(elapsed) ))
  local limit=$(( ceiling < left ? ceiling : left ))
  if (( limit < 20 )); then status "$name" "SKIPPED(${left}s-of-budget-left)"; return 99; fi
  echo "$name $limit" >> "$OUT/limits.txt"
  timeout -k 5 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  if (( rc == 0 )); then status "$name" ok
  elif (( rc == 124 || rc == 137 )); then status "$name" "TIMEOUT(${limit}s)"
  else status "$name" "FAILED($rc)"; fi
  return $rc
}
show() { grep -v -i -E "warn|^\s*$" "$1" 2>/dev/null | tail -"${2:-6}"; }

# setup: wheels, then versions (the env section of v1)
if [ -f .whl/install.txt ]; then
  reqs=$("$PY" - <<'EOF'
import importlib.metadata as md
for line in open(".whl/install.txt"):
    kind, req = line.split()
    try:
        have = md.version(req.split("==")[0])
    except md.PackageNotFoundError:
        have = None
    if kind == "always" or have is None:
        print(req)
EOF
)
  # shellcheck disable=SC2086
  timeout 45 "$PY" -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $reqs > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; echo "installing .whl/ failed"; exit 1; }
  echo "installed from .whl/: $reqs" | tr '\n' ' ' >> "$OUT/setup.log"
elif compgen -G ".whl/*.whl" > /dev/null; then
  timeout 45 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; echo "installing .whl/ failed"; exit 1; }
fi
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  timeout 30 "$PY" -c "import sys, torch, deepspeed, transformers, torchao, pydantic; print('python', sys.version.split()[0],
'| torch', torch.__version__, '| cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| transformers',
transformers.__version__, '| torchao', torchao.__version__, '| pydantic', pydantic.__version__, '|',
torch.cuda.get_device_name(), '| capability', torch.cuda.get_device_capability(), '| memory %.1f GiB'
% (torch.cuda.get_device_properties(0).total_memory / 2**30))"
} > "$OUT/env.txt" 2>&1 && status setup ok || status setup FAILED
cat "$OUT/env.txt"

# a. 1b: bf16 compiled flex, fp8 tensorwise, fp8 rowwise (e.: the host-sync profile rides on the bf16 run)
TT=("$PY" benchmarks/train_throughput.py --preset 1b --seq-len 4096 --micro-batch 4 --zero-stage 1
    --mean-doc-len 500 --variants compiled:flex --warmup 2 --steps 8)
run a_bf16 75 "$OUT/a_bf16.log" "${TT[@]}" --precision bf16 --profile-sync 3 --json "$OUT/a_bf16.json"
show "$OUT/a_bf16.log" 8
for recipe in tensorwise rowwise; do
  run "a_fp8_$recipe" 70 "$OUT/a_fp8_$recipe.log" "${TT[@]}" \
    --precision fp8 --fp8-recipe $recipe --json "$OUT/a_fp8_$recipe.json"
  show "$OUT/a_fp8_$recipe.log" 5
done

# b. the trainer itself (stopped once step 30 is logged: the final 14-GB checkpoint is not the point here)
run b_trainer 90 "$OUT/b_trainer.log" "$PY" benchmarks/trainer_throughput.py --preset 1b --seq-len 4096 \
  --micro-batch 4 --steps 30 --log-interval 10 --precision bf16 --zero-stage 1 --mean-doc-len 500 \
  --work /tmp/gpu_check_trainer --json "$OUT/b_trainer.json"
cp /tmp/gpu_check_trainer/run/metrics.jsonl "$OUT/b_trainer_metrics.jsonl" 2>/dev/null
show "$OUT/b_trainer.log" 4

# c. transformers' LlamaForCausalLM of the same shape, eager (SDPA causal) then compiled, against ours compiled
run c_hf 90 "$OUT/c_hf.log" "$PY" benchmarks/train_throughput.py --preset 1b --precision bf16 --seq-len 4096 \
  --micro-batch 4 --zero-stage 1 --mean-doc-len 500 --compare-hf --compile --compile-hf --warmup 2 --steps 4 \
  --rounds 2 --json "$OUT/c_hf.json"
show "$OUT/c_hf.log" 8

# d. 7b and 3b on the one GPU. 7b: 16 bytes/parameter of model states (108 GB) plus, for the optimizer step, a
# transient fp32 copy of the gradients at ZeRO-1/2 (4 bytes/parameter): ~126 GiB of 139.8; expandable segments
# keep that 25-GiB block from fragmenting the cache. Arithmetic: docs/benchmarks.md, "Memory: 3b and 7b on one H200".
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTORCH_ALLOC_CONF=expandable_segments:True
D7=("$PY" benchmarks/train_throughput.py --preset 7b --seq-len 4096 --micro-batch 2 --activation-checkpointing 1
    --mean-doc-len 500 --variants compiled:flex --warmup 1 --steps 3)
Z7=1
run d_7b_bf16 80 "$OUT/d_7b_bf16.log" "${D7[@]}" --zero-stage 1 --precision bf16 --json "$OUT/d_7b_bf16.json"
rc=$?
show "$OUT/d_7b_bf16.log" 4
if (( rc != 0 && rc != 99 )) && grep -q -i "out of memory" "$OUT/d_7b_bf16.log"; then
  Z7=3
  run d_7b_bf16_zero3 75 "$OUT/d_7b_bf16_zero3.log" "${D7[@]}" --zero-stage 3 --precision bf16 \
    --json "$OUT/d_7b_bf16_zero3.json"
  show "$OUT/d_7b_bf16_zero3.log" 4
fi
run d_7b_fp8 80 "$OUT/d_7b_fp8.log" "${D7[@]}" --zero-stage $Z7 --precision fp8 --fp8-recipe tensorwise \
  --json "$OUT/d_7b_fp8.json"
show "$OUT/d_7b_fp8.log" 5
D3=("$PY" benchmarks/train_throughput.py --preset 3b --seq-len 4096 --micro-batch 4 --zero-stage 1
    --activation-checkpointing 0 --mean-doc-len 500 --variants compiled:flex --warmup 1 --steps 4)
run d_3b_bf16 55 "$OUT/d_3b_bf16.log" "${D3[@]}" --precision bf16 --json "$OUT/d_3b_bf16.json"
show "$OUT/d_3b_bf16.log" 4
run d_3b_fp8 55 "$OUT/d_3b_fp8.log" "${D3[@]}" --precision fp8 --fp8-recipe tensorwise --json "$OUT/d_3b_fp8.json"
show "$OUT/d_3b_fp8.log" 5
unset PYTORCH_CUDA_ALLOC_CONF PYTORCH_ALLOC_CONF

# f. tests (-v: each result is printed when it finishes, so a cut run keeps what finished)
run f_tests 300 "$OUT/pytest.log" "$PY" -m pytest -v -p no:cacheprovider tests/gpu -rA --durations=10 \
  --junitxml="$OUT/pytest.xml"
grep -E " (PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/pytest.log" | grep -v "^PASSED\|^FAILED\|^SKIPPED" | tail -20

# v1 sections, on request (they need a budget beyond 540 s)
if [ "${GPU_CHECK_EXTRA:-0}" = 1 ]; then
  for mode in flex spans; do
    run "attention_$mode" 60 "$OUT/attention_$mode.log" "$PY" benchmarks/intra_doc_attention.py --device cuda \
      --presets 125m --seq-lens 4096 8192 --mean-doc-len 500 --vocab-size 32000 --iters 5 --mode $mode
    tail -3 "$OUT/attention_$mode.log"
  done
  run qwen3 120 "$OUT/throughput_qwen3.log" "$PY" benchmarks/train_throughput.py --preset qwen3-1.7b \
    --vocab-size 151936 --precision bf16 --seq-len 4096 --micro-batch 2 --zero-stage 1 --warmup 2 --steps 6 \
    --mean-doc-len 500 --variants compiled:flex --json "$OUT/throughput_qwen3.json"
  show "$OUT/throughput_qwen3.log" 4
  # OLMoE-1B-7B's shape in 8 of its 16 layers (3.56B total, 0.74B active params): all 16 do not fit one H200
  # at seq 4096 (6.9B params x 16 bytes ~ 110 GB before activations). AutoEP (grouped GEMM) first.
  for ep in 1 0; do
    run "moe_ep$ep" 90 "$OUT/throughput_moe_ep$ep.log" "$PY" benchmarks/train_throughput.py \
      --preset qwen3-moe-olmoe-1b-7b --num-layers 8 --vocab-size 50304 --precision bf16 --seq-len 4096 \
      --micro-batch 2 --zero-stage 1 --activation-checkpointing 1 --warmup 2 --steps 5 --mean-doc-len 500 \
      --expert-parallel $ep --json "$OUT/throughput_moe_ep$ep.json"
    show "$OUT/throughput_moe_ep$ep.log" 3
  done
fi

"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
sections = {}
for line in (out / "sections.txt").read_text().splitlines():
    name, state, at = line.split()
    sections[name] = {"status": state, "at_s": int(at)}
limits = {}
if (out / "limits.txt").exists():
    limits = {l.split()[0]: int(l.split()[1]) for l in (out / "limits.txt").read_text().splitlines()}
summary = {"sections": sections, "limits_s": limits,
           "env": (out / "env.txt").read_text().strip() if (out / "env.txt").exists() else None}
rows, targets = [], []


def load(name):
    f = out / f"{name}.json"
    if f.exists():
        summary[name] = json.loads(f.read_text())
        return summary[name]
    return None


def pct(x):
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def first(t):  # the run's one timed variant (--variants X alone: "ours")
    return t[t["variants"][0]]


def run_name(t):  # what the one timed run was: compiled:flex, eager:causal, ...
    return t.get("runs", {}).get(t["variants"][0], t["variants"][0])


def mfu(r):
    return f"MFU {pct(r.get('mfu'))} (causal_doc {pct(r.get('mfu_causal_doc'))})"


def mem(t):
    res = t.get("peak_memory_reserved_gb")
    tot = t.get("device_memory_gb")
    return (f"peak {t['peak_memory_gb']:.1f} GiB alloc" + (f" / {res:.1f} reserved" if res is not None else "")
            + (f" of {tot:.1f}" if tot else ""))


def on_gpu(*ts):  # targets count only figures measured on a GPU (a CPU smoke run's JSON has the same shape)
    return all(t and t.get("device") == "cuda" for t in ts)


def target(name, value, goal, shown):
    met = None if value is None else value >= goal
    targets.append({"target": name, "value": value, "goal": goal,
                    "met": "not measured" if met is None else ("met" if met else "not met")})
    rows.append((f"target: {name}", "NOT MEASURED" if met is None else ("MET" if met else "NOT MET"), shown, "", ""))


# a. 1b bf16 / fp8
a = {k: load(k) for k in ("a_bf16", "a_fp8_tensorwise", "a_fp8_rowwise")}
for k, t in a.items():
    if t:
        r = first(t)
        fp8 = t.get("fp8_layer_counts")
        rows.append((f"a. {t['preset']} {t['precision']}{' ' + t['fp8_recipe'] if t.get('fp8_recipe') else ''} seq{t['seq_len']} "
                     f"mb{t['micro_batch']} ZeRO-{t['zero_stage']} {run_name(t)}",
                     f"{r['tokens_per_s']:,.0f} tok/s", f"{r['tflops_per_device']:.0f} TFLOP/s", mfu(r),
                     f"{1e3 * r['step_time_median_s']:.0f} ms/step, {mem(t)}, compile {t.get('compile_s') or 0:.0f} s"
                     + (f", {fp8['converted']} layers fp8" if fp8 else "")))
base = a["a_bf16"] and first(a["a_bf16"])["tokens_per_s"]
for k in ("a_fp8_tensorwise", "a_fp8_rowwise"):
    if base and a[k]:
        summary[f"{k}_over_bf16"] = first(a[k])["tokens_per_s"] / base
        rows.append((f"a. {a[k]['preset']} {k[2:]} / bf16 tokens/s", f"x{summary[f'{k}_over_bf16']:.3f}", "", "", ""))
# e. host syncs (profiled on a_bf16)
sp = a["a_bf16"] and a["a_bf16"].get("sync_profile")
if sp and "error" in sp:
    rows.append(("e. DeepSpeed host reads: the profiler failed", sp["error"][:100], "", "", ""))
elif sp:
    ds, lp, step = sp["deepspeed"], sp["loop"], sp["profiled_step_ms"]
    summary["host_syncs"] = {"deepspeed_blocked_ms_per_step": ds["blocked_ms"],
                             "deepspeed_gpu_idle_after_ms_per_step": ds["gpu_idle_after_ms"],
                             "deepspeed_calls_per_step": ds["calls"], "profiled_step_ms": step,
                             "deepspeed_gpu_idle_frac": ds["gpu_idle_after_ms"] / step if step else None}
    rows.append((f"e. DeepSpeed host reads per step ({a['a_bf16']['preset']} bf16, profiled)", f"{ds['calls']:.1f} syncs",
                 f"host blocked {ds['blocked_ms']:.1f} ms", f"GPU idle after {ds['gpu_idle_after_ms']:.2f} ms "
                 f"({100 * ds['gpu_idle_after_ms'] / step if step else 0:.2f}% of {step:.0f} ms)",
                 f"loop's loss read: GPU idle after {lp['gpu_idle_after_ms']:.2f} ms; GPU busy {sp['gpu_busy_ms']:.0f} ms"))
# b. the trainer
b = load("b_trainer")
if b:
    rows.append((f"b. trainer {b['preset']} {b['precision']} seq{b['seq_len']} mb{b['micro_batch']} steps "
                 f"{b['windows'][0] - b['log_interval'] + 1}-{b['steps']} (docs ~{b['data']['mean_doc_tokens']:.0f} tok)",
                 f"{b['tokens_per_s']:,.0f} tok/s", f"{b['tflops_per_device']:.0f} TFLOP/s", mfu(b),
                 f"{1e3 * b['step_time_s']:.0f} ms/step, peak {b['mem_peak_gb']:.1f} GiB"))
    if base:
        summary["trainer_over_loop"] = b["tokens_per_s"] / base
        rows.append(("b. trainer / benchmark loop (a. bf16) tokens/s", f"x{summary['trainer_over_loop']:.3f}", "", "", ""))
# c. transformers
c = load("c_hf")
if c:
    for k, label in (("ours", "ours compiled causal"), ("hf", "transformers eager (SDPA causal)"),
                     ("hf_compiled", "transformers compiled")):
        if k in c:
            rows.append((f"c. {c['preset']} {label}", f"{c[k]['tokens_per_s']:,.0f} tok/s",
                         f"{c[k]['tflops_per_device']:.0f} TFLOP/s", mfu(c[k]), ""))
    for k, label in (("ratio_ours_over_hf", "eager"), ("ratio_ours_over_hf_compiled", "compiled")):
        if k in c:
            rows.append((f"c. ours / transformers {label}: tokens/s", f"x{1 / c[k]:.3f}",
                         f"step-time ratio {c[k]:.3f}", "", ""))
    if base:
        best_hf = max(c[k]["tokens_per_s"] for k in ("hf", "hf_compiled") if k in c)
        summary["ours_best_over_hf_best"] = base / best_hf
        rows.append(("c. ours best (a. bf16 compiled flex) / transformers best tokens/s",
                     f"x{summary['ours_best_over_hf_best']:.3f}", "", "", ""))
# d. 3b and 7b
d = {k: load(k) for k in ("d_7b_bf16", "d_7b_bf16_zero3", "d_7b_fp8", "d_3b_bf16", "d_3b_fp8")}
for k, t in d.items():
    if t:
        r = first(t)
        rows.append((f"d. {t['preset']} ({t['params_total'] / 1e9:.2f}B) {t['precision']} ZeRO-{t['zero_stage']} "
                     f"mb{t['micro_batch']} ckpt{t['activation_checkpointing']} seq{t['seq_len']} {run_name(t)}",
                     f"{r['tokens_per_s']:,.0f} tok/s", f"{r['tflops_per_device']:.0f} TFLOP/s", mfu(r), mem(t)))
b7 = d["d_7b_bf16"] or d["d_7b_bf16_zero3"]
for size, bf, f8 in (("7b", b7, d["d_7b_fp8"]), ("3b", d["d_3b_bf16"], d["d_3b_fp8"])):
    if bf and f8:
        summary[f"{size}_fp8_over_bf16"] = first(f8)["tokens_per_s"] / first(bf)["tokens_per_s"]
        rows.append((f"d. {size} fp8 / bf16 tokens/s", f"x{summary[f'{size}_fp8_over_bf16']:.3f}", "", "", ""))
# issue 21's targets on one H200
bf = on_gpu(a["a_bf16"]) and first(a["a_bf16"]).get("mfu")
target("1b bf16 >= 55% MFU (PaLM)", bf or None, 0.55, pct(bf or None))
fp8x = max([summary[f"{k}_over_bf16"] for k in ("a_fp8_tensorwise", "a_fp8_rowwise")
            if f"{k}_over_bf16" in summary and on_gpu(a["a_bf16"], a[k])], default=None)
target("1b fp8 >= 1.15x bf16 tokens/s", fp8x, 1.15, f"x{fp8x:.3f} (the better recipe)" if fp8x else "")
f7 = summary.get("7b_fp8_over_bf16") if on_gpu(b7, d["d_7b_fp8"]) else None
target("7b fp8 >= 1.3x bf16 tokens/s", f7, 1.3, f"x{f7:.3f}" if f7 else "")
hfx = summary.get("ours_best_over_hf_best") if on_gpu(a["a_bf16"], c) else None
target("1b ours >= 1.5x transformers tokens/s", hfx, 1.5, f"x{hfx:.3f} (ours best / transformers best)" if hfx else "")
m7 = (on_gpu(b7) and first(b7).get("mfu")) or None
target("7b bf16 trains on one H200 at >= 45% MFU", m7, 0.45,
       f"{pct(m7)} (ZeRO-{b7['zero_stage']}, mb{b7['micro_batch']}, ckpt{b7['activation_checkpointing']})" if m7 else "")
summary["targets"] = targets
# v1 sections (GPU_CHECK_EXTRA=1)
if (out / "throughput.json").exists():
    t = json.loads((out / "throughput.json").read_text())
    summary["throughput"] = t
    base_v1 = t.get("eager:causal", {}).get("step_time_median_s")
    for v in t["variants"]:
        r = t[v]
        rows.append((f"1b bf16 seq4096 mb4 {v}", f"{r['tokens_per_s']:,.0f} tok/s", f"{r['tflops_per_device']:.0f} TFLOP/s",
                     f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "MFU n/a",
                     f"x{r['step_time_median_s'] / base_v1:.3f} vs eager:causal" if base_v1 else ""))
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
# f. tests: every finished test's line (pytest -v), and pytest's own last line when it got that far
p = out / "pytest.log"
if p.exists():
    text = p.read_text()
    results = {}
    for m in re.finditer(r"^(tests/gpu/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, flags=re.M):
        results[m[1]] = m[2]
    final = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l) and "==" in l]
    counts = {s: list(results.values()).count(s) for s in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    summary["tests"] = {"results": results, "counts": counts,
                        "pytest_line": final[-1].strip("= ") if final else "cut by the time limit before the end"}
    rows.append(("f. pytest tests/gpu", ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v) or "none finished",
                 summary["tests"]["pytest_line"], "", ""))
    for m in re.finditer(r"fp8 (\w+) vs bf16, (\d+) steps: .*?max relative difference (\S+) \(bound (\S+)\)", text):
        summary["tests"].setdefault("fp8_parity", {})[m[1]] = {"steps": int(m[2]), "max_rel": float(m[3]),
                                                               "bound": float(m[4])}
        rows.append((f"f. fp8 {m[1]} vs bf16 loss, {m[2]} steps on the GPU", f"max relative {m[3]}",
                     f"bound {m[4]}", "", ""))
    for name, state in results.items():
        if state in ("FAILED", "ERROR"):
            rows.append((f"   {state}", name, "", "", ""))
print("\n==== GPU check summary ====")
for k, v in sections.items():
    print(f"  section {k}: {v['status']} (at {v['at_s']} s{', limit ' + str(limits[k]) + ' s' if k in limits else ''})")
for r in rows:
    print("  " + " | ".join(x for x in r if x))
(out / "summary.json").write_text(json.dumps(summary, indent=1))
EOF
echo "total $(elapsed)s"

"""The product's own throughput: the trainer itself (the ``deepspeed`` launcher, ``lmforge.trainer.train``, its
data path and step loop) for a few dozen steps, read back from the run's ``metrics.jsonl``: tokens/s, TFLOP/s
per device and MFU in both conventions (trainer/metrics.py), step time, data wait, peak memory. Where
``benchmarks/train_throughput.py`` drives a DeepSpeed engine with its own loop on synthetic tokens, this is
the figure a user's run logs.

Data: real text cut into documents of a chosen mean length, tokenized by the data pipeline into real
shards. The text is the shipped sample corpus (``data_pipeline/sample_corpus/``: 37 Wikipedia articles and 3
Gutenberg books), its words cut into documents of geometric length (mean ``--mean-doc-len`` tokens, as
``train_throughput.py --mean-doc-len`` packs synthetic ones), repeated with other cuts until the run has
enough; the tokenizer is Mistral-7B-v0.1's 32,000-id SentencePiece conversion stored for the tests
(``tests/data/tokenizers/llama2-format/``, Apache-2.0), so the model has the presets' vocabulary of 32,000.
Intra-document attention is on (the flex kernel on CUDA with compiled layers), as configs/llama_1b.yaml.
Everything goes under ``--work`` (rebuilt each time: about 2 s).

The throughput is the mean of the log windows after the first (which holds the compilation). Once the last
step is logged, the run is stopped (SIGKILL to its process group) unless ``--finish``: the final checkpoint
of a ``1b`` run is ~14 GB of fp32 masters and Adam moments, which says nothing about throughput.

One H200 (benchmarks/gpu_check.sh):
    python benchmarks/trainer_throughput.py --preset 1b --seq-len 4096 --micro-batch 4 --steps 30 \\
        --log-interval 10 --precision bf16 --zero-stage 1 --mean-doc-len 500 --json runs/trainer_1b.json
On CPU (a smoke run):
    python benchmarks/trainer_throughput.py --preset tiny --seq-len 512 --micro-batch 2 --steps 6 --log-interval 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_pipeline" / "sample_corpus"
TOKENIZER = ROOT / "tests" / "data" / "tokenizers" / "llama2-format"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model.preset")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=2, help="train.micro_batch_size")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="train.max_steps")
    ap.add_argument("--log-interval", type=int, default=2, help="log.interval (the first window is not counted)")
    ap.add_argument("--precision", default="auto", help="train.precision (auto|bf16|fp32|fp8|fp16)")
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--activation-checkpointing", type=int, default=0)
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="train.compile false (default: compiled layers on CUDA, as configs/llama_1b.yaml)")
    ap.add_argument("--mean-doc-len", type=int, default=500, help="mean document length in tokens")
    ap.add_argument("--nproc", type=int, default=1, help="deepspeed --num_gpus")
    ap.add_argument("--work", default="/tmp/lmforge_trainer_throughput", help="tokenizer, data and run (rebuilt)")
    ap.add_argument("--finish", action="store_true", help="let the run save its final checkpoint and exit")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if a.steps < 2 * a.log_interval:
        ap.error("--steps must be at least 2 log windows (the first one holds the compilation)")
    return a


def prepare(a: argparse.Namespace, work: Path) -> dict:
    """Tokenizer, documents and shards under ``work``; returns what the data is."""
    from tokenizers import Tokenizer

    tok = work / "tok"
    tok.mkdir(parents=True)
    for f in TOKENIZER.glob("*.json"):
        shutil.copy(f, tok / f.name)
    (tok / "tokenizer.json").write_bytes(gzip.decompress((TOKENIZER / "tokenizer.json.gz").read_bytes()))
    text = "\n".join(p.read_text(errors="replace") for p in sorted(SAMPLE.rglob("*"))
                     if p.is_file() and p.suffix != ".md")
    words = " ".join(line for line in text.splitlines() if not line.startswith(("<doc", "</doc"))).split()
    # Tokens per word of this tokenizer on this text, to cut documents of about mean_doc_len tokens.
    enc = Tokenizer.from_file(str(tok / "tokenizer.json"))
    probe = words[:20000]
    per_word = len(enc.encode(" ".join(probe), add_special_tokens=False).ids) / len(probe)
    need = a.steps * a.micro_batch * a.grad_accum * a.nproc * (a.seq_len + 1)
    rng = np.random.default_rng(1234)
    docs, tokens = [], 0.0
    while tokens < 1.2 * need:  # passes over the words, each cut differently
        i = 0
        while i < len(words):
            n = max(1, int(rng.geometric(per_word / a.mean_doc_len)))
            docs.append(" ".join(words[i:i + n]))
            i += n
        tokens += len(words) * per_word
    with open(work / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    subprocess.run([sys.executable, "-m", "lmforge.data_pipeline", "preprocess", "--input", str(work / "docs.jsonl"),
                    "--tokenizer", str(tok / "tokenizer.json"), "--output", str(work / "data"),
                    "--valid-fraction", "0", "--no-progress"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    totals = json.loads((work / "data" / "manifest.json").read_text())["totals"]["train"]
    return {"documents": totals["documents"], "tokens": totals["tokens"],
            "mean_doc_tokens": totals["tokens"] / totals["documents"], "tokenizer": "llama2-format (32,000 ids)"}


def write_config(a: argparse.Namespace, work: Path) -> Path:
    import yaml

    cfg = {
        "run_dir": str(work / "run"), "tokenizer": str(work / "tok" / "tokenizer.json"),
        "model": {"preset": a.preset},
        "data": {"train": [{"path": str(work / "data"), "weight": 1.0}], "seq_len": a.seq_len,
                 "intra_doc_attention": True},
        "train": {"micro_batch_size": a.micro_batch, "grad_accum": a.grad_accum, "max_steps": a.steps,
                  "seed": 1234, "precision": a.precision, "compile": a.compile},
        "optim": {"lr": 3.0e-4, "min_lr": 3.0e-5, "warmup_steps": max(1, a.steps // 3)},
        "parallel": {"zero_stage": a.zero_stage, "activation_checkpointing": a.activation_checkpointing},
        "checkpoint": {"interval": 0},
        "log": {"interval": a.log_interval},
        "eval": {"interval": 0},
    }
    path = work / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def logged(run: Path, kind: str = "train") -> dict[int, dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if r.get("kind") == kind:
            rows[r["step"]] = r
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    data = prepare(a, work)
    cfg = write_config(a, work)
    print(f"trainer_throughput: data {data['documents']:,} documents, {data['tokens']:,} tokens (mean "
          f"{data['mean_doc_tokens']:.0f} tokens; {data['tokenizer']}) prepared in {time.perf_counter() - t0:.1f} s",
          flush=True)
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        launcher = Path(shutil.which("deepspeed") or "deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(launcher), "--num_gpus", str(a.nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
           "--module", "lmforge.trainer.train", "--config", str(cfg)]
    print("trainer_throughput: " + " ".join(cmd), flush=True)
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=sys.stdout, stderr=subprocess.STDOUT)

    def stop(*_):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def on_term(*_):  # the GPU check's time limit: the run's whole process group goes with us
        stop()
        sys.exit(124)

    signal.signal(signal.SIGTERM, on_term)
    run = work / "run"
    stopped = False
    while proc.poll() is None:
        if not a.finish and a.steps in logged(run):
            stop()
            stopped = True
            break
        time.sleep(0.5)
    wall = time.perf_counter() - t_start
    rows = logged(run)
    if a.steps not in rows:
        print(f"trainer_throughput: the run ended (status {proc.returncode}) before step {a.steps} was logged",
              file=sys.stderr)
        return 1
    windows = [r for s, r in sorted(rows.items()) if s > a.log_interval]  # the first holds the compilation
    keys = ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "tflops_per_device_causal_doc",
            "mfu", "mfu_causal_doc", "step_time_s", "data_wait_frac")
    res = {k: statistics.fmean(r[k] for r in windows) for k in keys if all(k in r for r in windows)}
    first = rows[min(rows)]
    res.update({"preset": a.preset, "seq_len": a.seq_len, "micro_batch": a.micro_batch, "grad_accum": a.grad_accum,
                "world": a.nproc, "zero_stage": a.zero_stage, "precision": a.precision, "compile": a.compile,
                "activation_checkpointing": a.activation_checkpointing, "steps": a.steps,
                "log_interval": a.log_interval, "windows": [r["step"] for r in windows],
                "first_window_step_time_s": first["step_time_s"], "data": data,
                "mem_peak_gb": max((r.get("mem_peak_gb") or r.get("rss_peak_gb") or 0.0) for r in rows.values()),
                "peak_tflops": windows[-1].get("peak_tflops"), "mfu_peak": windows[-1].get("mfu_peak"),
                "losses": [rows[s]["loss"] for s in sorted(rows)], "wall_s": wall,
                "stopped_after_last_log": stopped, "command": cmd})
    mfu = (f"MFU {100 * res['mfu']:.1f}% (causal_doc {100 * res['mfu_causal_doc']:.1f}%)" if "mfu" in res
           else "MFU n/a (no known peak)")
    print(f"trainer_throughput: steps {res['windows'][0] - a.log_interval + 1}-{a.steps} (log windows "
          f"{res['windows']}): {res['tokens_per_s']:,.0f} tokens/s | {1e3 * res['step_time_s']:.0f} ms/step | "
          f"{res['tflops_per_device']:.2f} TFLOP/s/device (causal_doc {res['tflops_per_device_causal_doc']:.2f}) | "
          f"{mfu} | data wait {100 * res['data_wait_frac']:.2f}% | peak memory {res['mem_peak_gb']:.2f} GiB | "
          f"first window {1e3 * first['step_time_s']:.0f} ms/step (compilation) | "
          f"{'stopped after the last log (no final checkpoint)' if stopped else 'finished'}; {wall:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

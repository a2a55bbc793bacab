"""Peak memory of `python -m lmforge.trainer.export_hf` on a 350m-preset checkpoint (vocab 32000, fp32).

    .venv/bin/python benchmarks/export_memory.py [--workdir DIR] [--keep]

Builds a real single-process DeepSpeed ZeRO-0 fp32 checkpoint of the 350m preset (no optimizer step,
so only the 1.36 GB of weights are saved), then runs the exporter in a child process three ways and
samples the child's /proc/PID/status every 20 ms:
  - a baseline child that only imports what the exporter imports (torch, deepspeed, transformers);
  - the export with --no-verify (the streaming conversion alone);
  - the export with verification (loads the HF model and lmforge's model: ~2x the fp32 model).
RssAnon is private memory (what the conversion really needs); VmRSS additionally counts clean pages of
the memory-mapped checkpoint file, which the kernel can drop at any time under pressure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def run_sampled(cmd: list[str], env: dict) -> tuple[int, dict[str, int], float]:
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: dict[str, int] = {}

    def sample() -> None:
        while proc.poll() is None:
            for k, v in _status(proc.pid).items():
                peak[k] = max(peak.get(k, 0), v)
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    _, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        print(err[-3000:], file=sys.stderr)
    return proc.returncode, peak, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and exports")
    a = ap.parse_args()
    from lmforge.model import get_preset, num_params
    from tests.helpers.checkpoints import make_checkpoint, train_test_tokenizer

    work = a.workdir or Path(tempfile.mkdtemp(prefix="export_mem_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tok = train_test_tokenizer(work / "sp")
        cfg = get_preset("350m", vocab_size=32000)
        n = num_params(cfg)
        largest = cfg.vocab_size * cfg.hidden_size * 4
        print(f"350m preset: {n / 1e6:.1f}M params = {n * 4 / 2**30:.2f} GiB fp32; largest tensor "
              f"(embedding) {largest / 2**20:.0f} MiB")
        t0 = time.time()
        ckpt = make_checkpoint(work / "run", tok, [[5] * 16], zero_stage=0, world_size=1, preset="350m",
                               steps=0, overrides={"vocab_size": 32000}, timeout=1200)
        print(f"checkpoint built in {time.time() - t0:.0f}s at {ckpt}")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
        py = sys.executable
        runs = {
            "imports only": [py, "-c", "import torch, deepspeed, transformers, safetensors, trainer.hf.export"],
            "export --no-verify": [py, "-m", "lmforge.trainer.export_hf", "--checkpoint", str(ckpt), "--output",
                                   str(work / "hf_noverify"), "--no-verify", "--overwrite"],
            "export (verified)": [py, "-m", "lmforge.trainer.export_hf", "--checkpoint", str(ckpt), "--output",
                                  str(work / "hf_verified"), "--overwrite"],
        }
        print(f"{'run':<22}{'rc':>4}{'peak RssAnon':>15}{'peak VmRSS':>13}{'wall s':>9}")
        results = {}
        for name, cmd in runs.items():
            rc, peak, wall = run_sampled(cmd, env)
            results[name] = peak
            print(f"{name:<22}{rc:>4}{peak.get('RssAnon', 0) / 2**30:>13.2f}Gi{peak.get('VmRSS', 0) / 2**30:>11.2f}Gi"
                  f"{wall:>9.1f}")
        base = results["imports only"].get("RssAnon", 0)
        conv = results["export --no-verify"].get("RssAnon", 0) - base
        print(f"streaming conversion: {conv / 2**20:.0f} MiB private memory above imports = "
              f"{conv / largest:.2f}x the largest tensor, {conv / (n * 4):.2f}x the fp32 model")
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

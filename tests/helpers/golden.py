"""The golden-loss file: per-step fp32 losses of one fixed run of the ``debug`` preset on the shipped
sample corpus, to catch silent numeric changes (torchtitan keeps one for its debug model).

The run: ``build_tiny_data`` (tokenizer and shards of ``data_pipeline/sample_corpus``), ``write_config``
defaults (debug preset, seq 64, micro batch 2, 2 ranks = global batch 4, fp32, ZeRO-2, lr 1e-3 with 2
warmup steps, intra-document attention on), 12 steps with a checkpoint every 2, ``log.peak_tflops`` 1.0
(it logs MFU), launched with ``deepspeed --num_gpus 2``. The suite trains it once (``tests/conftest.py``
``golden_run``, with evaluation every 3 steps, which does not change the training losses):
tests/test_train.py compares its losses with the file, tests/test_launch.py runs the same config through
the other launchers, and tests/test_resume.py resumes, kills and damages copies of it against its rows.

Regenerate only on purpose (a change that is meant to change the numbers), and say why in the commit:

    .venv/bin/python -m tests.helpers.golden --write
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tests.helpers.paths import TEST_DATA
from tests.helpers.runs import build_tiny_data, deepspeed_train, read_metrics, write_config

GOLDEN = TEST_DATA / "golden" / "debug_sample_corpus_losses.json"
# Relative bound per step. Reruns on one machine are bitwise equal. Another CPU (other SIMD widths,
# another BLAS blocking) reorders fp32 sums: ~1e-7 relative per op, which the parity tests measured to
# stay below 1e-6 relative in the loss over 6 Adam steps; 2e-5 leaves 20x margin at 6 steps and ~10x at
# 12. Measured effects of real changes on the first 6 steps (max relative over the steps): train.seed
# 7 -> 8 (init and data order) 6.1e-3; optim.warmup_steps 2 -> 3 9.1e-4; optim.lr 1e-3 -> 1.001e-3
# (0.1%) 1.1e-5. tests/test_train.py asserts that the bound can fail.
RTOL = 2e-5
STEPS = 12
# What the golden run is (write_config's defaults plus these); the resume tests write the same. A peak of
# 1 TFLOP/s (metrics only; CPU has none) makes it log MFU: tests/test_train.py checks both conventions.
SECTIONS = {"train": {"max_steps": STEPS}, "checkpoint": {"interval": 2, "keep_last": 20},
            "eval": {"interval": 3, "steps": 2}, "log": {"peak_tflops": 1.0}}


def golden_config(path: Path, tiny_data: dict, run_dir: Path, **sections) -> Path:
    """The golden run's config (``sections`` may only add what does not change the losses)."""
    merged = {k: dict(v) for k, v in SECTIONS.items()}
    for k, v in sections.items():
        merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
    return write_config(path, tiny_data, run_dir, **merged)


def compare(losses: dict[int, float]) -> list[str]:
    """Steps whose loss drifted beyond RTOL from the golden file (empty: matches)."""
    want = {int(k): v for k, v in json.loads(GOLDEN.read_text())["losses"].items()}
    if sorted(losses) != sorted(want):
        return [f"steps {sorted(losses)} differ from the golden file's {sorted(want)}"]
    return [f"step {s}: loss {losses[s]!r}, golden {want[s]!r} (relative {abs(losses[s] - want[s]) / abs(want[s]):.2e}"
            f" > {RTOL:g})" for s in sorted(want) if abs(losses[s] - want[s]) > RTOL * abs(want[s])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="run the golden run and overwrite the golden file")
    if not ap.parse_args().write:
        ap.error("pass --write to regenerate the golden file (it is compared by tests/test_train.py)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = build_tiny_data(tmp)
        deepspeed_train(golden_config(tmp / "cfg.yaml", data, tmp / "run"), [])
        losses = {r["step"]: r["loss"] for r in read_metrics(tmp / "run")}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"about": "tests/helpers/golden.py", "rtol": RTOL, "losses": losses}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {losses}")


if __name__ == "__main__":
    main()

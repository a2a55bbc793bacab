"""Real 2-rank DeepSpeed training runs (gloo on CPU): outputs, checkpoints, exact resume."""

from __future__ import annotations

import shutil

import pytest

from conftest import deepspeed_train, read_metrics, write_config
from trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow


def test_two_rank_run_writes_everything_and_resumes_exactly(tmp_path, tiny_data):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, eval={"interval": 3, "steps": 2})
    deepspeed_train(cfg, [])

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "step_time_s",
                "data_wait_frac", "consumed_samples"):
        assert key in rows[0], key
    assert rows[-1]["consumed_samples"] == 6 * 2 * 2  # steps × micro batch × dp
    assert len(read_metrics(run, "eval")) == 2
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckdir = run / "checkpoints"
    assert ckpt.complete_tags(ckdir) == ["step_00000003", "step_00000006"]
    assert (ckdir / "latest").read_text() == "step_00000006"
    assert (ckdir / "tokenizer.model").is_file()
    state = ckpt.read_state(ckdir, "step_00000006")
    assert state["consumed_samples"] == 24 and state["data_parallel"] == 2

    # Resume from step 3 (as after a crash right after that save): steps 4..6 must repeat bitwise,
    # since the sample order, the weights, the optimizer and the LR schedule all come back exactly.
    shutil.rmtree(ckdir / "step_00000006")
    (ckdir / "latest").write_text("step_00000003")
    first = {r["step"]: r["loss"] for r in rows}
    (run / "metrics.jsonl").unlink()
    out = deepspeed_train(cfg, [])
    assert "resumed from" in out.stdout
    again = {r["step"]: r["loss"] for r in read_metrics(run)}
    assert sorted(again) == [4, 5, 6]
    for s in (4, 5, 6):
        assert again[s] == first[s], (s, again[s], first[s])


def test_refuses_resume_on_changed_data(tmp_path, tiny_data):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, train={"max_steps": 2, "micro_batch_size": 2,
                       "grad_accum": 1, "seed": 7, "precision": "fp32"})
    deepspeed_train(cfg, [], nproc=1)
    p = deepspeed_train(cfg, ["data.seq_len=32"], nproc=1, check=False)
    assert p.returncode != 0
    assert "refusing to resume" in p.stderr + p.stdout

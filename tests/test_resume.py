"""Resume after kill -9 (bitwise) and on another data-parallel size (same samples, universal checkpoint),
plus unit tests of what makes a checkpoint eligible (complete tags, ``latest``, pruning) and of the
resume decisions (layout change -> universal, changed global batch / data -> refused).

Real 2-rank and 1-rank DeepSpeed runs (gloo on CPU). One uninterrupted 2-rank run is the reference for
both scenarios; it checkpoints every 2 steps and keeps them all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import BIN, ROOT, child_env, deepspeed_train, free_port, write_config
from trainer import checkpoint as ckpt
from trainer import resume
from trainer.config import ConfigError, load_config

MAX_STEPS = 12
SECTIONS = dict(train={"micro_batch_size": 2, "grad_accum": 1, "max_steps": MAX_STEPS, "seed": 7,
                       "precision": "fp32"},
                checkpoint={"interval": 2, "keep_last": 20})


def last_rows(run) -> dict[int, dict]:
    """metrics.jsonl is appended to by every start of the run: the last record of each step wins."""
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            rows[r["step"]] = r
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("reference")
    cfg = write_config(root / "cfg.yaml", tiny_data, root / "run", **SECTIONS)
    deepspeed_train(cfg, [])
    rows = last_rows(root / "run")
    assert sorted(rows) == list(range(1, MAX_STEPS + 1))
    return {"run": root / "run", "rows": rows}


@pytest.mark.slow
def test_kill9_mid_run_then_resume_is_bitwise(tmp_path, tiny_data, reference):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, **SECTIONS)
    ckdir = run / "checkpoints"
    args = [BIN / "deepspeed", "--num_gpus", 2, "--master_addr", "127.0.0.1", "--master_port", free_port(),
            "--module", "trainer.train", "--config", cfg]
    # Own session, so the launcher and both ranks can be SIGKILLed together (as a node failure would).
    with open(tmp_path / "first.log", "w") as out:
        proc = subprocess.Popen([str(a) for a in args], cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while ckpt.latest_tag(ckdir) is None:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(r for r in last_rows(run)) if (run / "metrics.jsonl").is_file() else 0
    assert killed_at < MAX_STEPS, "the run finished before the kill; the test did not test a kill"
    resume_tag = ckpt.latest_tag(ckdir)

    out = deepspeed_train(cfg, [])
    resumed_from = ckpt.step_of(resume_tag)
    assert f"resumed from {ckdir / resume_tag}" in out.stdout
    rows = last_rows(run)
    assert sorted(rows) == list(range(1, MAX_STEPS + 1))
    # Steps after the checkpoint were computed by the second start: bitwise those of the clean run
    # (same weights, optimizer moments, LR schedule step, RNG states and sample window).
    for s in range(resumed_from + 1, MAX_STEPS + 1):
        assert rows[s]["loss"] == reference["rows"][s]["loss"], (s, rows[s]["loss"], reference["rows"][s]["loss"])
        assert rows[s]["consumed_samples"] == reference["rows"][s]["consumed_samples"]
    assert (ckdir / "latest").read_text() == ckpt.tag_for(MAX_STEPS)


@pytest.mark.slow
def test_two_ranks_to_one_rank_continues_the_same_samples(tmp_path, tiny_data, reference):
    """2 ranks × micro batch 2 (global batch 4) -> 1 rank × micro batch 2 × grad_accum 2 (global batch 4).

    ZeRO-2 partitions the optimizer state over the ranks, so the trainer converts the checkpoint to
    DeepSpeed's universal format on its own. The losses are not bitwise those of the 2-rank run: the
    same four samples' gradients are summed in another order (all-reduce of two means vs. accumulation
    of two micro-batches), which may change fp32 rounding (~1e-7 relative per step) that Adam carries
    (measured here: 0.0, the two orders happen to round alike). 1e-5 relative over 8 steps is far below
    what a wrong sample window, a lost optimizer state or an LR schedule off by one step would produce:
    the reference's loss moves by 4e-4 to 7e-3 relative from one step to the next.
    """
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    ckdir.mkdir(parents=True)
    src = reference["run"] / "checkpoints"
    shutil.copytree(src / "step_00000004", ckdir / "step_00000004")
    shutil.copy(src / "tokenizer.model", ckdir / "tokenizer.model")
    (ckdir / "latest").write_text("step_00000004")
    sections = dict(SECTIONS, train=dict(SECTIONS["train"], grad_accum=2))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, **sections)

    out = deepspeed_train(cfg, [], nproc=1)
    assert "universal checkpoint" in out.stdout, out.stdout[-3000:]
    assert (ckdir / "step_00000004_universal" / "lmforge_universal.json").is_file()
    rows = last_rows(run)
    assert sorted(rows) == list(range(5, MAX_STEPS + 1))
    ref = reference["rows"]
    for s in range(5, MAX_STEPS + 1):
        assert rows[s]["consumed_samples"] == ref[s]["consumed_samples"] == 4 * s
        assert rows[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), (s, rows[s]["loss"], ref[s]["loss"])
        assert rows[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-12)
    state = ckpt.read_state(ckdir, ckpt.tag_for(MAX_STEPS))
    assert state["data_parallel"] == 1 and state["consumed_samples"] == 4 * MAX_STEPS


# ---------------------------------------------------------------------------------------------------
# Unit level: complete tags, latest, pruning


def _fake_tag(ckdir, step, complete=True, universal=False):
    d = ckdir / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / ckpt.STATE_FILE).write_text(json.dumps({"format": ckpt.FORMAT, "step": step}))
    if universal:
        (ckdir / ckpt.universal_tag(ckpt.tag_for(step))).mkdir()
    return d


def test_a_tag_without_state_file_is_never_resumed_from(tmp_path):
    """A kill during a save leaves DeepSpeed's files without lmforge.json (written last, after a barrier
    following every rank's write), and `latest` still names the previous tag."""
    ckdir = tmp_path / "checkpoints"
    _fake_tag(ckdir, 2)
    _fake_tag(ckdir, 4, complete=False)  # killed mid-save
    (ckdir / "latest").write_text("step_00000002")
    assert ckpt.complete_tags(ckdir) == ["step_00000002"]
    assert ckpt.latest_tag(ckdir) == "step_00000002"
    # Even a `latest` naming an incomplete tag (a hand edit, or a filesystem that lost the state file)
    # falls back to the newest complete one.
    (ckdir / "latest").write_text("step_00000004")
    assert ckpt.latest_tag(ckdir) == "step_00000002"
    (ckdir / "latest").unlink()
    assert ckpt.latest_tag(ckdir) == "step_00000002"
    assert ckpt.latest_tag(tmp_path / "nothing") is None


def test_prune_keeps_last_k_plus_every_mth_and_clears_debris(tmp_path):
    ckdir = tmp_path / "checkpoints"
    for s in range(1, 11):
        _fake_tag(ckdir, s, universal=s in (3, 9))
    (ckdir / ckpt.tag_for(5) / ckpt.STATE_FILE).unlink()  # step 5: crash debris older than the newest
    _fake_tag(ckdir, 11, complete=False)  # being written right now: newer than the newest complete
    (ckdir / "latest").write_text("step_00000010")
    removed = ckpt.prune(ckdir, keep_last=2, keep_every=4)
    assert ckpt.complete_tags(ckdir) == ["step_00000004", "step_00000008", "step_00000009", "step_00000010"]
    assert not (ckdir / "step_00000005").exists() and "step_00000005" in removed
    assert (ckdir / "step_00000011").is_dir()  # an in-progress save is not debris
    assert not (ckdir / "step_00000003_universal").exists()  # its source tag was pruned
    assert (ckdir / "step_00000009_universal").is_dir()
    # keep_last=0 keeps everything; `latest` is never pruned even if outside keep_last.
    (ckdir / "latest").write_text("step_00000004")
    assert ckpt.prune(ckdir, keep_last=1, keep_every=0) == ["step_00000008", "step_00000009"]
    assert ckpt.complete_tags(ckdir) == ["step_00000004", "step_00000010"]


# ---------------------------------------------------------------------------------------------------
# Unit level: resume decisions


def _state(dp=2, tp=1, zero=2, mbs=2, ga=1, fp="data-fp", tok="tok-sha"):
    return {"format": ckpt.FORMAT, "step": 4, "consumed_samples": 4 * mbs * ga * dp, "data_parallel": dp,
            "tensor_parallel": tp, "zero_stage": zero, "data_fingerprint": fp, "tokenizer": {"sha256": tok},
            "config": {"train": {"micro_batch_size": mbs, "grad_accum": ga}}}


def _plan(tmp_path, state, *overrides, dp=1, tp=1):
    ckdir = tmp_path / "checkpoints"
    shutil.rmtree(ckdir, ignore_errors=True)
    (ckdir / "step_00000004").mkdir(parents=True)
    (ckdir / "step_00000004" / ckpt.STATE_FILE).write_text(json.dumps(state))
    (tmp_path / "c.yaml").write_text("tokenizer: t.model\nmodel: {preset: debug}\ndata: {train: [{path: d}]}\n")
    cfg = load_config(tmp_path / "c.yaml", list(overrides))
    gb = cfg.train.micro_batch_size * cfg.train.grad_accum * dp
    return resume.plan(cfg, ckdir, dp=dp, tp=tp, tokenizer_sha="tok-sha", data_fingerprint="data-fp",
                       global_batch=gb)


def test_resume_plans(tmp_path):
    mb = "train.micro_batch_size=2"
    same = _plan(tmp_path, _state(dp=2), mb, "train.grad_accum=1", dp=2)
    assert same.tag == "step_00000004" and not same.universal and same.load_tag == "step_00000004"
    # 2 -> 1 data-parallel ranks with the global batch kept: ZeRO-2 states are partitioned -> universal.
    p = _plan(tmp_path, _state(dp=2), mb, "train.grad_accum=2", dp=1)
    assert p.universal and p.load_tag == "step_00000004_universal" and "data-parallel 2" in p.reason
    assert resume.ds_config_for(p, {})["checkpoint"] == {"load_universal": True}
    assert resume.ds_config_for(same, {}) == {}
    # Another ZeRO stage (1-3) or tensor-parallel size also goes through the universal format.
    assert _plan(tmp_path, _state(dp=2, zero=1), mb, "parallel.zero_stage=3", dp=2).universal
    assert _plan(tmp_path, _state(dp=2, tp=1), mb, "train.grad_accum=2", "parallel.tensor_parallel=2", dp=1,
                 tp=2).universal
    # ZeRO-0 holds whole optimizer states: a plain load at another data-parallel size.
    z0 = _plan(tmp_path, _state(dp=2, zero=0), mb, "train.grad_accum=2", "parallel.zero_stage=0", dp=1)
    assert not z0.universal and z0.reason
    with pytest.raises(ConfigError, match="ZeRO stages 1-3"):
        _plan(tmp_path, _state(dp=2, zero=0), mb, "train.grad_accum=2", "parallel.zero_stage=0",
              "parallel.tensor_parallel=2",
              dp=1, tp=2)
    # Halving the ranks without doubling grad_accum changes the global batch: refused, with the fix.
    with pytest.raises(ConfigError, match=r"global batch 4, this run has 2.*train.grad_accum=2"):
        _plan(tmp_path, _state(dp=2), mb, "train.grad_accum=1", dp=1)
    assert _plan(tmp_path, _state(dp=2), mb, "checkpoint.allow_batch_change=true", dp=1).universal
    with pytest.raises(ConfigError, match="refusing to resume, the tokenizer changed"):
        _plan(tmp_path, _state(dp=1, tok="other"), mb)
    with pytest.raises(ConfigError, match="refusing to resume, the data"):
        _plan(tmp_path, _state(dp=1, fp="other"), mb)
    assert _plan(tmp_path, _state(dp=1, fp="other"), mb, "checkpoint.allow_data_change=true") is not None
    assert _plan(tmp_path, _state(dp=1), mb, "checkpoint.resume=false") is None

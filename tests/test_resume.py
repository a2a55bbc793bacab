"""Resume after kill -9 (bitwise) and on another data-parallel size (same samples, universal checkpoint),
plus unit tests of what makes a checkpoint eligible (complete tags, ``latest``, pruning) and of the
resume decisions (layout change -> universal, changed global batch / data -> refused).

Real 2-rank and 1-rank DeepSpeed runs (gloo on CPU). One uninterrupted 2-rank ZeRO-2 run is the reference
for the kill -9 and 2->1 rank scenarios; it checkpoints every 2 steps and keeps them all. ZeRO-3 2->1 rank
and tensor-parallel 2->1 resumes have short references of their own (6 steps, checkpoint at step 3).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmforge.model import get_preset
from lmforge.trainer import checkpoint as ckpt
from lmforge.trainer.checkpoint import resume
from lmforge.trainer.checkpoint.state import write_state
from lmforge.trainer.config import ConfigError, RunConfig, load_config
from tests.helpers import golden
from tests.helpers.runs import deepspeed_train, kill_after_first_checkpoint, last_rows, write_config

MAX_STEPS = golden.STEPS
# The golden run's config (write_config's defaults plus these: tests/helpers/golden.py), whose rows the
# resumed runs here must reproduce.
SECTIONS = dict(train=dict(golden.SECTIONS["train"], micro_batch_size=2, grad_accum=1, seed=7, precision="fp32"),
                checkpoint=dict(golden.SECTIONS["checkpoint"]), eval=dict(golden.SECTIONS["eval"]))


def copy_checkpoint(src_run: Path, tag: str, run: Path) -> Path:
    """A new run directory whose only checkpoint is ``src_run``'s ``tag`` (as a move to other machines
    would leave it). Returns its checkpoints/ directory."""
    ckdir = run / "checkpoints"
    ckdir.mkdir(parents=True)
    src = src_run / "checkpoints"
    shutil.copytree(src / tag, ckdir / tag)
    shutil.copy(src / "tokenizer.model", ckdir / "tokenizer.model")
    (ckdir / "latest").write_text(tag)
    return ckdir


@pytest.fixture()
def reference(golden_run):
    """The uninterrupted run: the suite's golden run (conftest.golden_run; never written to here)."""
    assert sorted(golden_run["rows"]) == list(range(1, MAX_STEPS + 1))
    return golden_run


@pytest.mark.slow
def test_kill9_mid_run_then_resume_is_bitwise(tmp_path, tiny_data, reference):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, **SECTIONS)
    ckdir = run / "checkpoints"
    kill_after_first_checkpoint(cfg, run, tmp_path / "first.log")
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
    ckdir = copy_checkpoint(reference["run"], "step_00000004", run)
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
    state = ckpt.read_state(ckdir / ckpt.tag_for(MAX_STEPS))
    assert state.data_parallel == 1 and state.consumed_samples == 4 * MAX_STEPS


SHORT_STEPS = 6  # checkpoint at 3, three steps after the resume


def _short_sections(**parallel) -> dict:
    return dict(train=dict(SECTIONS["train"], max_steps=SHORT_STEPS), parallel=parallel,
                checkpoint={"interval": 3, "keep_last": 20})


def _resume_on_one_rank(tmp_path, tiny_data, ref_run, train: dict, parallel: dict) -> dict[int, dict]:
    """Resume ``ref_run``'s step-3 checkpoint in a new run directory on one rank; its train rows."""
    run = tmp_path / "resumed"
    ckdir = copy_checkpoint(ref_run, "step_00000003", run)
    sections = _short_sections(**parallel)
    sections["train"].update(train)
    out = deepspeed_train(write_config(tmp_path / "resumed.yaml", tiny_data, run, **sections), [], nproc=1)
    assert "(universal checkpoint, saved with" in out.stdout, out.stdout[-3000:]
    assert (ckdir / "step_00000003_universal" / ckpt.UNIVERSAL_MARKER).is_file()
    rows = last_rows(run)
    assert sorted(rows) == list(range(4, SHORT_STEPS + 1))
    return rows


@pytest.mark.slow
def test_zero3_two_ranks_to_one_rank_is_bitwise(tmp_path, tiny_data):
    """ZeRO-3, 2 ranks (global batch 4) -> 1 rank × grad_accum 2, through the universal checkpoint.

    Bitwise: a fresh 1-rank ZeRO-3 run is bitwise the 2-rank run here, so any difference is the restore.
    Without the step-counter fix (deepspeed_compat.fix_universal_load: DeepSpeed 0.19.8's ZeRO-3 universal loader
    shares one Adam `step` tensor between the decay and no-decay partitions) steps 5 and 6 were off by
    2.4e-7 and 9.4e-5 relative."""
    ref = tmp_path / "ref"
    # The whole-logits loss: with the chunked default the tied weight's two gradient contributions are
    # added in another order, and a 1-rank run then equals the 2-rank run within one fp32 ulp (3.5e-8
    # relative, measured) instead of bitwise, too close to the 2.4e-7 the bug caused at step 5.
    whole = {"zero_stage": 3, "loss_chunk_tokens": 0}
    deepspeed_train(write_config(tmp_path / "ref.yaml", tiny_data, ref, **_short_sections(**whole)), [])
    ref_rows = last_rows(ref)
    rows = _resume_on_one_rank(tmp_path, tiny_data, ref, {"grad_accum": 2}, whole)
    for s in range(4, SHORT_STEPS + 1):
        assert rows[s]["consumed_samples"] == ref_rows[s]["consumed_samples"] == 4 * s
        assert rows[s]["loss"] == ref_rows[s]["loss"], (s, rows[s]["loss"], ref_rows[s]["loss"])
        assert rows[s]["lr"] == ref_rows[s]["lr"]


@pytest.mark.slow
def test_tensor_parallel_two_to_one_rank(tmp_path, tiny_data):
    """AutoTP 2 × data-parallel 1 (2 ranks, ZeRO-1) -> 1 rank without tensor parallelism: ds_to_universal
    merges the column/row shards of q/k/v/o/gate/up/down (weights and both Adam moments).

    Tolerance 1e-6 relative: sharded matmuls with an all-reduce of partial sums round differently from
    unsharded ones, so a TP=2 run and a fresh TP=1 run differ by up to 1.4e-7 relative (one fp32 ulp of
    the loss) from the first step on (measured; the resumed run was bitwise the fresh TP=1 run). A
    mis-sliced shard changes the loss at step 4 itself by orders of magnitude more, and a lost or wrong
    Adam moment moved the loss by 9.4e-5 within two steps in the ZeRO-3 case above."""
    ref = tmp_path / "ref"
    sections = _short_sections(zero_stage=1, tensor_parallel=2)
    deepspeed_train(write_config(tmp_path / "ref.yaml", tiny_data, ref, **sections), [])
    ref_rows = last_rows(ref)
    assert ckpt.read_state(ref / "checkpoints" / "step_00000003").tensor_parallel == 2
    rows = _resume_on_one_rank(tmp_path, tiny_data, ref, {}, {"zero_stage": 1, "tensor_parallel": 1})
    for s in range(4, SHORT_STEPS + 1):
        assert rows[s]["consumed_samples"] == ref_rows[s]["consumed_samples"] == 2 * s
        assert rows[s]["loss"] == pytest.approx(ref_rows[s]["loss"], rel=1e-6), (s, rows[s]["loss"],
                                                                                 ref_rows[s]["loss"])
        assert rows[s]["lr"] == ref_rows[s]["lr"]
    state = ckpt.read_state(tmp_path / "resumed" / "checkpoints" / ckpt.tag_for(SHORT_STEPS))
    assert (state.tensor_parallel, state.data_parallel) == (1, 1)


# ---------------------------------------------------------------------------------------------------
# Unit level: complete tags, latest, pruning


def _state(step=4, dp=2, tp=1, zero=2, mbs=2, ga=1, fp="data-fp", tok="tok-sha") -> ckpt.CheckpointState:
    """A checkpoint state as the trainer writes it (only the fields the decisions read vary)."""
    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum = mbs, ga
    return ckpt.CheckpointState(
        step=step, consumed_samples=step * mbs * ga * dp, model_config=get_preset("debug").to_dict(),
        config=cfg.to_dict(), tokenizer=ckpt.TokenizerRecord(sha256=tok), data_fingerprint=fp, precision="fp32",
        zero_stage=zero, tensor_parallel=tp, data_parallel=dp, world_size=dp * tp, global_batch_size=mbs * ga * dp)


def _fake_tag(ckdir, step, complete=True, universal=False):
    d = ckdir / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        write_state(d, _state(step=step))
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


def _plan(tmp_path, state, *overrides, dp=1, tp=1):
    ckdir = tmp_path / "checkpoints"
    shutil.rmtree(ckdir, ignore_errors=True)
    (ckdir / "step_00000004").mkdir(parents=True)
    write_state(ckdir / "step_00000004", state)
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


def _copy_tags(src_run: Path, tags: list[str], run: Path) -> Path:
    ckdir = run / "checkpoints"
    ckdir.mkdir(parents=True)
    for tag in tags:
        shutil.copytree(src_run / "checkpoints" / tag, ckdir / tag)
    shutil.copy(src_run / "checkpoints" / "tokenizer.model", ckdir / "tokenizer.model")
    (ckdir / "latest").write_text(tags[-1])
    return ckdir


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":  # a full disk, a partial copy between clusters
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit of a tensor's bytes in the middle: torch.load would read it without complaint
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


OPTIM_FILE = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's ZeRO-2 partition of the Adam state


@pytest.mark.slow
def test_damaged_latest_checkpoints_are_set_aside_and_the_previous_one_resumed_bitwise(tmp_path, tiny_data,
                                                                                     reference):
    """The two newest checkpoints each have one damaged file, step 8 a truncated one (a full disk, a partial
    copy: its size is wrong) and step 6 a flipped bit (only its CRC-32 sees it): the start names each file,
    renames each tag step_N.damaged (kept, not deleted), resumes from step 4 and trains losses bitwise equal
    to the uninterrupted run; exit 0."""
    run = tmp_path / "run"
    ckdir = _copy_tags(reference["run"], ["step_00000004", "step_00000006", "step_00000008"], run)
    _damage(ckdir / "step_00000008" / OPTIM_FILE, "truncated")
    _damage(ckdir / "step_00000006" / OPTIM_FILE, "bit-flipped")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, **SECTIONS)
    out = deepspeed_train(cfg, [])
    for step, how in ((8, "bytes"), (6, "CRC-32")):
        tag = ckpt.tag_for(step)
        assert f"checkpoint {ckdir / tag} is damaged" in out.stdout, out.stdout[-3000:]
        (line,) = [x for x in out.stdout.splitlines() if f"{ckdir / tag / OPTIM_FILE}: " in x]
        assert how in line, line
        assert (ckdir / f"{tag}.damaged" / OPTIM_FILE).is_file()
    assert "set aside as step_00000008.damaged; resuming from the previous complete checkpoint step_00000006" \
        in out.stdout
    assert "set aside as step_00000006.damaged; resuming from the previous complete checkpoint step_00000004" \
        in out.stdout
    assert f"resumed from {ckdir / 'step_00000004'}" in out.stdout
    rows = last_rows(run)
    for s in range(5, MAX_STEPS + 1):
        assert rows[s]["loss"] == reference["rows"][s]["loss"], s


def test_verify_and_export_name_the_damaged_file(tmp_path, reference):
    """No training: `trainer.verify_checkpoint` checks every tag (exit 1 naming the file), and the export
    refuses the damaged tag (exit 2 naming the file) but exports an intact one."""
    import sys

    from tests.helpers.process import run_cmd

    run = tmp_path / "run"
    ckdir = _copy_tags(reference["run"], ["step_00000004", "step_00000006"], run)
    ok = run_cmd([sys.executable, "-m", "lmforge.trainer.verify_checkpoint", run])
    assert "step_00000004: ok" in ok.stdout and "step_00000006: ok" in ok.stdout
    _damage(ckdir / "step_00000006" / "rng_state_rank0.pt", "bit-flipped")
    bad = run_cmd([sys.executable, "-m", "lmforge.trainer.verify_checkpoint", run], check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "step_00000004: ok" in bad.stdout and "step_00000006: DAMAGED" in bad.stdout
    assert f"{ckdir / 'step_00000006' / 'rng_state_rank0.pt'}: CRC-32" in bad.stdout
    sizes = run_cmd([sys.executable, "-m", "lmforge.trainer.verify_checkpoint", run, "--sizes-only"])
    assert "step_00000006: ok" in sizes.stdout  # a flipped bit keeps the size: only the checksum sees it
    exp = run_cmd([sys.executable, "-m", "lmforge.trainer.export_hf", "--checkpoint", run, "--output", tmp_path / "hf",
                   "--no-verify"], check=False)
    assert exp.returncode == 2 and "is damaged, refusing to export it" in exp.stderr, exp.stderr[-2000:]
    assert "rng_state_rank0.pt: CRC-32" in exp.stderr and not (tmp_path / "hf").exists()
    run_cmd([sys.executable, "-m", "lmforge.trainer.export_hf", "--checkpoint", run, "--output", tmp_path / "hf",
             "--no-verify", "--step", "4"])


@pytest.mark.slow
def test_async_saves_train_identically_and_resume_bitwise(tmp_path, tiny_data, reference):
    """checkpoint.async_save: the losses are bitwise the synchronous run's (saving in the background
    changes nothing in training), each periodic tag is completed later with every file recorded (CRC-32
    computed while writing), and a resume from one continues bitwise."""
    from lmforge.trainer.checkpoint.integrity import check_tag

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, **SECTIONS)
    out = deepspeed_train(cfg, ["checkpoint.async_save=true", "log.interval=3"])
    assert "being written in the background" in out.stdout and "in the background (" in out.stdout
    rows = last_rows(run)
    assert sorted(rows) == [3, 6, 9, 12]  # log.interval 3: the steps at which a pending save can complete
    assert all(rows[s]["loss"] == reference["rows"][s]["loss"] for s in rows)
    ckdir = run / "checkpoints"
    tags = ckpt.complete_tags(ckdir)
    assert tags == [ckpt.tag_for(s) for s in range(2, MAX_STEPS + 1, 2)]
    for tag in tags:
        assert check_tag(ckdir / tag) == [], tag
        # The files of a synchronous save, every one, in the background tags and in the final
        # (synchronous) one saved after them through the same engine.
        assert sorted(p.name for p in (ckdir / tag).iterdir()) == \
            sorted(p.name for p in (reference["run"] / "checkpoints" / tag).iterdir()), tag
    run2 = tmp_path / "run2"
    _copy_tags(run, ["step_00000006"], run2)
    cfg2 = write_config(tmp_path / "cfg2.yaml", tiny_data, run2, **SECTIONS)
    out = deepspeed_train(cfg2, [])
    assert f"resumed from {run2 / 'checkpoints' / 'step_00000006'}" in out.stdout
    rows = last_rows(run2)
    assert all(rows[s]["loss"] == reference["rows"][s]["loss"] for s in range(7, MAX_STEPS + 1))


def test_a_failed_universal_conversion_is_one_clear_error(tmp_path, reference):
    """A layout DeepSpeed's converter cannot read (here: a ZeRO-2 tag missing one rank's optimizer
    partition) ends in one CheckpointError naming the tag, DeepSpeed's own reason and the full log; no
    traceback in the message."""
    ckdir = _copy_tags(reference["run"], ["step_00000004"], tmp_path / "run")
    (ckdir / "step_00000004" / OPTIM_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.convert_to_universal(ckdir, "step_00000004", log=lambda *a: None)
    msg = str(e.value)
    assert f"universal-checkpoint conversion of {ckdir / 'step_00000004'} failed: " in msg
    assert "convert.log" in msg and "Traceback" not in msg and len(msg.splitlines()) == 2, msg
    assert not (ckdir / "step_00000004_universal").exists()

"""Faults: stop signals and time limits save and exit 0; non-finite steps are skipped, counted, and abort
after ``train.max_nonfinite_steps`` in a row with the last good checkpoint intact.

The launches are real 1- and 2-rank DeepSpeed runs (gloo on CPU); the fast unit tests at the top check
the pieces (signal flag, NaN-injection parsing, the streak counter) in-process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from lmforge.trainer import checkpoint as ckpt
from lmforge.trainer import faults
from lmforge.trainer.signals import Launcher, StopFlag, is_rank
from tests.helpers.paths import ROOT
from tests.helpers.process import child_env, free_port
from tests.helpers.runs import deepspeed_args, deepspeed_train, read_metrics, write_config

# ---------------------------------------------------------------------------------------------------
# Unit level


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_stop_signals_set_the_flag_instead_of_killing(sig, restore_signals):
    flag = StopFlag()
    os.kill(os.getpid(), sig)
    assert flag.signal == sig.name


def test_second_ctrl_c_interrupts_immediately(restore_signals):
    flag = StopFlag()
    os.kill(os.getpid(), signal.SIGINT)
    assert flag.signal == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_a_different_signal_after_the_first_does_not_interrupt(restore_signals):
    """Slurm's SIGUSR1 warning, then its SIGTERM at the time limit; a SIGTERM from the scheduler and the
    same one forwarded by a launcher: the first signal stays the reason and the save goes on. Only Ctrl-C
    again interrupts."""
    flag = StopFlag()
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        os.kill(os.getpid(), sig)
    assert flag.signal == "SIGUSR1"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


# A launcher as DeepSpeed's console scripts run: ``python .../torchrun ARGS`` (a launcher by the script's
# name). It starts the "rank" (RANK_SCRIPT), waits until the rank watches it, then waits for the rank
# ("alive") or exits at once ("zombie": its parent, the test, reaps it only at the end; "gone": reaped).
LAUNCHER_SCRIPT = """
import subprocess, sys, time
from pathlib import Path
mode, d = sys.argv[1], Path(sys.argv[2])
rank = subprocess.Popen([sys.executable, str(d / "rank.py"), str(d)])
while not (d / "ready").exists():
    time.sleep(0.01)
if mode == "alive":
    sys.exit(rank.wait())
"""
# The rank: watches its launcher (StopFlag), then -- on "go" -- steps the wall clock psutil sees by +37 s
# (the boot time it reads anew from /proc/stat, as after an NTP/PTP step) and polls once.
RANK_SCRIPT = """
import json, sys, time
from pathlib import Path
import psutil, psutil._pslinux as pslinux
from lmforge.trainer.signals import StopFlag
d = Path(sys.argv[1])
flag = StopFlag()
own = psutil.Process().create_time()
(d / "ready").touch()
while not (d / "go").exists():
    time.sleep(0.01)
real_boot_time = pslinux.boot_time
pslinux.boot_time = lambda: real_boot_time() + 37.0
result = {"watched": len(flag.launchers), "shift": psutil.Process().create_time() - own,
          "stopped": flag.poll(), "reason": flag.signal}
(d / "result.tmp").write_text(json.dumps(result))
(d / "result.tmp").rename(d / "result.json")
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="steps the boot time psutil reads on Linux")
@pytest.mark.parametrize("mode", ["alive", "zombie", "gone"])
def test_launcher_watch_ignores_a_step_of_the_wall_clock(tmp_path, mode):
    """NTP/PTP steps the wall clock: psutil's create_time() of every process moves with it (psutil #1724,
    #2526). A live launcher must still be seen alive (no stop: the whole job would save and exit 0
    unasked), and one that really exited (a zombie not yet reaped, or reaped and gone) still seen gone."""
    (tmp_path / "torchrun").write_text(LAUNCHER_SCRIPT)
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    launcher = subprocess.Popen([sys.executable, str(tmp_path / "torchrun"), mode, str(tmp_path)], cwd=ROOT,
                                env=child_env())
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists():
            assert time.time() < deadline and (launcher.poll() is None or mode != "alive")
            time.sleep(0.01)
        if mode == "zombie":
            deadline = time.time() + 60
            while psutil.Process(launcher.pid).status() != psutil.STATUS_ZOMBIE:
                assert time.time() < deadline
                time.sleep(0.01)
        elif mode == "gone":
            launcher.wait(timeout=60)
        (tmp_path / "go").touch()
        deadline = time.time() + 60
        while not (tmp_path / "result.json").exists():
            assert time.time() < deadline, "the rank wrote no result"
            time.sleep(0.01)
        result = json.loads((tmp_path / "result.json").read_text())
    finally:
        (tmp_path / "go").touch()  # an orphaned rank waits for nothing
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
            raise
    assert result["watched"] == 1, result
    assert abs(result["shift"] - 37.0) < 1, result  # the clock step really moved create_time()
    if mode == "alive":
        assert not result["stopped"], result
    else:
        assert result["stopped"] and result["reason"] == f"the launcher (pid {launcher.pid}) exiting", result


@pytest.mark.skipif(tuple(map(int, psutil.__version__.split(".")[:2])) < (7, 1) or not psutil.LINUX,
                    reason="psutil's identity ignores the wall clock on Linux from 7.1")
def test_launcher_watch_without_procfs_uses_psutils_identity(monkeypatch):
    """Where there is no /proc (start ticks unknown), psutil's is_running() decides; it too must hold
    across a clock step, and see a zombie and a reaped process as gone."""
    import psutil._pslinux as pslinux

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watched = Launcher(psutil.Process(child.pid))
        watched.start_ticks = None
        real = pslinux.boot_time
        monkeypatch.setattr(pslinux, "boot_time", lambda: real() + 37.0)
        assert watched.alive()
        child.kill()
        deadline = time.time() + 30
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.time() < deadline
            time.sleep(0.01)
        assert not watched.alive()
        child.wait()
        assert not watched.alive()
    finally:
        child.kill()
        child.wait()


def test_injected_nan_steps_parsing(monkeypatch):
    monkeypatch.setenv(faults.INJECT_ENV, "3, 5-7")
    assert faults.injected_nan_steps() == {3, 5, 6, 7}
    monkeypatch.setenv(faults.INJECT_ENV, "")
    assert faults.injected_nan_steps() == set()
    monkeypatch.setenv(faults.INJECT_ENV, "x")
    with pytest.raises(ValueError, match=faults.INJECT_ENV):
        faults.injected_nan_steps()


def test_tracker_counts_streaks_and_aborts_naming_the_checkpoint():
    t = faults.NonFiniteTracker(max_consecutive=3, precision="fp32")
    last_good = lambda: "/run/checkpoints/step_00000010"  # noqa: E731
    assert not t.observe(11, 2.0, False, last_good)
    assert t.observe(12, math.nan, True, last_good)
    assert t.observe(13, 2.0, True, last_good)  # finite loss, non-finite gradient: skipped by DeepSpeed
    assert not t.observe(14, 2.0, False, last_good)
    assert (t.total, t.streak) == (2, 0)
    t.observe(15, math.inf, True, last_good)
    t.observe(16, math.nan, True, last_good)
    with pytest.raises(faults.NonFiniteError, match=r"3 consecutive.*step_00000010"):
        t.observe(17, math.nan, True, last_good)
    # A non-finite loss whose update was applied anyway must never pass silently.
    with pytest.raises(faults.NonFiniteError, match="was applied"):
        faults.NonFiniteTracker(0, "fp32").observe(1, math.nan, False, last_good)
    # fp16: loss-scale overflows (finite loss, skipped step) are normal and do not count.
    f16 = faults.NonFiniteTracker(1, "fp16")
    assert not f16.observe(1, 2.0, True, last_good)


# ---------------------------------------------------------------------------------------------------
# Real runs


def _rank_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The trainer processes under the deepspeed launcher, by local rank."""
    out = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        ranks = [a.split("=", 1)[1] for a in cmd if a.startswith("--local_rank=")]
        if ranks and is_rank(cmd):
            out[int(ranks[0])] = p
    return out


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_a_loadable_checkpoint_and_exits_0(tmp_path, tiny_data):
    """Slurm delivers the signal to every task, but not necessarily at the same instant: here only rank 1
    gets SIGTERM, and both ranks must still stop after the same step. With log.interval 5 most steps are
    not sync steps: the ranks learn of the stop through StepSums up to two steps late, and must still
    agree on the step to stop after (a disagreement would hang the save's collectives)."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run,
                       train={"micro_batch_size": 2, "grad_accum": 1, "max_steps": 1000, "seed": 7,
                              "precision": "fp32"},
                       checkpoint={"interval": 0, "keep_last": 2}, log={"interval": 5})
    args = deepspeed_args(cfg, [], 2, free_port())
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(a) for a in args], cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 1):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, "no training steps after 300 s"
            time.sleep(0.1)
        _rank_processes(proc)[1].send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "stopping on a stop request on another rank" in text  # rank 0 prints; rank 1 got the signal
    last_step = read_metrics(run)[-1]["step"]
    assert last_step < 1000
    tag = ckpt.latest_tag(run / "checkpoints")
    assert tag == ckpt.tag_for(last_step)
    assert ckpt.read_state(run / "checkpoints" / tag).consumed_samples == 4 * last_step

    # The checkpoint loads (here on 1 rank × grad_accum 2: a 1-rank start is much cheaper than a 2-rank
    # one, and it exercises the universal conversion once more); exit_after_minutes (0.6 s, shorter than
    # the start-up) stops after one step with a checkpoint and exit code 0.
    out = deepspeed_train(cfg, ["train.exit_after_minutes=0.01", "train.grad_accum=2", "log.interval=1"], nproc=1)
    assert f"resumed from {run / 'checkpoints' / tag} (universal checkpoint" in out.stdout, out.stdout[-3000:]
    assert f"step {last_step}, {4 * last_step} samples consumed" in out.stdout
    assert "stopping on exit_after_minutes" in out.stdout
    assert ckpt.latest_tag(run / "checkpoints") == ckpt.tag_for(last_step + 1)
    assert read_metrics(run)[-1]["step"] == last_step + 1


def _weights_and_moments(tag_dir) -> dict[str, torch.Tensor]:
    """ZeRO-0 keeps the module and the whole (torch AdamW) optimizer state in mp_rank_00_model_states.pt."""
    sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True)
    out = {f"module.{k}": v for k, v in sd["module"].items()}
    for pid, st in sd["optimizer"]["state"].items():
        for k, v in st.items():
            out[f"optim.{pid}.{k}"] = torch.as_tensor(v)
    return out


@pytest.mark.slow
def test_nonfinite_step_is_skipped_without_touching_weights_or_optimizer(tmp_path, tiny_data):
    """ZeRO-0 fp32 (the layout where trainer.faults supplies the check DeepSpeed lacks): NaN in rank 0's
    loss at step 3 -> the update is skipped on both ranks; the step-3 checkpoint equals the step-2 one."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run,
                       train={"micro_batch_size": 2, "grad_accum": 1, "max_steps": 3, "seed": 7,
                              "precision": "fp32"},
                       parallel={"zero_stage": 0}, checkpoint={"interval": 2, "keep_last": 5})
    out = deepspeed_train(cfg, [], **{faults.INJECT_ENV: "3"})
    assert "step 3: non-finite loss or gradient" in out.stdout
    rows = {r["step"]: r for r in read_metrics(run)}
    assert math.isfinite(rows[2]["loss"]) and math.isnan(rows[3]["loss"])
    assert rows[3]["skipped_steps"] == 1 and rows[3]["nonfinite_steps"] == 1
    assert rows[3]["consumed_samples"] == 12  # the bad batch is consumed, not retried
    ckdir = run / "checkpoints"
    before, after = _weights_and_moments(ckdir / "step_00000002"), _weights_and_moments(ckdir / "step_00000003")
    assert before.keys() == after.keys() and any(k.endswith("exp_avg") for k in before)
    for k in before:
        assert torch.equal(before[k], after[k]), k
        assert torch.isfinite(after[k]).all(), k


@pytest.mark.slow
def test_consecutive_nonfinite_steps_abort_with_the_last_good_checkpoint_intact(tmp_path, tiny_data):
    """ZeRO-2 (DeepSpeed's own overflow skip), 1 rank: NaN at steps 2 and 3 with max_nonfinite_steps=2."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run,
                       train={"micro_batch_size": 2, "grad_accum": 1, "max_steps": 6, "seed": 7,
                              "precision": "fp32", "max_nonfinite_steps": 2},
                       checkpoint={"interval": 1, "keep_last": 1})
    ckdir = run / "checkpoints"
    p = deepspeed_train(cfg, [], nproc=1, check=False, **{faults.INJECT_ENV: "2-3"})
    assert p.returncode != 0
    err = p.stderr + p.stdout
    assert "2 consecutive optimizer steps with a non-finite loss or gradient" in err, err[-3000:]
    assert f"last good checkpoint: {ckdir / 'step_00000001'}" in err
    # No save after step 1: keep_last=1 did not rotate the good checkpoint out.
    assert ckpt.complete_tags(ckdir) == ["step_00000001"]
    assert (ckdir / "latest").read_text() == "step_00000001"
    rows = {r["step"]: r for r in read_metrics(run)}
    assert rows[2]["skipped_steps"] == 1 and rows[2]["nonfinite_steps"] == 1
    assert json.loads((ckdir / "step_00000001" / "lmforge.json").read_text())["step"] == 1

"""Stops as schedulers and people send them, through the real launchers (issue: cluster-grade stops).

Each case starts a 2-rank CPU run (debug preset, tiny data) the way users do — ``launch_scripts/single_node.sh``
(``trainer.launch`` around ``deepspeed``) or the plain ``deepspeed`` command — in a session of its own, as a
shell job or a scheduler's step is, waits for training to be under way, then stops it one way:

* SIGTERM / SIGINT to the whole process group (``scancel``, Ctrl-C in a terminal);
* SIGTERM to the launch command's process alone (a container runtime's PID 1, ``kill <pid>``);
* under plain ``deepspeed``, SIGTERM to its process alone: it dies at once, its per-node launcher and the
  ranks live on, and the ranks must notice that their launcher is gone, save and exit;
* the stop file (``python -m lmforge.trainer.launch --stop RUN_DIR``), no signal at all;
* Ctrl-C twice: everything ends at once, without a checkpoint.

Each ends with the expected exit status, a complete checkpoint at the step the ranks stopped after (except
Ctrl-C twice), and no process of the run left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from lmforge.trainer import checkpoint as ckpt
from lmforge.trainer.signals import _is_launcher, is_rank
from tests.helpers.paths import ROOT
from tests.helpers.process import child_env, free_port
from tests.helpers.runs import deepspeed_args, read_metrics, write_config

SCRIPTS = ROOT / "launch_scripts"


def _config(tmp_path, tiny_data):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run,
                       train={"micro_batch_size": 2, "grad_accum": 1, "max_steps": 100000, "seed": 7},
                       checkpoint={"interval": 0, "keep_last": 2}, log={"interval": 5})
    return cfg, run


def _start(args: list, log_path, **env) -> subprocess.Popen:
    with open(log_path, "w") as out:
        return subprocess.Popen([str(a) for a in args], cwd=ROOT, env=child_env(**env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_training(proc: subprocess.Popen, run, log_path) -> list[psutil.Process]:
    """Until a first metrics row exists; returns every process of the run (for the leftover check)."""
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 1):
        assert proc.poll() is None, log_path.read_text()[-4000:]
        assert time.time() < deadline, "no training steps after 300 s"
        time.sleep(0.1)
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    ranks = [p for p in procs if is_rank(p.cmdline())]
    assert len(ranks) == 2, [p.cmdline() for p in procs]
    return procs


def _assert_gone(procs: list[psutil.Process], within: float = 120) -> None:
    gone, alive = psutil.wait_procs(procs, timeout=within)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"left behind: {[' '.join(p.cmdline())[:100] for p in alive]}"


def _assert_saved_at_last_step(run) -> int:
    last = read_metrics(run)[-1]["step"]
    assert 1 <= last < 100000
    tag = ckpt.latest_tag(run / "checkpoints")
    assert tag == ckpt.tag_for(last), (tag, last)
    assert ckpt.read_state(run / "checkpoints" / tag).consumed_samples == 4 * last
    return last


def _cleanup(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _script_args(cfg) -> list:
    return ["bash", SCRIPTS / "single_node.sh", "-n", 2, "-p", free_port(), cfg]


@pytest.mark.slow
@pytest.mark.parametrize("script,how", [("single_node", "group-SIGTERM"), ("single_node", "group-SIGINT"),
                                        ("single_node", "command-SIGTERM"), ("two_nodes_local", "group-SIGTERM"),
                                        ("two_nodes_local", "command-SIGUSR1")])
def test_launch_script_stops_cleanly(tmp_path, tiny_data, script, how):
    """The launch scripts: the signal reaches the launch command (and, to the group, everything the shell
    started in it): the ranks save, the command waits for them and exits 0, nothing is left. Two local
    "nodes" (two launchers meeting over TCP) stop together after the same step."""
    cfg, run = _config(tmp_path, tiny_data)
    log = tmp_path / "log"
    args = _script_args(cfg) if script == "single_node" else ["bash", SCRIPTS / "two_nodes_local.sh", "-p",
                                                                 free_port(), cfg]
    proc = _start(args, log, MASTER_ADDR="127.0.0.1", PYTHON=sys.executable)
    try:
        procs = _wait_training(proc, run, log)
        sig = getattr(signal, how.split("-")[1])
        if how.startswith("group"):
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rc = proc.wait(timeout=300)
        text = log.read_text()
        assert rc == 0, text[-4000:]
        assert f"stopping on {sig.name} at step" in text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
        _assert_gone(procs)
    finally:
        _cleanup(proc)
    _assert_saved_at_last_step(run)


@pytest.mark.slow
def test_plain_deepspeed_killed_alone_leaves_no_orphan_training(tmp_path, tiny_data):
    """SIGTERM to the `deepspeed` process alone kills it at once (-15) while its per-node launcher and
    ranks run on: the ranks see their launcher gone, stop after the same step, save and exit."""
    cfg, run = _config(tmp_path, tiny_data)
    log = tmp_path / "log"
    proc = _start(deepspeed_args(cfg, [], 2, free_port()), log)
    try:
        procs = _wait_training(proc, run, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
        _assert_gone(procs)
        text = log.read_text()
        assert "stopping on the launcher (pid" in text, text[-4000:]
    finally:
        _cleanup(proc)
    _assert_saved_at_last_step(run)


@pytest.mark.slow
def test_stop_file_stops_every_rank_and_is_consumed(tmp_path, tiny_data):
    """No signal: `python -m lmforge.trainer.launch --stop RUN_DIR` writes RUN_DIR/STOP; the ranks save and exit
    0 (here under plain deepspeed); the file is renamed so that the next start trains."""
    cfg, run = _config(tmp_path, tiny_data)
    log = tmp_path / "log"
    proc = _start(deepspeed_args(cfg, [], 2, free_port()), log)
    try:
        procs = _wait_training(proc, run, log)
        subprocess.run([sys.executable, "-m", "lmforge.trainer.launch", "--stop", run], cwd=ROOT, env=child_env(),
                       check=True, timeout=60)
        rc = proc.wait(timeout=300)
        assert rc == 0, log.read_text()[-4000:]
        # Rank 0 prints why it stopped: the file, or, when rank 1 polled the file first (both poll it each
        # step; under load either can be first), rank 1's request, summed over the ranks at the same step.
        text = log.read_text()
        assert (f"stopping on the stop file {run / 'STOP'} at step" in text
                or "stopping on a stop request on another rank at step" in text), text[-3000:]
        _assert_gone(procs)
    finally:
        _cleanup(proc)
    _assert_saved_at_last_step(run)
    assert not (run / "STOP").exists() and (run / "STOP.consumed").exists()


@pytest.mark.slow
def test_ctrl_c_twice_stops_at_once(tmp_path, tiny_data):
    cfg, run = _config(tmp_path, tiny_data)
    log = tmp_path / "log"
    proc = _start(_script_args(cfg), log, MASTER_ADDR="127.0.0.1", PYTHON=sys.executable)
    try:
        procs = _wait_training(proc, run, log)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
        assert rc != 0
        _assert_gone(procs, within=30)
    finally:
        _cleanup(proc)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_next_start_resumes(tmp_path, tiny_data):
    """SIGKILL to one rank (an OOM kill, a crashed process): the other rank's collective fails instead
    of waiting out parallel.collective_timeout_minutes, the launcher ends everything, the launch command
    exits non-zero with no process left; a new start resumes from the last complete checkpoint."""
    cfg, run = _config(tmp_path, tiny_data)
    log = tmp_path / "log"
    proc = _start([*_script_args(cfg), "checkpoint.interval=3"], log, MASTER_ADDR="127.0.0.1", PYTHON=sys.executable)
    try:
        procs = _wait_training(proc, run, log)
        while ckpt.latest_tag(run / "checkpoints") is None:
            assert proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.1)
        rank1 = [p for p in procs if "--local_rank=1" in p.cmdline() and not _is_launcher(p.cmdline())][0]
        t0 = time.time()
        rank1.kill()
        rc = proc.wait(timeout=120)  # far below the 30-minute collective timeout a hang would take
        print(f"job ended {time.time() - t0:.1f} s after the kill, status {rc}")
        assert rc != 0, log.read_text()[-4000:]
        _assert_gone(procs, within=30)
    finally:
        _cleanup(proc)
    tag = ckpt.latest_tag(run / "checkpoints")
    step = ckpt.read_state(run / "checkpoints" / tag).step
    out = subprocess.run([str(a) for a in _script_args(cfg)] + [f"train.max_steps={step + 1}"], cwd=ROOT,
                         env=child_env(MASTER_ADDR="127.0.0.1", PYTHON=sys.executable), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / tag}" in out.stdout
    assert read_metrics(run)[-1]["step"] == step + 1

"""Stops as schedulers and people send them, through the real launchers (issue: cluster-grade stops).

Each case starts a 2-rank CPU run (debug preset, tiny data) the way users do — ``launch_scripts/single_node.sh``
(``trainer.launch`` around ``deepspeed``) or the plain ``deepspeed`` command — in a session of its own, as a
shell job or a scheduler's step is, waits for training to be under way, then stops it one way:

* SIGTERM / SIGINT to the whole process group (``scancel``, Ctrl-C in a terminal);
* SIGTERM to the launch command's process alone (a container runtime's PID 1, ``kill <pid>``);
* under plain ``deepspeed``, SIGTERM to its process alone: it dies at once, its per-node launcher and the
  ranks live on, and the ranks must notice that their launcher is gone, save and exit;
* the stop file (``python -m lmforge.trainer.launch --stop RUN_DIR``), no signal at all;
* Ctrl-C twice: everything ends at once, without a checkpoint;
* a scheduler's warning and then its SIGTERM (Slurm: SIGUSR1 ahead of the time limit, SIGTERM at it):
  only a repeat of the same signal kills, so the stop's save goes on;
* ``launch_scripts/mpirun.sh``: SIGTERM to its group, to the script alone, and Ctrl-C.

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
from tests.helpers.paths import BIN, ROOT
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
    _stop_cleanly(proc, run, log, how)
    _assert_saved_at_last_step(run)


def _stop_cleanly(proc, run, log, how: str, check=None) -> None:
    """Once ``run`` trains: ``how`` = "group-SIG" sends SIG to the command's process group, anything else-SIG
    to the command alone; the command must exit 0 after a clean stop on SIG, with nothing left running.
    ``check(procs)`` runs on the processes found training, before the signal."""
    try:
        procs = _wait_training(proc, run, log)
        if check is not None:
            check(procs)
        sig = getattr(signal, how.split("-")[1])
        if how.startswith("group"):
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rc = proc.wait(timeout=300)
        text = log.read_text()
        assert rc == 0, text[-4000:]
        assert f"stopping on {sig.name} at step" in text, text[-4000:]
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
        _assert_gone(procs)
    finally:
        _cleanup(proc)


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


# A stand-in launcher for trainer.launch: no rank below it and no --config, so trainer.launch forwards the
# first signal to it; it then "saves" for SAVE_SECONDS and exits 0, as ranks under a real launcher do.
FAKE_LAUNCHER = """
import signal, sys, time
SAVE_SECONDS = 1.0
got = []
def on(signum, frame):
    got.append(signum)
    print("fake launcher got", signal.Signals(signum).name, flush=True)
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(s, on)
print("fake launcher ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not got:
    time.sleep(0.01)
time.sleep(SAVE_SECONDS)
sys.exit(0 if got else 3)
"""


def _wait_for_line(proc, log, text: str, timeout: float = 60) -> None:
    """Until ``text`` is in ``log`` (the command still running, within ``timeout`` seconds)."""
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.01)


@pytest.mark.parametrize("sent,rc", [("SIGUSR1-SIGTERM", 0), ("SIGTERM-SIGINT", 0), ("SIGUSR1-SIGTERM-SIGTERM", 137),
                                     ("SIGTERM-SIGHUP", 137), ("SIGINT-SIGINT", 137)])
def test_launch_kills_only_on_a_repeat_of_the_same_signal(tmp_path, sent, rc):
    """trainer.launch's escalation, without a training run: a different stop signal after the first is
    reported and ignored (the launcher's stop goes on and it exits 0); the same one again (SIGHUP being
    SIGTERM) kills everything at once (status 128 + SIGKILL)."""
    sent = sent.split("-")
    log = tmp_path / "log"
    proc = _start([sys.executable, "-m", "lmforge.trainer.launch", "--", sys.executable, "-c", FAKE_LAUNCHER], log)
    try:
        _wait_for_line(proc, log, "fake launcher ready")
        os.killpg(proc.pid, getattr(signal, sent[0]))
        _wait_for_line(proc, log, "fake launcher got")  # the first signal handled and forwarded
        for name in sent[1:]:
            os.killpg(proc.pid, getattr(signal, name))
            time.sleep(0.2)
        assert proc.wait(timeout=60) == rc, log.read_text()
    finally:
        _cleanup(proc)
    text = log.read_text()
    assert text.count("fake launcher got") == 1, text  # only the first signal is forwarded
    if rc == 0:
        assert f"already stopping after {sent[0]}; {sent[1]} ignored (send {sent[1]} again to kill at once)" in text
    else:
        assert "killing the launcher and every rank now" in text, text


# A launcher that, like MPICH's hydra, starts its child in a session of its own, and ignores stop signals.
SETSID_LAUNCHER = """
import signal, subprocess, sys, time
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(s, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print("child", child.pid, flush=True)
time.sleep(120)
"""


def test_launch_kill_reaches_processes_in_sessions_of_their_own(tmp_path):
    """The kill on a repeated signal: the launcher's process group, and every process below the launcher
    even in a session of its own (hydra's proxy and ranks each call setsid)."""
    log = tmp_path / "log"
    proc = _start([sys.executable, "-m", "lmforge.trainer.launch", "--", sys.executable, "-c", SETSID_LAUNCHER], log)
    try:
        _wait_for_line(proc, log, "child")
        child = psutil.Process(int(log.read_text().split("child", 1)[1].split()[0]))
        assert os.getsid(child.pid) == child.pid  # a session of its own: the group kill misses it
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 137, log.read_text()
        _assert_gone([child], within=10)
    finally:
        _cleanup(proc)


@pytest.mark.slow
def test_scheduler_warning_then_sigterm_saves_once_and_exits_0(tmp_path, tiny_data):
    """Slurm's order: SIGUSR1 ahead of the time limit, SIGTERM at it, both to the launch command's process
    group, the second while the ranks are stopping. The real `python -m lmforge.trainer.launch -- deepspeed
    ...`: the SIGTERM is reported and ignored, the ranks save the stopped step once and the command exits 0,
    with no process left."""
    cfg, run = _config(tmp_path, tiny_data)
    log = tmp_path / "log"
    proc = _start([sys.executable, "-m", "lmforge.trainer.launch", "--", *deepspeed_args(cfg, [], 2, free_port())],
                  log)
    try:
        procs = _wait_training(proc, run, log)
        os.killpg(proc.pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert proc.poll() is None, "the stop was over before the SIGTERM: nothing tested"
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=300)
        text = log.read_text()
        assert rc == 0, text[-4000:]
        assert "already stopping after SIGUSR1; SIGTERM ignored" in text, text[-4000:]
        assert text.count("stopping on SIGUSR1 at step") == 1, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        _assert_gone(procs)
    finally:
        _cleanup(proc)
    last = _assert_saved_at_last_step(run)
    assert ckpt.complete_tags(run / "checkpoints") == [ckpt.tag_for(last)]  # saved once: checkpoint.interval 0
    assert (run / "checkpoints" / ckpt.tag_for(last) / "lmforge.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["group-SIGTERM", "script-SIGTERM", "group-SIGINT"])
def test_mpirun_script_stops_cleanly(tmp_path, tiny_data, how):
    """`launch_scripts/mpirun.sh` (MPICH's hydra from the `mpich` wheel): SIGTERM to its process group
    (scancel, a batch system), to the script alone (`kill PID`), Ctrl-C (SIGINT to the group): the ranks
    save the stopped step, the script exits 0 after them, and no rank or hydra proxy is left."""
    cfg, run = _config(tmp_path, tiny_data)
    log = tmp_path / "log"
    proc = _start(["bash", SCRIPTS / "mpirun.sh", "-n", 2, "-m", "127.0.0.1", "-p", free_port(), cfg], log,
                  MPIRUN=BIN / "mpirun", PYTHON=sys.executable)

    def hydra_runs(procs):
        assert any("hydra_pmi_proxy" in " ".join(p.cmdline()) for p in procs), [p.cmdline() for p in procs]

    _stop_cleanly(proc, run, log, how, check=hydra_runs)
    last = _assert_saved_at_last_step(run)
    assert (run / "checkpoints" / ckpt.tag_for(last) / "lmforge.json").is_file()


FAKE_OPEN_MPI = """#!/usr/bin/env bash
# Open MPI's mpirun as mpirun.sh sees it: --version prints its name, then more lines; a launch records
# its arguments.
if [[ $1 == --version ]]; then
  echo "mpirun (Open MPI) 4.1.5"; sleep 0.2; echo; echo "Report bugs to https://www.open-mpi.org/community/help/"
  exit 0
fi
printf '%s\\n' "$@" > "$ARGS_FILE"
"""


def test_mpirun_script_tells_open_mpi_by_its_version(tmp_path):
    """Open MPI is told from `mpirun --version` (its -x, not hydra's -genv), even when it writes more after
    the line that names it (a `--version | grep -q` pipeline then fails under pipefail: SIGPIPE)."""
    fake = tmp_path / "mpirun"
    fake.write_text(FAKE_OPEN_MPI)
    fake.chmod(0o755)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    out = subprocess.run(["bash", str(SCRIPTS / "mpirun.sh"), "-n", "2", "-m", "127.0.0.1", str(cfg)], cwd=ROOT,
                         env=child_env(MPIRUN=fake, PYTHON=sys.executable, ARGS_FILE=tmp_path / "args"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert "-x" in args and "MASTER_ADDR" in args and "-genv" not in args, args

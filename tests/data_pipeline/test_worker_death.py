"""A worker process that dies (the OOM killer's kill -9, a crash in a C extension) stops ``preprocess`` at once
with a one-line error, no worker left behind, and the same command again finishes the run byte-identical to an
uninterrupted one (``workers.ProcessPool``: a ``multiprocessing.Pool`` would replace the worker and wait forever
for the task it held)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from lmforge.data_pipeline.preprocess import BACKEND_ENV
from lmforge.data_pipeline.workers import TASK_PAUSE_ENV
from tests.data_pipeline.test_preprocess import INPUTS, PY, same_tree, tok  # noqa: F401
from tests.helpers.paths import ROOT
from tests.helpers.process import child_env, run_cmd

EXIT_WITHIN = 60  # seconds: a hang is a failure, not a timeout of the suite


def _command(model: Path, out: Path, *extra) -> list[str]:
    return [PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", *map(str, INPUTS), "--tokenizer", str(model),
            "--output", str(out), "--no-progress", "--unit-bytes", "200k", "--max-shard-bytes", "300k",
            "--valid-fraction", "0.05", "--workers", "2", *extra]


def _kill_a_worker(cmd: list[str], env: dict, out: Path, started: str
                   ) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Start ``cmd``, SIGKILL one of its child processes once a file matching ``started`` exists under ``out``
    (the pool's work has begun: each task waits ``TASK_PAUSE_ENV`` seconds first, so more are in flight), and wait
    for the run to end; returns it and the pids of the children seen."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    main = psutil.Process(proc.pid)
    seen: set[int] = set()
    killed = False
    deadline = time.monotonic() + EXIT_WITHIN
    try:
        while not killed and proc.poll() is None and time.monotonic() < deadline:
            try:
                children = main.children()
                seen.update(c.pid for c in children)
                if children and next(out.glob(started), None) is not None:
                    children[0].send_signal(signal.SIGKILL)
                    killed = True
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.005)
        assert killed, "the run ended (or never started a worker) before a worker was killed"
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"the run hung after a worker was killed (still running after {EXIT_WITHIN} s)")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), sorted(seen)


def _gone(pids: list[int]) -> list[int]:
    """The ``pids`` still alive after a few seconds' grace (an orphan reaped by init is gone)."""
    alive = pids
    for _ in range(100):
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.05)
    return alive


def _check(model: Path, tmp_path: Path, env: dict, extra: tuple, message: str, started: str) -> None:
    run_cmd(_command(model, tmp_path / "clean", *extra), **env)
    out = tmp_path / "killed"
    t0 = time.monotonic()
    p, children = _kill_a_worker(_command(model, out, *extra), env, out, started)
    assert p.returncode != 0, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr[-3000:]
    assert "rerun to resume" in errors[0] and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert time.monotonic() - t0 < EXIT_WITHIN
    assert not _gone(children), "worker processes left behind"
    run_cmd(_command(model, out, *extra), **env)  # the same command again resumes
    same_tree(tmp_path / "clean", out)


def test_tokenizer_worker_killed_fails_fast_and_resumes(tok, tmp_path):  # noqa: F811
    """Tokenizer workers as processes (the backend with a child process per worker): one is killed -9 while
    encoding."""
    _check(tok, tmp_path, {BACKEND_ENV: "process", TASK_PAUSE_ENV: "0.05"}, (),
           "error: a tokenizer worker process died (killed by signal 9: out of memory?) while encoding unit ",
           "train/shard_*")


def test_dedup_scan_worker_killed_fails_fast_and_resumes(tok, tmp_path):  # noqa: F811
    """``--dedup exact`` with tokenizer threads: the only child processes are the scan's (its units in parallel),
    one is killed -9 once a unit is scanned."""
    _check(tok, tmp_path, {BACKEND_ENV: "thread", TASK_PAUSE_ENV: "0.1"}, ("--dedup", "exact"),
           "error: a dedup scan worker process died (killed by signal 9: out of memory?) while scanning unit ",
           ".state/dedup/unit_*.npz")


def test_kill_9_of_the_main_process_leaves_no_worker(tok, tmp_path):  # noqa: F811
    """kill -9 of the main process alone (not its group): its tokenizer and dedup scan workers die with it
    (PR_SET_PDEATHSIG), none is left waiting for work."""
    for backend, extra, started in (("process", (), "train/shard_*"),
                                    ("thread", ("--dedup", "exact"), ".state/dedup/unit_*.npz")):
        out = tmp_path / backend
        proc = subprocess.Popen(_command(tok, out, *extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                env=child_env(**{BACKEND_ENV: backend, TASK_PAUSE_ENV: "0.1"}))
        try:
            main = psutil.Process(proc.pid)
            children: list[psutil.Process] = []
            deadline = time.monotonic() + EXIT_WITHIN
            while proc.poll() is None and time.monotonic() < deadline:
                children = main.children()
                if children and next(out.glob(started), None) is not None:
                    break
                time.sleep(0.005)
            assert children and proc.poll() is None, "the run ended before its workers were seen"
            proc.kill()  # the main process only
            proc.wait()
            assert not _gone([c.pid for c in children]), "workers outlived the main process"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

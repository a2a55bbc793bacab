"""Subprocesses as users start them: the repository on PYTHONPATH, one thread per process, offline."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tests.helpers.paths import BIN, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{BIN}:{env.get('PATH', '')}")
    env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cmd(args: list, timeout: int = 600, check: bool = True, cwd: Path = ROOT,
            **env) -> subprocess.CompletedProcess:
    """Run a command to completion; with ``check`` a non-zero exit fails the test with its output."""
    p = subprocess.run([str(a) for a in args], cwd=cwd, env=child_env(**env), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                             f"\n--- stderr\n{p.stderr[-6000:]}")
    return p

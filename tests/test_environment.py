"""A new user's first commands: run outside the project's environment, a command says in one line what to
do (never "a bug in lmforge", never a traceback); the launch scripts find the clone's ``.venv`` in a new
shell; and a run that fails on every rank says so once, as the last line of the launch script's output.

The "other Python" is a real one: a virtual environment made with ``python -m venv --without-pip``, which
has none of lmforge's dependencies, run in the clone's root as a user would (the clone's ``lmforge/``
folder gives the ``lmforge.*`` names there without an install)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import BIN, ROOT
from tests.helpers.process import child_env, free_port
from tests.helpers.runs import write_config

SCRIPTS = ROOT / "launch_scripts"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """(python, env): a Python without numpy, torch, sentencepiece, ..., and nothing on PYTHONPATH."""
    d = tmp_path_factory.mktemp("bare")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", d / "venv"], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH="/usr/bin:/bin")
    py = d / "venv" / "bin" / "python"
    probe = subprocess.run([py, "-c", "import numpy"], env=env, capture_output=True)
    assert probe.returncode != 0, "the bare venv has numpy: not the Python this test needs"
    return py, env


@pytest.mark.parametrize("command", [
    ["-m", "lmforge.data_pipeline", "preprocess", "--input", "x.jsonl", "--tokenizer", "t.model", "--output", "o"],
    ["-m", "lmforge.trainer.export_hf", "--checkpoint", "ck", "--output", "hf"],
    ["-m", "lmforge.trainer.train", "--config", "configs/demo.yaml"],
])
def test_a_command_in_a_python_without_the_dependencies_says_what_to_do(bare_python, command):
    py, env = bare_python
    p = subprocess.run([py, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: the Python running this command ({py}) has no "), lines
    assert "source .venv/bin/activate" in lines[0] and "make setup" in lines[0]
    assert "bug" not in p.stderr and "Traceback" not in p.stderr


def test_launch_scripts_find_the_clones_environment_or_say_what_to_do(bare_python, tmp_path):
    # In a new shell (no virtualenv active, a PATH without the venv), common.sh puts the clone's .venv first.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON")}
    env["PATH"] = "/usr/bin:/bin"
    out = subprocess.run(["bash", "-c", f"source {SCRIPTS}/common.sh && need_env && command -v python deepspeed"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / ".venv" / "bin" / "deepspeed")]
    # With another environment active that lacks them: one line, exit 2, before any launcher starts.
    py, bare_env = bare_python
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: debug}\n")
    for script in ("single_node.sh", "multinode_hostfile.sh"):
        p = subprocess.run(["bash", SCRIPTS / script, cfg], capture_output=True, text=True, timeout=60,
                           env={**bare_env, "VIRTUAL_ENV": str(py.parent.parent), "PATH": f"{py.parent}:/usr/bin:/bin"})
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: no Python environment with lmforge, torch and "
                                                       "deepspeed") and "make setup" in lines[0], p.stderr


def test_an_error_on_every_rank_is_said_once_as_the_last_line(tiny_data, tmp_path):
    """Both ranks find the data missing; the launch script's merged output (the DeepSpeed launcher's
    lines included) holds the error once, and last; exit 2 (bad input)."""
    cfg = write_config(tmp_path / "bad.yaml", tiny_data, tmp_path / "run",
                       data={"train": [{"path": str(tmp_path / "no_such_data"), "weight": 1.0}], "seq_len": 64})
    p = subprocess.run(["bash", SCRIPTS / "single_node.sh", "-n", "2", "-p", str(free_port()), cfg],
                       env=child_env(PATH=f"{BIN}:{os.environ['PATH']}"), cwd=tmp_path, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [x for x in p.stdout.splitlines() if x.strip()]
    errors = [x for x in lines if "error:" in x]
    assert p.returncode == 2, p.stdout[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no_such_data" in errors[0], p.stdout[-3000:]
    assert lines[-1] == errors[0], p.stdout[-3000:]

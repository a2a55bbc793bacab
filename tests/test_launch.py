"""Launchers other than plain `deepspeed --num_gpus`: two "nodes" on one machine and mpirun; and every
command run from a directory holding a user's own ``model.py``, ``trainer.py``, ``data_pipeline.py`` and
``common.py``.

All three launches run the same computation (world size 2, same global sample order, fp32, gloo), so
their losses, gradient norms and final weights must be *bitwise* equal to the reference run's: any
difference means a launcher changed rank assignment, data slicing or the process group.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.helpers.paths import BIN, ROOT
from tests.helpers.process import child_env, free_port, run_cmd
from tests.helpers.runs import read_metrics, write_config

SCRIPTS = ROOT / "launch_scripts"
STEPS = 12  # the golden run's (conftest.golden_run)


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def _assert_same_run(run_dir, ref_dir) -> None:
    rows, ref = read_metrics(run_dir), read_metrics(ref_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # Both data-parallel ranks consumed their share: 2 samples × 2 ranks per step.
    assert rows[-1]["consumed_samples"] == STEPS * 2 * 2
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in rows] == [r[key] for r in ref], key
    w, w_ref = _final_weights(run_dir), _final_weights(ref_dir)
    assert w.keys() == w_ref.keys()
    for k in w:
        assert torch.equal(w[k], w_ref[k]), k


@pytest.fixture()
def reference(golden_run, tmp_path):
    """The golden run's config, run by `deepspeed --num_gpus 2` (2 ranks on one node: conftest.golden_run)."""
    return golden_run["cfg"], tmp_path, golden_run["run"]


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_single_node(reference):
    cfg, tmp, ref = reference
    run = tmp / "two_nodes"
    out = run_cmd(["bash", SCRIPTS / "two_nodes_local.sh", "-p", free_port(), cfg, f"run_dir={run}"])
    # Node 1's launcher really started rank 1 of a 2-rank world and it finished cleanly.
    node1 = [line for line in out.stdout.splitlines() if line.startswith("[node1]")]
    assert any("node_rank=1" in line for line in node1)
    assert any("dist_world_size=2" in line for line in node1)
    assert any("exits successfully" in line for line in node1)
    assert "[node0] lmforge:" in out.stdout and "world 2 = dp 2" in out.stdout
    assert "both nodes finished" in out.stdout
    _assert_same_run(run, ref)


@pytest.mark.slow
def test_mpirun_matches_single_node(reference):
    cfg, tmp, ref = reference
    run = tmp / "mpirun"
    out = run_cmd(["bash", SCRIPTS / "mpirun.sh", "-n", 2, "-m", "127.0.0.1", "-p", free_port(), cfg,
                   f"run_dir={run}"], MPIRUN=BIN / "mpirun", PYTHON=sys.executable)
    assert "world 2 = dp 2" in out.stdout
    _assert_same_run(run, ref)


_PROBE = (
    "import os; from lmforge.common.launch_env import torch_env; torch_env(); "
    # One write per rank: with PYTHONUNBUFFERED, print(a, b, ...) writes piecewise and ranks interleave.
    "os.write(1, (' '.join(['PROBE', *(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', "
    "'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'))]) + chr(10)).encode())"
)


def _probe(**env) -> list[list[str]]:
    out = run_cmd([BIN / "mpirun", "-n", 2, sys.executable, "-c", _PROBE], timeout=120, **env)
    return sorted(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("PROBE"))


def test_mpi_env_honours_explicit_master_addr():
    # 127.0.0.3 is loopback but never what `hostname -I` returns: seeing it proves the user's value won.
    rows = _probe(MASTER_ADDR="127.0.0.3", MASTER_PORT="29999")
    assert rows == [["0", "2", "0", "2", "127.0.0.3", "29999"], ["1", "2", "1", "2", "127.0.0.3", "29999"]]


def test_mpi_env_without_master_addr_agrees_on_rank0_address(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    rows = _probe()
    assert [r[:4] for r in rows] == [["0", "2", "0", "2"], ["1", "2", "1", "2"]]
    assert rows[0][4] == rows[1][4] and rows[0][4]  # one address, chosen by rank 0, on both ranks
    assert rows[0][5] == "29500"


@pytest.mark.parametrize("script", ["single_node.sh", "multinode_hostfile.sh", "mpirun.sh",
                                    "two_nodes_local.sh", "slurm.sbatch"])
def test_script_help_and_usage_errors(script):
    path = SCRIPTS / script
    run_cmd(["bash", "-n", path])
    ok = run_cmd(["bash", path, "-h"])
    assert "Usage:" in ok.stdout
    bad = run_cmd(["bash", path], check=False)  # no CONFIG
    assert bad.returncode == 2 and "Usage:" in bad.stderr + bad.stdout
    if script != "slurm.sbatch":
        missing = run_cmd(["bash", path, "/nonexistent/cfg.yaml"], check=False)
        assert missing.returncode == 2 and "not found" in missing.stderr


_SRUN_SHIM = """#!/usr/bin/env bash
# Stand-in for srun on a machine without Slurm: drop srun's options, run the command as the only task
# of a job step, with the per-task variables srun exports.
while [[ $1 == --* ]]; do shift; done
export SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=1 SLURM_LOCALID=0 SLURM_STEP_TASKS_PER_NODE=1 SLURM_STEP_ID=0
exec "$@"
"""
_SCONTROL_SHIM = """#!/usr/bin/env bash
if [[ $1 == show ]]; then echo 127.0.0.1; else echo "scontrol $*" >> "$SCONTROL_LOG"; fi
"""


@pytest.mark.slow
def test_slurm_template_saves_on_usr1_and_requeues(tmp_path, tiny_data):
    """The sbatch script's USR1 path: forward to the ranks, trainer saves and exits 0, job requeued.

    Slurm is not installed here, so srun and scontrol are small stand-ins on PATH (srun runs the task
    directly, as one task of a step; scontrol records the requeue). Script, trainer and signal are real.
    """
    import signal
    import subprocess
    import time

    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", _SRUN_SHIM), ("scontrol", _SCONTROL_SHIM)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, train={"max_steps": 100000},
                       checkpoint={"interval": 0})
    env = child_env(SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="node1", SLURM_SUBMIT_DIR=ROOT,
                    MASTER_PORT=free_port(), SCONTROL_LOG=tmp_path / "scontrol.log")
    env["PATH"] = f"{shims}:{env['PATH']}"
    p = subprocess.Popen(["bash", str(SCRIPTS / "slurm.sbatch"), str(cfg)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
            assert p.poll() is None and time.time() < deadline, "training never started"
            time.sleep(1)
        p.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` does before the time limit
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-4000:]
    assert "stopping on SIGUSR1" in out and "requeueing job 4242" in out, out[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["scontrol", "requeue", "4242"]
    step = read_metrics(run)[-1]["step"]
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}"


def test_commands_run_beside_a_users_model_py_trainer_py_and_data_pipeline_py(users_dir, tiny_data):
    """``python -m``, ``python -c`` and the launchers put the working directory first on ``sys.path``: a
    user's ``model.py`` there used to replace lmforge's ``model`` package (``cannot import name
    'LlamaForCausalLM' from 'model'``). The packages are ``lmforge.*`` now. ``users_dir`` holds such files,
    each failing if imported (the trainer itself is launched from there by tests/test_legacy_outputs.py)."""
    run_cmd([sys.executable, "-c", "import lmforge.trainer.parallel.engine, lmforge.trainer.train, "
             "lmforge.trainer.hf.export, lmforge.model.qwen3"], cwd=users_dir)
    out = run_cmd([sys.executable, "-m", "lmforge.data_pipeline", "inspect", tiny_data["data"], "--samples", "1"],
                  cwd=users_dir)
    assert "sample 0:" in out.stdout
    assert "lmforge train-tokenizer" in run_cmd([BIN / "lmforge", "--help"], cwd=users_dir).stdout
    with pytest.raises(AssertionError, match="own model.py was imported"):  # the files do what they say
        run_cmd([sys.executable, "-c", "import model"], cwd=users_dir)

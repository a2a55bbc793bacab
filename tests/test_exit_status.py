"""What a run's exit says to a scheduler: 0 and RUN_DIR/DONE once train.max_steps is reached; a run stopped
before it saves its checkpoint and exits with train.stopped_exit_status (default 0; 75 for a retry loop),
through DeepSpeed's launcher with 2 ranks, and never leaves a DONE behind (docs/configuration.md, "Exit
status")."""

from __future__ import annotations

import json

import psutil
import pytest

from lmforge.trainer import checkpoint
from lmforge.trainer.config import ConfigError, load_config
from tests.helpers.paths import ROOT
from tests.helpers.runs import deepspeed_train, read_metrics, write_config


def test_stopped_exit_status_is_validated():
    assert load_config(ROOT / "configs/demo.yaml").train.stopped_exit_status == 0
    for ok in (0, 75, 255):
        assert load_config(ROOT / "configs/demo.yaml",
                           [f"train.stopped_exit_status={ok}"]).train.stopped_exit_status == ok
    for bad, needle in (("256", "is not an exit status 0-255"), ("-1", "is not an exit status 0-255"),
                        ("tempfail", "expected an integer"), ("true", "expected an integer")):
        with pytest.raises(ConfigError, match=f"train.stopped_exit_status: .*{needle}"):
            load_config(ROOT / "configs/demo.yaml", [f"train.stopped_exit_status={bad}"])


def _ranks_left(cfg) -> list[int]:
    """Training ranks of this config still running after their launcher returned (there must be none)."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if str(cfg) in (p.info["cmdline"] or []):
            left.append(p.info["pid"])
    return left


@pytest.mark.slow
def test_done_only_at_max_steps_and_the_stopped_status(tmp_path, tiny_data):
    """One run directory through four starts: finished (DONE, 0); started again as it is (trains nothing,
    DONE kept as written); max_steps raised and stopped by the stop file with stopped_exit_status=75 (DONE
    removed at start-up, the stop step's checkpoint complete, the launcher's status 75); stopped again with
    the default (0, no DONE)."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, train={"max_steps": 4}, checkpoint={"interval": 0})
    done = run / "DONE"

    out = deepspeed_train(cfg, [])
    record = json.loads(done.read_text())
    assert done.read_text().count("\n") == 1
    assert {k: record[k] for k in ("step", "max_steps", "checkpoint")} == {
        "step": 4, "max_steps": 4, "checkpoint": checkpoint.tag_for(4)}
    assert checkpoint.latest_tag(run / "checkpoints") == checkpoint.tag_for(4)
    assert "stopping on" not in out.stdout

    written = done.read_text()
    out = deepspeed_train(cfg, [])  # resumed at max_steps: trains nothing, exits 0, DONE as it was
    assert "resumed from" in out.stdout and max(r["step"] for r in read_metrics(run)) == 4
    assert done.read_text() == written

    # max_steps raised: this start trains on, so DONE goes at start-up; the stop file stops it after
    # its first step (every step is a log step here), with the checkpoint saved, status 75.
    (run / "STOP").touch()
    out = deepspeed_train(cfg, ["train.max_steps=8", "train.stopped_exit_status=75"], check=False)
    assert out.returncode == 75, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert not done.exists()
    assert checkpoint.latest_tag(run / "checkpoints") == checkpoint.tag_for(5)
    assert (run / "checkpoints" / checkpoint.tag_for(5) / checkpoint.STATE_FILE).is_file()
    assert ("stopping on the stop file" in out.stdout and "at step 5: checkpoint saved, exiting with status 75 "
            "(train.stopped_exit_status: stopped before train.max_steps=8)" in out.stdout), out.stdout[-3000:]
    assert (run / "STOP.consumed").exists() and not (run / "STOP").exists()
    assert _ranks_left(cfg) == []

    # The default: a stop exits 0, like a finished run, and leaves no DONE either.
    (run / "STOP").touch()
    out = deepspeed_train(cfg, ["train.max_steps=8"])
    assert "at step 6: checkpoint saved, exiting cleanly" in out.stdout
    assert not done.exists()
    assert checkpoint.latest_tag(run / "checkpoints") == checkpoint.tag_for(6)
    assert (run / "checkpoints" / checkpoint.tag_for(6) / checkpoint.STATE_FILE).is_file()

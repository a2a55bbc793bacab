"""Outputs written by the code before the package layout change (tests/data/legacy/, commit b37eeee)
still load, and today's code writes the same bytes from the same input: tokenizer, shards and manifest
are read and re-made, the checkpoint resumes to the step-3 loss the old run logged (bitwise) and exports.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml

from lmforge.data_pipeline.indexed_dataset import IndexedDataset
from lmforge.data_pipeline.manifest import load_manifest, shard_prefixes
from lmforge.data_pipeline.tools import verify
from tests.helpers.paths import ROOT, SAMPLE, TEST_DATA
from tests.helpers.process import run_cmd
from tests.helpers.runs import deepspeed_train, read_metrics

LEGACY = TEST_DATA / "legacy"
# As the old run named it (relative to the repository root: run_cmd's working directory); the path is
# part of each source's fingerprint.
BOOK = (SAMPLE / "books" / "pg1952.txt").relative_to(ROOT)


def test_tokenizer_and_shards_are_read_and_rewritten_byte_for_byte(tmp_path):
    run_cmd([sys.executable, "-m", "lmforge.data_pipeline", "train-tokenizer", "--input", BOOK, "--vocab-size", 400,
             "--output", tmp_path / "tok", "--threads", 1])
    legacy_tok = LEGACY / "tokenizer" / "tokenizer.model"
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == legacy_tok.read_bytes()

    assert verify(LEGACY / "data") == []
    (prefix,) = shard_prefixes(LEGACY / "data", "train")
    ds = IndexedDataset(prefix)
    assert ds.num_documents == 1 and ds.num_tokens == load_manifest(LEGACY / "data")["totals"]["train"]["tokens"]

    run_cmd([sys.executable, "-m", "lmforge.data_pipeline", "preprocess", "--input", BOOK, "--tokenizer",
             LEGACY / "tokenizer" / "tokenizer.model", "--output", tmp_path / "data", "--valid-fraction", 0,
             "--strip-gutenberg", "--no-progress", "--workers", 1])
    for ext in (".bin", ".idx"):
        new = (tmp_path / "data" / "train" / f"shard_00000_000{ext}").read_bytes()
        assert new == (LEGACY / "data" / "train" / f"shard_00000_000{ext}").read_bytes(), ext
    old, new = (json.loads((d / "manifest.json").read_text()) for d in (LEGACY / "data", tmp_path / "data"))
    # Only where the tokenizer was read from differs (the old run read it from /tmp/legacy), and the
    # manifest now also says which end-of-document token that id is and where the choice came from.
    assert old["tokenizer"].pop("source_path") != new["tokenizer"].pop("source_path")
    assert (new["tokenizer"].pop("eod_token"), new["tokenizer"].pop("eod_source")) == ("</s>", "tokenizer.model eos_id")
    assert new == old


@pytest.mark.slow
def test_checkpoint_resumes_to_the_old_runs_loss_and_exports(tmp_path, users_dir):
    """Launched from a directory holding a user's own model.py, trainer.py, data_pipeline.py and common.py
    (conftest.users_dir): the trainer imports only lmforge's packages."""
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "checkpoints", run / "checkpoints")
    cfg = yaml.safe_load((LEGACY / "config.yaml").read_text())
    cfg.update(run_dir=str(run), tokenizer=str(LEGACY / "tokenizer" / "tokenizer.model"))
    cfg["data"]["train"] = [{"path": str(LEGACY / "data"), "weight": 1.0}]
    # The old code computed the loss from the whole logits; today's chunked default adds the same terms
    # in another order (~1e-7 relative), so the bitwise comparison below asks for the old way.
    cfg["parallel"]["loss_chunk_tokens"] = 0
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = deepspeed_train(tmp_path / "cfg.yaml", [], nproc=1, cwd=users_dir)
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}: step 2, 4 samples consumed" in out.stdout
    old = {r["step"]: r for r in map(json.loads, (LEGACY / "metrics.jsonl").read_text().splitlines())}
    (row,) = read_metrics(run)
    # Same weights, Adam moments, LR step, RNG state and sample window as the old run's step 3: bitwise.
    assert (row["step"], row["loss"], row["lr"]) == (3, old[3]["loss"], old[3]["lr"])

    from lmforge.trainer.hf.export import export

    hf = export(LEGACY / "checkpoints", tmp_path / "hf", step=2)  # verified against transformers
    assert "step 2" in (hf / "README.md").read_text()

"""Session fixtures shared by the trainer, checkpoint and export tests (helpers live in tests/helpers/):
the prepared data, one golden trainer run that several test files compare against instead of each
training its own, and a working directory holding a user's own ``model.py`` and friends."""

from __future__ import annotations

import pytest

from tests.helpers.runs import build_tiny_data, deepspeed_train, last_rows

# The longest test files (measured on 2 cores, cold caches: 160 to 40 s each) run first. ``make test`` hands
# whole files to 2 pytest-xdist workers in collection order; starting the long ones first keeps both busy
# to the end instead of leaving one to finish a long file alone. Serially the order changes nothing.
LONGEST_FIRST = ("test_parallel_parity.py", "test_resume.py", "test_qwen3_moe.py", "test_plan_comms.py",
                 "test_sequence_parallel.py", "test_stops.py", "test_fp8.py", "test_qwen3.py",
                 "test_export_hf_bf16.py", "test_cluster_checkpoints.py", "test_faults.py", "test_launch.py",
                 "test_expert_parallel.py", "test_exit_status.py", "test_docs.py", "test_train.py",
                 "test_hf_tokenizer_e2e.py", "test_deepspeed_compat.py", "test_export_hf.py", "test_plan.py",
                 "test_tokenizer_kinds.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A real SentencePiece tokenizer (vocab 1000) and real shards of the shipped sample corpus."""
    return build_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory, tiny_data) -> dict:
    """The golden run (tests/helpers/golden.py: debug preset, 2 ranks by ``deepspeed --num_gpus 2``, ZeRO-2,
    fp32, 12 steps, a checkpoint every 2, evaluation every 3). Trained once: tests/test_train.py checks it
    against the golden file and everything it wrote; tests/test_launch.py runs its config through the
    other launchers and compares bitwise; tests/test_resume.py resumes, kills and damages copies of its
    checkpoints against its rows. Tests never write into it (they copy what they continue)."""
    from tests.helpers import golden

    root = tmp_path_factory.mktemp("golden")
    cfg = golden.golden_config(root / "cfg.yaml", tiny_data, root / "run")
    out = deepspeed_train(cfg, [])
    assert "world 2 = dp 2" in out.stdout
    return {"cfg": cfg, "run": root / "run", "rows": last_rows(root / "run"), "stdout": out.stdout}


@pytest.fixture(scope="session")
def users_dir(tmp_path_factory):
    """A working directory holding a user's own ``model.py``, ``trainer.py``, ``data_pipeline.py`` and
    ``common.py``, each failing loudly if imported: ``python -m``/``-c`` and the launchers put the working
    directory first on ``sys.path``, where these once replaced lmforge's packages of the same names."""
    work = tmp_path_factory.mktemp("users_dir")
    for name in ("model", "trainer", "data_pipeline", "common"):
        (work / f"{name}.py").write_text(f"raise ImportError(\"the user's own {name}.py was imported\")\n")
    return work

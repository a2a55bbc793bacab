"""DeepSpeed-Ulysses sequence parallelism (``parallel.sequence_parallel``) through the real trainer and
launcher: S = 2 on 2 ranks against S = 1 on 1 rank on the same global batches, with intra-document
attention on, for ZeRO-1 and ZeRO-3; an S = 2 checkpoint resumed at S = 1 on one rank; config errors.

Data: the sample corpus's Wikipedia cut into 25-word documents (~65 tokens at vocab 1000), packed
into 256-token samples, so every row holds several documents and boundaries fall on both sides of the
S = 2 cut: document masking across the all-to-all is exercised, not just causal attention.

Sizes: the debug preset (4 query heads, 2 kv heads: S = 2 divides both). The expansion path (k/v heads S
does not divide, expanded to the query heads before the exchange) is tests/test_deepspeed_compat.py's
Ulysses case, with 1 kv head, against the unsplit model's gradient. ZeRO-3 partitions every matrix (the
trainer sets the persistence threshold from the hidden size, 10·d = 640 elements, below the 64×64
matrices). Runs are 4 steps with a checkpoint every 2: the exchange and the resume show in the first steps
as in later ones.

Tolerances: measured S = 2 against S = 1 at fp32 over 6 steps (ZeRO-1 and ZeRO-3, and the S = 1 resume
against S = 2), losses differ by at most 1.0e-7 relative (~1 ulp: a step's loss is two partial sums
added instead of one sum) and grad norms by 3.1e-7; LOSS_RTOL = 2e-6 and GNORM_RTOL = 3e-5 are those of
tests/test_parallel_parity.py, ~6000x below what a real difference gives (another seed: 1e-2). A
missing gradient reduction over the sequence-parallel ranks halves the grad norm (what DeepSpeed's
ZeRO-3 reduce-scatter did: tests/test_deepspeed_compat.py), far outside them.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from lmforge.trainer.batching import sequence_slice
from lmforge.trainer.checkpoint import tag_for as ckpt_tag
from lmforge.trainer.config import ConfigError, DataSource, RunConfig, validate
from tests.helpers.paths import SAMPLE
from tests.helpers.process import run_cmd
from tests.helpers.runs import check_flops_conventions, deepspeed_train, last_rows, read_metrics, write_config

LOSS_RTOL = 2e-6
GNORM_RTOL = 3e-5
SEQ = 256


@pytest.fixture(scope="module")
def short_docs(tiny_data, tmp_path_factory) -> dict:
    """Shards of the sample Wikipedia cut into 25-word documents."""
    from lmforge.data_pipeline.readers import DOC, ReadOptions, expand_inputs, iter_documents

    root = tmp_path_factory.mktemp("short_docs")
    with open(root / "paragraphs.jsonl", "w") as f:
        for src in expand_inputs([str(SAMPLE / "wikipedia")]):
            for kind, text, _ in iter_documents(src, ReadOptions()):
                if kind == DOC:
                    words = text.split()
                    for i in range(0, len(words) - 25, 25):  # 25-word documents
                        f.write(json.dumps({"text": " ".join(words[i:i + 25])}) + "\n")
    run_cmd([sys.executable, "-m", "lmforge.data_pipeline", "preprocess", "--input", root / "paragraphs.jsonl",
             "--tokenizer", tiny_data["tokenizer"], "--output", root / "data", "--valid-fraction", "0",
             "--no-progress"])
    totals = json.loads((root / "data" / "manifest.json").read_text())["totals"]["train"]
    assert totals["tokens"] / totals["documents"] < SEQ / 3, totals  # several documents per sample
    return {"tokenizer": tiny_data["tokenizer"], "data": root / "data"}


STEPS = 4


def _config(tmp, data, name: str, sp: int, zero: int, compile: bool = False):
    return write_config(tmp / f"{name}.yaml", data, tmp / name, model={"preset": "debug"},
                        data={"intra_doc_attention": True, "seq_len": SEQ},
                        train={"compile": compile, "max_steps": STEPS}, checkpoint={"interval": 2, "keep_last": 5},
                        parallel={"zero_stage": zero, "sequence_parallel": sp}, log={"peak_tflops": 1.0})


def _compare(ref: dict[int, dict], got: dict[int, dict], steps) -> None:
    for s in steps:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=LOSS_RTOL), (s, ref[s]["loss"], got[s]["loss"])
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=GNORM_RTOL), s


@pytest.fixture(scope="module")
def s1(short_docs, tmp_path_factory) -> dict[int, dict]:
    """S = 1 on 1 rank, ZeRO-1, eager: the reference of both S = 2 cases (the ZeRO stage changes the
    losses by ~1e-7 relative at most, tests/test_parallel_parity.py, far inside LOSS_RTOL)."""
    tmp = tmp_path_factory.mktemp("s1")
    deepspeed_train(_config(tmp, short_docs, "s1", 1, 1), [], nproc=1)
    return last_rows(tmp / "s1")


@pytest.mark.slow
@pytest.mark.parametrize("zero,compile", [(1, True), (3, False)])
def test_s2_matches_s1_and_resumes_at_s1(short_docs, s1, tmp_path, zero, compile):
    """The ZeRO-1 case also compiles the S = 2 layers (train.compile; the dense-mask kernel on CPU):
    the exchange inside a compiled layer, against eager S = 1."""
    p = deepspeed_train(_config(tmp_path, short_docs, "s2", 2, zero, compile), [], nproc=2)
    assert "× sp 2" in p.stdout
    assert ("decoder layers compiled" in p.stdout) == compile
    s2 = last_rows(tmp_path / "s2")
    assert sorted(s2) == list(range(1, STEPS + 1))
    _compare(s1, s2, range(1, STEPS + 1))
    assert s2[STEPS]["consumed_samples"] == s1[STEPS]["consumed_samples"] == 2 * STEPS  # the same samples, dp 1
    # The causal_doc FLOPs count each packed document's triangle, from the whole rows both S ranks read
    # (summed over the world, divided by tp × sp).
    assert check_flops_conventions(tmp_path / "s2", short_docs["data"], SEQ, 2, seed=7, peak=1.0) == STEPS
    if zero == 3:  # export is unaffected: the S = 2 ZeRO-3 checkpoint exports (bf16 weights) and verifies
        out = run_cmd([sys.executable, "-m", "lmforge.trainer.export_hf", "--checkpoint",
                       tmp_path / "s2" / "checkpoints", "--output", tmp_path / "hf", "--dtype", "bf16"])
        assert "exported and verified" in out.stdout + out.stderr

    # The S = 2 checkpoint of step 2 (as after a crash right after it) resumed at S = 1 on one rank:
    # DeepSpeed's universal conversion re-partitions ZeRO from 2 ranks to 1; steps 3-4 repeat S = 2's.
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "s2", run)
    shutil.rmtree(run / "checkpoints" / ckpt_tag(STEPS))
    (run / "checkpoints" / "latest").write_text(ckpt_tag(2))
    p = deepspeed_train(_config(tmp_path, short_docs, "resumed", 1, zero), [], nproc=1)
    assert "universal" in p.stdout and "resumed from" in p.stdout
    again = {r["step"]: r for r in read_metrics(run)[-(STEPS - 2):]}
    assert sorted(again) == list(range(3, STEPS + 1))
    _compare(s2, again, range(3, STEPS + 1))


def test_sequence_slice():
    ids = torch.arange(16).reshape(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 2, 2]])
    batch = {"input_ids": ids, "labels": labels, "doc_spans": "whole"}
    parts = [sequence_slice(batch, 2, r) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts], 1), ids)
    assert torch.equal(parts[1]["position_ids"], torch.tensor([[4, 5, 6, 7]] * 2))  # global positions
    assert parts[0]["loss_tokens"] == parts[1]["loss_tokens"] == 13  # the whole batch's unmasked labels
    assert parts[0]["doc_spans"] == "whole"  # attention inputs stay whole
    reset = sequence_slice({**batch, "position_ids": seg}, 2, 1)  # reset position ids are sliced as given
    assert torch.equal(reset["position_ids"], seg[:, 4:])
    with pytest.raises(ValueError, match="not divisible"):
        sequence_slice(batch, 3, 0)


def test_config_errors(tmp_path):
    cfg = RunConfig()
    cfg.tokenizer = "t"
    cfg.model.preset = "debug"
    cfg.data.train = [DataSource(path="x", weight=1.0)]
    cfg.data.seq_len, cfg.parallel.sequence_parallel = 100, 3
    with pytest.raises(ConfigError, match=r"data.seq_len=100 is not divisible by parallel.sequence_parallel=3"):
        validate(cfg)
    cfg.data.seq_len, cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel = 96, 2, 2
    with pytest.raises(ConfigError, match="cannot be combined"):
        validate(cfg)
    from lmforge.model import get_preset
    from lmforge.trainer.parallel.layout import check_sequence_parallel

    with pytest.raises(ConfigError, match="must divide the model's num_attention_heads=4"):
        check_sequence_parallel(get_preset("debug", vocab_size=300), 3)


@pytest.mark.slow
def test_world_not_divisible_by_s_is_a_config_error(short_docs, tmp_path):
    p = deepspeed_train(_config(tmp_path, short_docs, "bad", 4, 1), [], nproc=2, check=False)
    assert p.returncode != 0
    assert "world size 2 is not divisible by parallel.sequence_parallel=4" in p.stdout + p.stderr


@pytest.mark.slow
def test_zero3_hpz_on_two_nodes_matches_plain_zero3(tiny_data, tmp_path):
    """ZeRO++ hierarchical partitioning on two local "nodes" of 2 ranks each (two_nodes_local.sh: two
    launchers, node ranks 0 and 1), zero_hpz_partition_size = 2 = ranks per node, against plain ZeRO-3 on
    4 ranks: the same losses (hpZ changes where weights are gathered from, not what is computed; measured
    identical) and grad norms, and DeepSpeed really built the per-node secondary partitions."""
    from tests.helpers.paths import ROOT
    from tests.helpers.process import free_port

    # 3 steps: hpZ changes where each gather reads from, which the first step shows as well as the sixth.
    plain = write_config(tmp_path / "plain.yaml", tiny_data, tmp_path / "plain", parallel={"zero_stage": 3},
                         checkpoint={"interval": 0}, train={"max_steps": 3})
    deepspeed_train(plain, [], nproc=4)
    hpz = write_config(tmp_path / "hpz.yaml", tiny_data, tmp_path / "hpz", checkpoint={"interval": 0},
                       parallel={"zero_stage": 3, "zero_hpz_partition_size": 2}, train={"max_steps": 3})
    out = run_cmd(["bash", ROOT / "launch_scripts" / "two_nodes_local.sh", "-g", 2, "-p", free_port(), hpz])
    assert "world 4 = dp 4" in out.stdout
    assert "ZeRO++ hpZ: secondary weight partitions over groups of 2 ranks" in out.stdout
    _compare(last_rows(tmp_path / "plain"), last_rows(tmp_path / "hpz"), range(1, 4))

"""FP8 training (``train.precision: fp8``, ``trainer/parallel/fp8.py``) on CPU through torchao's emulation: the
same float8 rounding of operands and scales as on a GPU, computed in higher precision (no speed-up).

Sizes: the ``debug`` preset (d 64, MLP 176, 2 layers). Every decoder projection has dimensions that are multiples
of 16, so with ``parallel.fp8_layers: all`` all 14 convert and float8 rounding enters every matmul of the
decoder, forward and backward; tensorwise scaling does not depend on the size (one scale per tensor), so the
path is the one a large model takes. (``auto`` converts none of them at this width: the shape rule is tested
on the real ``1b`` shapes below.)
"""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge.model import build_config, build_model
from lmforge.trainer.config import ConfigError
from lmforge.trainer.parallel import fp8

# fp8 against bf16 over 6 steps at these sizes: measured 6.5e-5 relative at most (e4m3 keeps 3 mantissa bits;
# the per-element rounding averages out in a matmul over 64-176 terms and in the mean loss). 1e-3 is 15x that,
# and far below what a wrong scale would do (a scale off by 2x saturates or flushes values: O(1) loss changes).
REL = 1e-3


def test_the_shape_rule_on_real_shapes_and_the_refusals():
    with torch.device("meta"):
        big = build_model(build_config("llama", "1b", vocab_size=32000))
    linears = {n: m for n, m in big.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.0.")}
    assert len(linears) == 7
    def chosen(recipe):
        return sorted(n.rsplit(".", 1)[-1] for n, m in linears.items() if fp8.worth_converting(m, recipe, "auto"))

    # 1b: d 2048, 8 kv heads of 64 (k/v 2048 -> 512), MLP 8192. tensorwise: all but the narrow k/v projections
    assert chosen("tensorwise") == ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj"]
    # rowwise: out > 2048 and in > 1024 beyond the 4096 × 2048 corner: gate and up only
    assert chosen("rowwise") == ["gate_proj", "up_proj"]
    small = torch.nn.Linear(64, 176)
    assert not fp8.worth_converting(small, "tensorwise", "auto") and fp8.worth_converting(small, "tensorwise", "all")
    assert not fp8.worth_converting(torch.nn.Linear(64, 100), "tensorwise", "all")  # not a multiple of 16
    fp8.check("fp8", "tensorwise", "auto", 1)
    fp8.check("bf16", "nonsense", "nonsense", 4)  # not fp8: nothing to check
    for args, match in ((("fp8", "tensorwise", "auto", 2), "train.precision=fp8 with parallel.tensor_parallel=2"),
                        (("fp8", "delayed", "auto", 1), "parallel.fp8_recipe"),
                        (("fp8", "tensorwise", "some", 1), "parallel.fp8_layers")):
        with pytest.raises(ConfigError, match=match):
            fp8.check(*args)


def test_emulated_float8_layers_round_like_float8_in_both_recipes():
    """Both recipes convert and train a block: outputs and gradients close to bf16's, and not equal to them
    (the float8 rounding is really applied)."""
    torch.manual_seed(0)
    cfg = build_config("llama", "debug", vocab_size=256)
    for recipe in fp8.RECIPES:
        ref = build_model(cfg)
        model = build_model(cfg)
        model.load_state_dict(ref.state_dict())
        converted, kept = fp8.convert(model, recipe, "all")
        assert len(converted) == 14 and kept == ["lm_head"] and "Float8Linear" in type(
            model.model.layers[0].mlp.down_proj).__name__
        ids = torch.randint(0, 256, (2, 32))
        out = {}
        for name, m in (("bf16", ref), ("fp8", model)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(ids, labels=ids)
            loss.backward()
            out[name] = (loss.item(), m.model.layers[0].mlp.up_proj.weight.grad.clone())
        assert abs(out["fp8"][0] - out["bf16"][0]) / out["bf16"][0] < REL and out["fp8"][0] != out["bf16"][0]
        g8, g16 = out["fp8"][1], out["bf16"][1]
        assert torch.isfinite(g8).all() and not torch.equal(g8, g16)
        assert (g8 - g16).norm() / g16.norm() < 0.2, recipe  # float8's ~6% per-element error, averaged


@pytest.mark.slow
def test_fp8_trains_like_bf16_resumes_in_either_precision_and_exports(tmp_path, tiny_data):
    """2 ranks, ZeRO-3 (the converted layers' weights partitioned), emulated fp8 against bf16 on the same
    samples: every step's loss within 1e-3 relative and not identical; the step-3 checkpoint resumed in fp8
    continues bitwise, resumed in bf16 continues within the same bound (same checkpoint format: a bf16 engine
    either way); the fp8 checkpoint exports through the bf16 masters, verified."""
    import sys

    from tests.helpers.process import run_cmd
    from tests.helpers.runs import deepspeed_train, read_metrics, write_config

    def config(run, precision):
        return write_config(tmp_path / f"{run.name}.yaml", tiny_data, run,
                            train={"max_steps": 6, "micro_batch_size": 2, "seed": 7, "precision": precision,
                                   "compile": False},
                            parallel={"zero_stage": 3, "fp8_layers": "all"}, checkpoint={"interval": 3, "keep_last": 4})

    runs = {p: tmp_path / p for p in ("fp8", "bf16")}
    for precision, run in runs.items():
        out = deepspeed_train(config(run, precision), [], nproc=2).stdout
        assert ("14 linear layers converted" in out) == (precision == "fp8"), out[-2000:]
    loss = {p: [r["loss"] for r in read_metrics(run)] for p, run in runs.items()}
    for a, b in zip(loss["fp8"], loss["bf16"], strict=True):
        assert abs(a - b) / b < REL
    assert loss["fp8"] != loss["bf16"]

    for precision in ("fp8", "bf16"):  # resume the fp8 run's step-3 checkpoint in each precision
        resumed = tmp_path / f"resumed-{precision}"
        shutil.copytree(runs["fp8"], resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000006")
        (resumed / "checkpoints" / "latest").write_text("step_00000003")
        (resumed / "metrics.jsonl").unlink()
        assert "resumed from" in deepspeed_train(config(resumed, precision), [], nproc=2).stdout
        got = [r["loss"] for r in read_metrics(resumed)]
        if precision == "fp8":
            assert got == loss["fp8"][3:]
        else:
            assert all(abs(a - b) / b < REL for a, b in zip(got, loss["fp8"][3:], strict=True))
            assert got != loss["fp8"][3:]
    out = run_cmd([sys.executable, "-m", "lmforge.trainer.export_hf", "--checkpoint", runs["fp8"], "--output",
                   tmp_path / "export"])
    assert "exported and verified" in out.stdout + out.stderr

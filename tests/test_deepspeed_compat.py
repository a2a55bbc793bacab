"""Every workaround in trainer/parallel/deepspeed_compat.py, shown against the DeepSpeed behaviour it exists for.

Each case first reproduces the upstream behaviour on real DeepSpeed objects (a 1-rank gloo engine of the
debug preset) and then shows the fix. When a DeepSpeed upgrade makes a workaround unnecessary, its
"upstream" assertion fails here: that is the signal to delete the workaround (and to widen
``deepspeed_compat.TESTED``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from lmforge.trainer.parallel import deepspeed_compat
from tests.helpers.distributed import run_distributed


def test_version_guard(monkeypatch):
    import deepspeed

    assert deepspeed_compat.check_version() in deepspeed_compat.TESTED
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    monkeypatch.delenv(deepspeed_compat.ALLOW_ENV, raising=False)
    with pytest.raises(deepspeed_compat.DeepSpeedVersionError, match=r"0\.21\.0.*0\.19\.8.*LMFORGE_ALLOW"):
        deepspeed_compat.check_version()
    monkeypatch.setenv(deepspeed_compat.ALLOW_ENV, "1")
    assert deepspeed_compat.check_version() == "0.21.0"


def test_private_apis_exist():
    from deepspeed.utils import groups, zero_to_fp32

    assert callable(groups._init_tp_mesh_device)  # init_tensor_parallel_groups
    assert callable(zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint)  # zero_fp32_state_dict


def shm_segment_leak() -> tuple[bool, bool]:
    """Joins the process group the way DeepSpeed does (no lmforge init); -> (segment left after init,
    segment left after release_shm_segment)."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(auto_mpi_discovery=False)
    dist.barrier()
    path = deepspeed_compat.shm_segment_path(dist.get_rank())
    leaked = path.exists()
    deepspeed_compat.release_shm_segment()
    return leaked, path.exists()


def test_shm_segment_is_left_behind_and_released():
    # Upstream: DeepSpeed's CPU shared-memory all-reduce leaves its /dev/shm segment (66 MB of RAM).
    assert run_distributed(shm_segment_leak, 1, init=False, timeout=120) == [(True, False)]


def _engine(zero_stage: int, clip: float = 1.0):
    import deepspeed

    from lmforge.model import build_model, get_preset
    from lmforge.trainer.parallel.engine import param_groups

    torch.manual_seed(0)
    model = build_model(get_preset("debug", vocab_size=300))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": clip, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
              "zero_optimization": {"stage": zero_stage}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=config)
    return engine


def _step(engine, nan: bool = False) -> None:
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = engine(ids[:, :-1], labels=ids[:, 1:].contiguous())
    engine.backward(loss * float("nan") if nan else loss)
    engine.step()


def zero0_patches() -> dict:
    """ZeRO-0 fp32 engines with and without the patches (gradient norm; non-finite step)."""
    from lmforge.trainer.parallel.distributed import collective_device

    out = {}
    plain = _engine(0)
    _step(plain)
    out["norm_upstream"] = plain.get_global_grad_norm()
    patched = _engine(0)
    assert deepspeed_compat.keep_zero0_grad_norm(patched)
    _step(patched)
    out["norm_patched"] = float(patched.get_global_grad_norm())

    for name, guard in (("nan_upstream", False), ("nan_patched", True)):
        eng = _engine(0)
        if guard:
            assert deepspeed_compat.install_nonfinite_guard(eng, collective_device())
        before = [p.detach().clone() for p in eng.module.parameters()]
        _step(eng, nan=True)
        after = list(eng.module.parameters())
        out[name] = {"finite": all(torch.isfinite(p).all().item() for p in after),
                     "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                     "skipped": eng.skipped_steps}
    return out


def test_zero0_grad_norm_and_nonfinite_guard():
    (r,) = run_distributed(zero0_patches, 1, timeout=300)
    # Upstream: ZeRO-0 fp32 clips by the global norm but keeps none of it.
    assert r["norm_upstream"] is None
    assert r["norm_patched"] > 0 and r["norm_patched"] == r["norm_patched"]
    # Upstream: ZeRO-0 applies an update computed from NaN gradients.
    assert r["nan_upstream"] == {"finite": False, "unchanged": False, "skipped": 0}
    assert r["nan_patched"] == {"finite": True, "unchanged": True, "skipped": 1}


def zero3_universal_load(workdir: str) -> dict:
    """A ZeRO-3 engine with decay / no-decay groups, saved, converted to the universal format, and loaded
    into a fresh engine; the optimizer state as DeepSpeed leaves it and after ``fix_universal_load``."""
    from lmforge.trainer.checkpoint import ds_to_universal

    eng = _engine(3)
    _step(eng)
    eng.save_checkpoint(workdir, tag="t")
    ds_to_universal(Path(workdir) / "t", Path(workdir) / "t_universal", log=lambda m: None)
    eng.destroy()
    fresh = _engine(3)
    fresh._config.load_universal_checkpoint = True
    specific = deepspeed_compat.group_specific_hyperparams(fresh.optimizer)
    fresh.load_checkpoint(workdir, tag="t_universal")

    def observe():
        inner = getattr(fresh.optimizer, "optimizer", fresh.optimizer)
        steps = [s["step"] for s in inner.state.values() if torch.is_tensor(s.get("step"))]
        return {"weight_decay": [g["weight_decay"] for g in fresh.optimizer.param_groups],
                "distinct_step_tensors": len({id(t) for t in steps}), "step_tensors": len(steps)}

    upstream = observe()
    copied = deepspeed_compat.fix_universal_load(fresh.optimizer, specific)
    return {"upstream": upstream, "fixed": observe(), "copied": copied}


def test_zero3_universal_load_hyperparameters_and_step_counters():
    workdir = tempfile.mkdtemp(prefix="lmforge-uni-")
    try:
        (r,) = run_distributed(zero3_universal_load, 1, (workdir,), timeout=300)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # Upstream: group 0's weight decay lands on the no-decay group, and the two groups' Adam states share
    # one step tensor (advanced twice per step).
    assert r["upstream"]["weight_decay"] == [0.1, 0.1]
    assert r["upstream"]["step_tensors"] == 2 and r["upstream"]["distinct_step_tensors"] == 1
    assert r["fixed"]["weight_decay"] == [0.1, 0.0]
    assert r["fixed"]["distinct_step_tensors"] == 2 and r["copied"] == 1


def test_fix_universal_load_on_a_plain_optimizer():
    """The step-counter part on a real torch AdamW as DeepSpeed's loader leaves it: after the fix each
    group counts its own steps (before it, one optimizer.step() advanced the shared counter twice)."""
    def loaded_like_deepspeed() -> tuple[torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
        a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
        (a.sum() + b.sum()).backward()
        opt.step()
        opt.state[a]["step"] = opt.state[b]["step"] = torch.tensor(3.0)
        return opt, a, b

    opt, a, b = loaded_like_deepspeed()
    opt.step()
    assert opt.state[a]["step"].item() == opt.state[b]["step"].item() == 5.0
    opt, a, b = loaded_like_deepspeed()
    specific = [{"weight_decay": 0.1}, {"weight_decay": 0.0}]
    assert deepspeed_compat.fix_universal_load(opt, specific) == 1
    assert opt.state[a]["step"] is not opt.state[b]["step"]
    opt.step()
    assert opt.state[a]["step"].item() == opt.state[b]["step"].item() == 4.0
    assert deepspeed_compat.fix_universal_load(opt, specific) == 0  # idempotent
    opt.state[a]["step"] = opt.state[b]["step"] = 4  # int counters (DeepSpeed's CPU Adam) cannot alias
    assert deepspeed_compat.fix_universal_load(opt, specific) == 0


def autotp_zero3_schema() -> dict:
    """On each of 2 ranks: the debug model built as the trainer builds it for TP=2 × ZeRO-3 (zero.Init,
    every matrix above the persistence threshold 10·d partitioned), first as DeepSpeed's own zero.Init
    would group it, then the trainer's way, and AutoTP's universal-checkpoint schema before and after
    ``fix_autotp_replicated_shapes``."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from lmforge.model import build_model as build_module
    from lmforge.model import get_preset
    from lmforge.trainer.config import RunConfig
    from lmforge.trainer.parallel.ds_config import build_ds_config
    from lmforge.trainer.parallel.engine import build_model, initialize
    from lmforge.trainer.parallel.layout import init_layout

    layout = init_layout(2)
    cfg = RunConfig()
    cfg.parallel.zero_stage, cfg.parallel.tensor_parallel, cfg.train.precision = 3, 2, "fp32"
    mcfg = get_preset("debug", vocab_size=1000)
    ds_config = build_ds_config(cfg, layout.dp, "fp32", mcfg)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=layout.mpu):
        upstream = build_module(mcfg)
    upstream_group = dist.get_world_size(upstream.model.embed_tokens.weight.ds_process_group)
    model = build_model(mcfg, ds_config, 3, 0, layout)
    ours_group = dist.get_world_size(model.model.embed_tokens.weight.ds_process_group)
    saved = deepspeed_compat.fix_autotp_replicated_shapes
    deepspeed_compat.fix_autotp_replicated_shapes = lambda engine: []  # initialize() without the fix
    try:
        engine = initialize(model, cfg, ds_config, layout)
    finally:
        deepspeed_compat.fix_autotp_replicated_shapes = saved
    maps = getattr(engine.module, UNIVERSAL_CHECKPOINT_INFO)["affine_map"]["params"]
    key = r"^model\.embed_tokens\.weight$"
    before = maps[key]["logical_shape"]
    fixed = deepspeed_compat.fix_autotp_replicated_shapes(engine)
    return {"upstream_group": upstream_group, "ours_group": ours_group, "before": list(before),
            "after": list(maps[key]["logical_shape"]), "fixed": sorted(fixed),
            "partitioned": sum(getattr(p, "ds_persist", True) is False for p in engine.module.parameters())}


def test_autotp_zero3_checkpoint_schema_and_partition_group():
    """Upstream (DeepSpeed 0.19.8), with TP=2 × ZeRO-3 at sizes where ZeRO-3 partitions:
    * ``zero.Init(mpu=...)`` partitions over the world, not the data-parallel group, so the parameters
      AutoTP leaves whole were split across the tensor-parallel ranks (the optimizer files then held
      half of them: "start (0) + length (64000) exceeds dimension size (32000)" in ds_to_universal);
      trainer.parallel.engine.build_model passes the data-parallel group;
    * AutoTP's schema records those parameters with ZeRO-3's placeholder shape (0,), and the TP merge
      fails ("supplied a shard of 64 elements, but the map describes 0"); the fix records ds_shape."""
    results = run_distributed(autotp_zero3_schema, 2, timeout=300)
    for r in results:
        assert r["upstream_group"] == 2 and r["ours_group"] == 1, r  # dp = world / tp = 1
        assert r["before"] == [0] and r["after"] == [1000, 64], r
        assert r["fixed"] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                              "model.layers.0.post_attention_layernorm.weight",
                              "model.layers.1.input_layernorm.weight",
                              "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"], r
        assert r["partitioned"] == 15, r  # embedding + 14 TP-sharded matrices: the partitioned path


def ulysses_zero3(workdir: str) -> dict:
    """2 ranks, DeepSpeed-Ulysses S = 2 under ZeRO-3 (the trainer's layout, model build and sequence
    parallelism; ZeRO-3 partitions the debug preset's matrices because the persistence threshold is set
    below their size): the gradient norm of one step on one batch with and without
    ``fix_zero3_sequence_parallel_grads``, against the norm the same batch gives unsplit on each rank
    alone (ZeRO-0); and the parallel degrees a checkpoint records with and without the metadata fix."""
    import deepspeed
    import deepspeed.runtime.engine as ds_engine
    import torch.distributed as dist

    from lmforge.model import build_model, get_preset
    from lmforge.trainer.batching import sequence_slice
    from lmforge.trainer.parallel import engine as tengine
    from lmforge.trainer.parallel import transforms
    from lmforge.trainer.parallel.engine import param_groups
    from lmforge.trainer.parallel.layout import init_layout

    layout = init_layout(1, 2)
    # 1 kv head: S = 2 does not divide it, so k/v take the expansion path before the exchange, checked here
    # against the unsplit model's gradient (tests/test_sequence_parallel.py trains with 2 kv heads).
    mcfg = get_preset("debug", vocab_size=300, num_key_value_heads=1)
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100}}

    def norm(fix: bool) -> float:
        model = tengine.build_model(mcfg, config, 3, 0, layout)  # the same weights as an eager build
        transforms.parallelize(model, activation_checkpointing=0, sequence_parallel=2, sp_group=layout.sp_group)
        eng, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=config,
                                       mpu=layout.mpu)
        if fix:
            assert deepspeed_compat.fix_zero3_sequence_parallel_grads(eng, 2)
        eng.backward(eng(**sequence_slice(dict(batch), 2, layout.sp_rank)))
        eng.step()
        out = float(eng.get_global_grad_norm())
        eng.destroy()
        return out

    torch.manual_seed(0)
    whole = build_model(mcfg)  # the same initial weights, the whole batch, no parallelism
    whole(**batch).backward()
    reference = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in whole.parameters()])))
    upstream_meta = ds_engine._checkpoint_parallel_metadata.__wrapped__(layout.mpu)
    patched_meta = ds_engine._checkpoint_parallel_metadata(layout.mpu)
    out = {"reference": reference, "upstream": norm(False), "fixed": norm(True),
           "meta_upstream": upstream_meta, "meta_fixed": patched_meta}
    dist.barrier()
    return out


def test_ulysses_zero3_gradients_and_checkpoint_metadata():
    r0, r1 = run_distributed(ulysses_zero3, 2, ("",), timeout=300)
    assert r0 == r1
    # Upstream: ZeRO-3's reduce-scatter averages over the sequence-parallel ranks too: half the gradient.
    assert r0["upstream"] == pytest.approx(r0["reference"] / 2, rel=1e-5)
    assert r0["fixed"] == pytest.approx(r0["reference"], rel=1e-5)
    # Upstream: parallel_state_sp aliases model parallelism to sequence parallelism, so the checkpoint
    # records tensor-parallel degree 2 beside its single model-state file (the universal conversion
    # then fails; tests/test_sequence_parallel.py resumes such a checkpoint at S = 1).
    dims = next(iter(r0["meta_upstream"].values()))
    assert dims["tp_degree"] == 2
    assert next(iter(r0["meta_fixed"].values()))["tp_degree"] == 1

"""Every DeepSpeed private API, monkeypatch and workaround lmforge relies on, in one guarded place.

Each was written for DeepSpeed 0.19.8 (``TESTED``) and is reproduced by a test that shows the upstream
behaviour without our fix (``tests/test_deepspeed_compat.py`` unless said otherwise): when a DeepSpeed
upgrade makes one unnecessary, that test says so. On another DeepSpeed version ``check_version`` stops
the run with a clear message (set ``LMFORGE_ALLOW_UNTESTED_DEEPSPEED=1`` to try anyway).

=================================  ==========================================================================
what                               why
=================================  ==========================================================================
``init_tensor_parallel_groups``    private ``groups._init_tp_mesh_device``: AutoTP's (data, tensor) groups
                                   must exist before ``deepspeed.initialize`` so the trainer, the batch-size
                                   check and ZeRO see the data-parallel group, not the world
``zero_fp32_state_dict``           private ``zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint``: the
                                   lazy (one tensor at a time) consolidation the public wrapper hides
``keep_zero0_grad_norm``           patches ``engine.clip_fp32_gradients``: ZeRO-0 fp32 computes the global
                                   gradient norm to clip and throws it away (``get_global_grad_norm()`` is
                                   None)
``install_nonfinite_guard``        patches ``optimizer.step``: ZeRO-0 fp32/bf16 applies a step whose
                                   gradients are NaN; DeepSpeed's ZeRO 1-3 optimizers skip it
``fix_universal_load``             after a ZeRO-3 universal-checkpoint load: every param group got group 0's
                                   hyperparameters (weight decay on norms) and all Adam states share one
                                   ``step`` tensor (bias correction runs ahead); tests/test_resume.py shows
                                   the loss drift it caused
``fix_autotp_replicated_shapes``   AutoTP's universal-checkpoint schema records the parameters it does not
                                   shard (embeddings, norms) with ``param.shape``, which under ZeRO-3 is
                                   the empty placeholder (0,): the conversion of a TP × ZeRO-3 checkpoint
                                   then fails ("supplied a shard of N elements, but the map describes 0");
                                   rebuilt from ``ds_shape``
``install_checkpoint_writer``      replaces the engine's ``checkpoint_engine`` attribute: DeepSpeed's own
                                   asynchronous engines need CUDA/libaio (FastCheckpointEngine) or commit at
                                   the next optimizer step, and none computes checksums while writing
``release_shm_segment``            the CPU shared-memory all-reduce leaves a ~66 MB /dev/shm segment per rank
                                   behind (never unlinked): unlink ours once every rank has mapped it
``init_sequence_parallel_groups``  DeepSpeed-Ulysses' ``parallel_state_sp`` aliases model parallelism to
                                   sequence parallelism, so a checkpoint saved with it records tensor-
                                   parallel degree S beside one model-state file, and the universal
                                   conversion (resume on another S) fails ("model-state file count 1 does
                                   not match pp_degree=1 * tp_degree=2"); the saved degree is made 1 (the
                                   weights are not split by sequence parallelism)
``fix_zero3_sequence_parallel_grads`` ZeRO-3's reduce-scatter of gradients (``__avg_scatter_grads``, the
                                   default path) averages over all data- and sequence-parallel ranks, while
                                   its all-reduce path and ZeRO 0-2 sum over the S sequence-parallel ranks
                                   (dividing by the data-parallel size only): under Ulysses ZeRO-3 the
                                   gradients came out S times too small (grad norm halved at S = 2); the
                                   reduce-scattered partitions are multiplied by S
=================================  ==========================================================================
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

TESTED = ("0.19.8",)
ALLOW_ENV = "LMFORGE_ALLOW_UNTESTED_DEEPSPEED"


class DeepSpeedVersionError(RuntimeError):
    pass


def check_version() -> str:
    """The installed DeepSpeed version, if it is one the workarounds here were written and tested for."""
    import deepspeed

    version = deepspeed.__version__.split("+")[0]
    if version not in TESTED and os.environ.get(ALLOW_ENV) != "1":
        raise DeepSpeedVersionError(
            f"DeepSpeed {deepspeed.__version__} is installed; lmforge's DeepSpeed workarounds "
            f"(trainer/parallel/deepspeed_compat.py) were written and tested for {', '.join(TESTED)} only. Install "
            f"deepspeed=={TESTED[-1]} (make setup does), or set {ALLOW_ENV}=1 to try anyway and run "
            "tests/test_deepspeed_compat.py to see which workarounds still apply")
    return version


# --------------------------------------------------------------------------------------------------
# Private APIs


def init_tensor_parallel_groups(tp: int):
    """Create DeepSpeed's (data, tensor) process groups for AutoTP degree ``tp`` (collective); returns
    ``deepspeed.utils.groups``, which serves as the ``mpu`` of ``deepspeed.initialize``/``zero.Init``.
    The mesh puts tensor-parallel on the inner dimension: ranks [k*tp, (k+1)*tp) form one TP group."""
    check_version()
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    return groups


def init_sequence_parallel_groups(sp: int):
    """Create DeepSpeed-Ulysses' sequence- and sequence-data-parallel groups (collective); returns
    ``deepspeed.runtime.sequence_parallel.parallel_state_sp``, the ``mpu`` DeepSpeed's own Ulysses
    integration passes to ``deepspeed.initialize``. Also makes checkpoints saved under it record their
    true tensor-parallel degree, 1 (module docstring)."""
    check_version()
    import deepspeed.runtime.engine as ds_engine
    from deepspeed.checkpoint.constants import CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_TP_DEGREE
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    original = getattr(ds_engine._checkpoint_parallel_metadata, "__wrapped__", ds_engine._checkpoint_parallel_metadata)

    def metadata(mpu):
        meta = original(mpu)
        if mpu is parallel_state_sp:  # its model-parallel functions are the sequence-parallel ones
            meta[CHECKPOINT_PARALLEL_DIMS][CHECKPOINT_TP_DEGREE] = 1
        return meta

    metadata.__wrapped__ = original
    ds_engine._checkpoint_parallel_metadata = metadata
    parallel_state_sp.initialize_sequence_parallel(sp)
    return parallel_state_sp


def fix_zero3_sequence_parallel_grads(engine, sp: int) -> bool:
    """Make ZeRO-3's reduce-scatter path sum gradients over the ``sp`` sequence-parallel ranks, as its
    all-reduce path and ZeRO 0-2 do (module docstring); True if installed."""
    opt = getattr(engine, "optimizer", None)
    name = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"
    if sp <= 1 or not hasattr(opt, name):
        return False
    original = getattr(opt, name)

    def avg_scatter_grads(params, communication_data_type):
        return [g.mul_(sp) for g in original(params, communication_data_type)]

    setattr(opt, name, avg_scatter_grads)
    return True


def zero_fp32_state_dict(tag_dir: Path) -> dict:
    """fp32 masters of a ZeRO 1-3 checkpoint tag directory, consolidated by DeepSpeed's zero_to_fp32;
    ZeRO-3 tensors are gathered lazily, one parameter when it is read (``.contiguous()``)."""
    check_version()
    from deepspeed.utils import zero_to_fp32

    return zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), False)


# --------------------------------------------------------------------------------------------------
# Monkeypatches on a built engine


def keep_zero0_grad_norm(engine) -> bool:
    """Make ``engine.get_global_grad_norm()`` work without ZeRO too.

    With ZeRO 1-3 (and DeepSpeed's bf16/fp16 wrappers) the optimizer records the global norm. Plain
    ZeRO-0 fp32 clips with ``deepspeed.runtime.utils.clip_grad_norm_`` (tensor-parallel aware: replicated
    parameters counted once, sharded ones summed over the TP group) but drops the norm it computed; keep
    it. Only when clipping is on (``optim.grad_clip`` > 0): otherwise DeepSpeed computes no norm at all.
    Returns whether the patch was installed."""
    check_version()
    if (engine.zero_optimization() or engine.gradient_clipping() <= 0
            or hasattr(engine.optimizer, "_global_grad_norm")):
        return False
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep_norm() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_keep_norm
    return True


def install_nonfinite_guard(engine, collective_device: torch.device) -> bool:
    """Give a ZeRO-0 fp32/bf16 engine's plain torch optimizer the overflow check DeepSpeed's own
    optimizers have: ``step()`` checks every gradient, and if any is non-finite on any rank it does
    nothing and sets ``optimizer.overflow``, which the engine reads to count the step as skipped (and
    to leave the LR schedule alone). Returns whether a guard was installed."""
    check_version()
    opt = engine.optimizer
    if engine.zero_optimization() or hasattr(opt, "overflow") or opt is None:
        return False
    inner_step = opt.step  # bound method, possibly the LR scheduler's step-tracking wrapper

    def guarded_step(*args, **kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.zeros(1, device=grads[0].device if grads else collective_device)
        if grads:
            # One reduction over all tensors (a per-tensor .item() would sync once per parameter).
            bad = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float().reshape(1)
        # Gradients are already averaged across data-parallel ranks; tensor-parallel shards differ.
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        opt.overflow = bool(bad.item() > 0)
        if opt.overflow:
            return None
        return inner_step(*args, **kwargs)

    opt.overflow = False
    opt.step = guarded_step
    return True


# --------------------------------------------------------------------------------------------------
# AutoTP × ZeRO-3 universal-checkpoint schema


def fix_autotp_replicated_shapes(engine) -> list[str]:
    """Rebuild the replicated-parameter maps of AutoTP's universal-checkpoint info from the parameters'
    real (``ds_shape``) shapes where ZeRO-3 had left only its placeholder; returns the names fixed."""
    from deepspeed.checkpoint.affine import replicated_map
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    info = getattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, None)
    maps = ((info or {}).get("affine_map") or {}).get("params") or {}
    if not maps:
        return []
    tp = max((len(m.get("ranks", {})) for m in maps.values()), default=0)
    fixed = []
    for name, p in engine.module.named_parameters():
        key = "^" + re.escape(name) + "$"
        m = maps.get(key)
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if m is not None and list(m.get("logical_shape", [])) == [0] and shape != (0,):
            maps[key] = replicated_map(shape, tp).to_dict()
            fixed.append(name)
    return fixed


# Background checkpoint writes


def install_checkpoint_writer(engine, writer_cls, **kw):
    """The engine's checkpoint engine replaced by ``writer_cls(original, **kw)`` (once; returns the writer).
    DeepSpeed calls ``engine.checkpoint_engine.save(state_dict, path)`` for every file it writes."""
    current = engine.checkpoint_engine
    if not isinstance(current, writer_cls):
        engine.checkpoint_engine = writer_cls(current, **kw)
    return engine.checkpoint_engine


# Universal-checkpoint load


def group_specific_hyperparams(optimizer) -> list[dict]:
    """Per param group, the hyperparameters whose values differ between groups (as constructed): what
    ``fix_universal_load`` restores. Call it before ``engine.load_checkpoint``."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    keys = {k for g in groups for k in g if any(g.get(k) != other.get(k) for other in groups)}
    return [{k: g[k] for k in keys if k in g} for g in groups]


def fix_universal_load(optimizer, specific: list[dict]) -> int:
    """Undo what DeepSpeed 0.19.8's ZeRO-3 universal loader
    (``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``) gets wrong; returns how many
    shared step counters were separated.

    * It copies ``param_groups[0]``'s hyperparameters into every group, giving the no-decay group
      (norms) weight decay: restore ``specific`` (from ``group_specific_hyperparams``).
    * It assigns one and the same ``step`` tensor to every flat fp32 partition's Adam state. ZeRO-3 calls
      ``optimizer.step()`` once per sub-group and torch's Adam increments ``step`` in place, so with two
      param groups the shared counter advances twice per optimizer step and the second group's bias
      correction runs ahead (measured on a 2 -> 1 rank resume: losses off by 2.4e-7, then 9.4e-5
      relative, growing). Give every state its own counter; the values loaded were right.
    """
    for group, values in zip(optimizer.param_groups, specific, strict=True):
        group.update(values)
    inner = getattr(optimizer, "optimizer", optimizer)
    seen: set[int] = set()
    copied = 0
    for state in inner.state.values():
        step = state.get("step")
        if not torch.is_tensor(step):
            continue  # an int counter (e.g. DeepSpeed's CPU Adam) is never shared in place
        if id(step) in seen:
            state["step"] = step.clone()
            copied += 1
        else:
            seen.add(id(step))
    return copied


# --------------------------------------------------------------------------------------------------
# Shared-memory segments of the CPU all-reduce


def shm_segment_path(rank: int, addr: str | None = None, port: int | str | None = None) -> Path:
    """The /dev/shm file DeepSpeed's CPU shared-memory all-reduce creates for ``rank`` of the job whose
    rendezvous is addr:port (default: this process's MASTER_ADDR/MASTER_PORT)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_segment() -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce segment as soon as every rank has mapped it.

    When all ranks of a CPU job share one node, DeepSpeed's shm all-reduce op creates a ~66 MB segment
    per rank in /dev/shm during ``init_distributed`` (each rank maps every other rank's segment before
    returning) and never unlinks it. /dev/shm is RAM: every run leaked 66 MB per rank until the machine
    ran out of memory. After a barrier every mapping exists, so the names can go now; the memory is
    freed when the last process exits, however it exits (kill -9 included)."""
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    shm_segment_path(dist.get_rank()).unlink(missing_ok=True)


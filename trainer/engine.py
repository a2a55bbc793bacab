"""Parallel layout, model construction and the DeepSpeed engine (ZeRO 0-3, AutoTP, offload).

The training-time transformations of the model (activation checkpointing, the attention policy) and
the order in which they and DeepSpeed's AutoTP and ZeRO apply are in ``trainer/parallelize.py``.

What this module decides, and why:

* **Layout from DeepSpeed's own groups.** With ``parallel.tensor_parallel`` = T > 1 we create DeepSpeed's
  (data, tensor) device mesh *before* ``deepspeed.initialize`` (``deepspeed_compat``) and pass
  ``deepspeed.utils.groups`` as ``mpu``. Then the batch-size check in DeepSpeed's config counts
  data-parallel ranks (not the whole world), ZeRO partitions over the data-parallel group only, and the
  trainer reads its data-parallel rank/size from the same groups the engine uses instead of assuming a
  rank formula. (The mesh puts tensor-parallel on the inner dimension: ranks [k*T, (k+1)*T) form one
  TP group.)
* **ZeRO-3 builds under ``deepspeed.zero.Init``**, so no rank ever holds more than one module's full
  weights. ``LlamaForCausalLM.__init__`` runs ``reset_parameters`` on what are by then empty shards, so we
  re-initialise afterwards, one module at a time inside ``GatheredParameters(modifier_rank=0)``, with the
  model's own ``init_module_weights`` in ``named_modules()`` order: the weights are bitwise those of an
  unpartitioned build with the same seed (tests/test_parallel_parity.py checks ZeRO-3 against ZeRO-0..2).
  ``model.init_from_hf`` weights are copied in the same gathered pass.
* **Param groups from logical shapes.** Under zero.Init a parameter's ``.data`` is an empty 1-D shard; the
  decay / no-decay split must use ``ds_shape`` or every matrix would silently lose weight decay.
* **AutoTP.** DeepSpeed's heuristic AutoTP (our module names are HF Llama's) column-shards q/k/v/gate/up,
  row-shards o/down (all-reduce of the partial outputs), and keeps embeddings, the tied ``lm_head`` and
  the norms replicated; their gradients are averaged over the TP group by DeepSpeed's replicated-grad
  hooks. Each TP rank must hold whole query *and* key/value heads (the attention derives its local head
  count from shapes), so T must divide ``num_key_value_heads``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model import LlamaForCausalLM, ModelConfig

from . import deepspeed_compat
from .config import ConfigError, RunConfig
from .schedule import lr_lambda


@dataclass(frozen=True)
class Layout:
    """This rank's place in the world = data-parallel × tensor-parallel grid."""

    world: int
    rank: int
    local_rank: int  # on this node (the launcher's LOCAL_RANK)
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int
    mpu: Any = None  # DeepSpeed's groups for tp > 1 or sp > 1 (passed to deepspeed.initialize / zero.Init)
    sp: int = 1  # sequence-parallel (Ulysses) degree
    sp_rank: int = 0
    sp_group: Any = None

    @property
    def zero_partitions(self) -> int:
        """Ranks ZeRO shards the model and optimizer over: data-parallel × sequence-parallel."""
        return self.dp * self.sp


def init_layout(tp: int, sp: int = 1) -> Layout:
    """Create DeepSpeed's tensor/data- or sequence/data-parallel groups (collective; after
    init_distributed). Sequence parallelism uses DeepSpeed's own Ulysses groups
    (``deepspeed.runtime.sequence_parallel.parallel_state_sp``, the ``mpu`` its ALST integration passes):
    ranks [k*S, (k+1)*S) form one sequence-parallel group and read the same samples; data-parallel rank
    = rank // S; ZeRO partitions over all ranks (the sequence-data-parallel group)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if tp < 1 or world % tp:
        raise ConfigError(f"world size {world} is not divisible by parallel.tensor_parallel={tp}")
    if sp < 1 or world % sp:
        raise ConfigError(f"world size {world} is not divisible by parallel.sequence_parallel={sp}")
    if sp > 1 and tp > 1:
        raise ConfigError("parallel.sequence_parallel > 1 with parallel.tensor_parallel > 1 is not supported: "
                          "use one of them (DeepSpeed-Ulysses and AutoTP would each split the attention heads)")
    if sp > 1:
        sp_groups = deepspeed_compat.init_sequence_parallel_groups(sp)
        return Layout(world, rank, local_rank, 1, 0, world // sp, rank // sp, sp_groups, sp,
                      sp_groups.get_sequence_parallel_rank(), sp_groups.get_sequence_parallel_group())
    if tp == 1:
        return Layout(world, rank, local_rank, 1, 0, world, rank)
    groups = deepspeed_compat.init_tensor_parallel_groups(tp)
    layout = Layout(world, rank, local_rank, tp, groups.get_tensor_model_parallel_rank(),
                    groups.get_data_parallel_world_size(),
                    groups.get_data_parallel_rank(), groups)
    if layout.dp * tp != world:
        raise RuntimeError(f"DeepSpeed groups: dp {layout.dp} × tp {tp} != world {world}")
    return layout


def check_tensor_parallel(mcfg: ModelConfig, tp: int) -> None:
    """AutoTP shards attention by heads and the MLP by columns; refuse layouts it would split unevenly."""
    if tp == 1:
        return
    if mcfg.num_key_value_heads % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} must divide num_key_value_heads={mcfg.num_key_value_heads}: every "
            "tensor-parallel rank needs whole key/value heads (and their query groups)"
        )
    if mcfg.intermediate_size % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} must divide intermediate_size={mcfg.intermediate_size}")


def check_sequence_parallel(mcfg: ModelConfig, sp: int) -> None:
    """Ulysses gives each sequence-parallel rank num_attention_heads / S whole heads."""
    if sp > 1 and mcfg.num_attention_heads % sp:
        raise ConfigError(f"parallel.sequence_parallel={sp} must divide the model's num_attention_heads="
                          f"{mcfg.num_attention_heads}: after the all-to-all each rank attends with whole heads")


def hpz_group_size(model: torch.nn.Module) -> int:
    """The ranks ZeRO++ hpZ partitions the secondary copy of the weights over (1 = hpZ off), as DeepSpeed
    recorded it on the partitioned parameters."""
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            return int(getattr(p, "ds_secondary_tensor_group_size", None) or 1)
    return 1


def _shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned params keep the logical shape here


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (incl. embeddings); no decay on norms and biases (1-D tensors)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if len(_shape(p)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(mcfg: ModelConfig, ds_config: dict, zero_stage: int, seed: int, layout: Layout,
                init_state: dict | None = None) -> LlamaForCausalLM:
    """The same initial weights on every rank and at every ZeRO stage for a given seed."""
    torch.manual_seed(seed)
    if zero_stage != 3:
        model = LlamaForCausalLM(mcfg)
        if init_state is not None:
            model.load_state_dict(init_state, strict=True)
    else:
        import deepspeed

        # Partition over the data-parallel group, as the ZeRO-3 optimizer and checkpoints assume: zero.Init
        # ignores ``mpu`` and would use the world, so that under tensor parallelism the parameters AutoTP
        # does not shard (embeddings, norms) were split across the TP ranks too, and DeepSpeed's universal
        # conversion of such a checkpoint fails (tests/test_export_hf.py, TP-2 ZeRO-3 through the trainer).
        group = None
        if layout.sp > 1:  # ZeRO shards over data- and sequence-parallel ranks alike
            group = layout.mpu.get_sequence_data_parallel_group()
        elif layout.mpu is not None:
            group = layout.mpu.get_data_parallel_group()
        with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=layout.mpu, data_parallel_group=group):
            model = LlamaForCausalLM(mcfg)
        if init_state is not None:
            missing = set(model.state_dict()) ^ set(init_state)
            if missing:
                raise ConfigError(f"model.init_from_hf: state dict keys differ from the model: {sorted(missing)[:5]}")
        # No re-seed: construction drew the same default-init numbers as an eager build, and the no-op
        # reset_parameters on empty shards drew none, so the RNG stands where an eager reset would start.
        _reinit_partitioned(model, init_state)
    return model


@torch.no_grad()
def _reinit_partitioned(model: LlamaForCausalLM, init_state: dict | None) -> None:
    import deepspeed

    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            if init_state is None:
                model.init_module_weights(name, module)
            else:
                for pname, p in params:
                    p.copy_(init_state[f"{name}.{pname}" if name else pname])


def initialize(model: LlamaForCausalLM, cfg: RunConfig, ds_config: dict, layout: Layout):
    """``deepspeed.initialize`` with the trainer's AdamW param groups and LR schedule, plus the
    ``deepspeed_compat`` patches every lmforge engine gets (grad norm and non-finite guard at ZeRO-0)."""
    import deepspeed

    from .distributed import collective_device

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=ds_config,
        mpu=layout.mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    deepspeed_compat.install_nonfinite_guard(engine, collective_device())
    deepspeed_compat.keep_zero0_grad_norm(engine)  # grad_norm in the metrics at ZeRO-0 too
    deepspeed_compat.fix_autotp_replicated_shapes(engine)  # TP × ZeRO-3 checkpoints convert and export
    deepspeed_compat.fix_zero3_sequence_parallel_grads(engine, layout.sp)  # gradients summed over SP ranks
    return engine

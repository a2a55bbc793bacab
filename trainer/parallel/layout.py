"""The parallel layout: this rank's place in the data × tensor × sequence-parallel grid, from DeepSpeed's own
process groups, and the checks that a model can be split that way.

* **Layout from DeepSpeed's own groups.** With ``parallel.tensor_parallel`` = T > 1 we create DeepSpeed's
  (data, tensor) device mesh *before* ``deepspeed.initialize`` (``deepspeed_compat``) and pass
  ``deepspeed.utils.groups`` as ``mpu``. Then the batch-size check in DeepSpeed's config counts
  data-parallel ranks (not the whole world), ZeRO partitions over the data-parallel group only, and the
  trainer reads its data-parallel rank/size from the same groups the engine uses instead of assuming a
  rank formula. (The mesh puts tensor-parallel on the inner dimension: ranks [k*T, (k+1)*T) form one
  TP group.)
* **Sequence parallelism** (Ulysses, S > 1) uses DeepSpeed's ``parallel_state_sp`` groups: ranks
  [k*S, (k+1)*S) form one group and read the same samples; ZeRO partitions over all ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from lmforge.model import ModelConfig

from ..config import ConfigError
from . import deepspeed_compat


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
    """AutoTP shards attention by heads and the MLP by columns (the families' ``tp_plan``); refuse layouts it
    would split unevenly."""
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


def check_experts(mcfg: ModelConfig, tp: int, sp: int) -> None:
    """A Mixture of Experts (a config with ``num_experts``) trains data-parallel, with its experts spread over
    groups of ranks by ``parallel.expert_parallel`` (``experts.py``), at any ZeRO stage; tensor parallelism
    does not split its experts, and under sequence parallelism each rank's auxiliary loss would be of its
    slice of the sequence and be counted S times: both are refused."""
    if not getattr(mcfg, "num_experts", 0):
        return
    for key, size in (("tensor_parallel", tp), ("sequence_parallel", sp)):
        if size > 1:
            raise ConfigError(f"parallel.{key}={size} with a {mcfg.family} model (num_experts="
                              f"{mcfg.num_experts}): not supported; a Mixture of Experts trains data-parallel at any "
                              "ZeRO stage, its experts spread by parallel.expert_parallel (set parallel.{key}=1)"
                              .replace("{key}", key))

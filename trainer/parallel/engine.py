"""Model construction and the DeepSpeed engine (ZeRO 0-3, AutoTP, offload).

What this module decides, and why:

* **ZeRO-3 builds under ``deepspeed.zero.Init``**, so no rank ever holds more than one module's full
  weights. The model's ``__init__`` runs ``reset_parameters`` on what are by then empty shards, so we
  re-initialise afterwards, one module at a time inside ``GatheredParameters(modifier_rank=0)``, with the
  model's own ``init_module_weights`` in ``named_modules()`` order: the weights are bitwise those of an
  unpartitioned build with the same seed (tests/test_parallel_parity.py checks ZeRO-3 against ZeRO-0..2).
  ``model.init_from_hf`` weights are copied in the same gathered pass.
* **Param groups from logical shapes.** Under zero.Init a parameter's ``.data`` is an empty 1-D shard; the
  decay / no-decay split must use ``ds_shape`` or every matrix would silently lose weight decay.
* **AutoTP.** DeepSpeed's configurable AutoTP shards what the family's ``tp_plan`` says, handed to it as a
  ``partition_config`` (``ds_config.py``; Llama, Qwen3: q/k/v/gate/up by columns, o/down by rows with an
  all-reduce of the partial outputs; embeddings, the head and the norms replicated, Qwen3's q/k norms with
  their gradient summed over the TP ranks). ``initialize`` checks that it did exactly that (``tp_plan.py``),
  and turns DeepSpeed's refusal of a linear layer the plan does not name into a start-up error that says so.
"""

from __future__ import annotations

import torch

from lmforge.model import CausalLM, ModelConfig, family_of, parameter_shapes
from lmforge.model import build_model as build_module

from ..config import ConfigError, RunConfig
from ..schedule import lr_lambda
from . import deepspeed_compat, experts, tp_plan
from .layout import Layout


def hpz_group_size(model: torch.nn.Module) -> int:
    """The ranks ZeRO++ hpZ partitions the secondary copy of the weights over (1 = hpZ off), as DeepSpeed
    recorded it on the partitioned parameters."""
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            return int(getattr(p, "ds_secondary_tensor_group_size", None) or 1)
    return 1


def param_groups(model: torch.nn.Module, weight_decay: float, named: bool = False) -> list[dict]:
    """AdamW groups: decay matrices (incl. embeddings); no decay on norms and biases (1-D tensors).
    ``named``: each group carries a ``name``, which DeepSpeed's MoE path needs to split off the expert
    parameters into groups of their own (expert parallelism)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if len(tp_plan.logical_shape(p)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if named:
        groups[0]["name"], groups[1]["name"] = "decay", "no_decay"
    return groups


def build_model(mcfg: ModelConfig, ds_config: dict, zero_stage: int, seed: int, layout: Layout,
                init_state: dict | None = None) -> CausalLM:
    """The same initial weights on every rank and at every ZeRO stage for a given seed."""
    torch.manual_seed(seed)
    if zero_stage != 3:
        model = build_module(mcfg)
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
            model = build_module(mcfg)
        if init_state is not None:
            missing = set(model.state_dict()) ^ set(init_state)
            if missing:
                raise ConfigError(f"model.init_from_hf: state dict keys differ from the model: {sorted(missing)[:5]}")
        # No re-seed: construction drew the same default-init numbers as an eager build, and the no-op
        # reset_parameters on empty shards drew none, so the RNG stands where an eager reset would start.
        _reinit_partitioned(model, init_state)
    return model


@torch.no_grad()
def _reinit_partitioned(model: CausalLM, init_state: dict | None) -> None:
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


def initialize(model: CausalLM, cfg: RunConfig, ds_config: dict, layout: Layout):
    """``deepspeed.initialize`` with the trainer's AdamW param groups and LR schedule, plus the
    ``deepspeed_compat`` patches every lmforge engine gets (grad norm and non-finite guard at ZeRO-0); with
    tensor parallelism, the check that AutoTP sharded the model as its family's plan says."""
    import deepspeed

    from .distributed import collective_device

    family = family_of(model.config)
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay, named=cfg.parallel.expert_parallel > 0),
            config=ds_config,
            mpu=layout.mpu,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        )
    except ValueError as e:
        error = tp_plan.start_up_error(e, family, layout.tp) if layout.tp > 1 else None
        if error is None:
            raise
        raise error from None
    if layout.tp > 1:
        tp_plan.check(engine.module, family, layout.tp, parameter_shapes(model.config))
    if cfg.parallel.expert_parallel:  # AutoEP replaced the sparse blocks: their router logits for the losses
        experts.capture_router_logits(engine.module, len(engine.module.moe_blocks()))
    deepspeed_compat.install_nonfinite_guard(engine, collective_device())
    deepspeed_compat.keep_zero0_grad_norm(engine)  # grad_norm in the metrics at ZeRO-0 too
    deepspeed_compat.fix_autotp_replicated_shapes(engine)  # TP × ZeRO-3 checkpoints convert and export
    deepspeed_compat.fix_zero3_sequence_parallel_grads(engine, layout.sp)  # gradients summed over SP ranks
    return engine

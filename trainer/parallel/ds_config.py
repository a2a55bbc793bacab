"""Derive the DeepSpeed JSON from the run config.

The run config owns batch sizes, precision, ZeRO stage, offload, clipping, optimizer and tensor
parallelism; a ``parallel.ds_config`` template may add anything else (communication bucket sizes,
``zero_optimization`` tuning such as ``overlap_comm``, ...). A template that sets a value the run
config owns is an error, so no value is ever held in two places.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.common.files import read_json
from lmforge.model import ModelConfig, family_of
from lmforge.model.registry import plan_regex

from ..config import ConfigError, RunConfig
from . import experts

# (dotted key in the DeepSpeed JSON) -> (run-config key that owns it)
OWNED = {
    "train_batch_size": "train.micro_batch_size × train.grad_accum × data-parallel size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.*",
    "scheduler": "optim.schedule",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer": "parallel.offload",
    "zero_optimization.offload_param": "parallel.offload",
    "zero_optimization.zero_hpz_partition_size": "parallel.zero_hpz_partition_size",
    "zero_optimization.zero_quantized_weights": "parallel.zero_quantized_weights",
    "zero_optimization.zero_quantized_gradients": "parallel.zero_quantized_gradients",
    "tensor_parallel": "parallel.tensor_parallel",
    "expert_parallel": "parallel.expert_parallel",
    "activation_checkpointing": "parallel.activation_checkpointing",
}


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on accelerators with native bf16 (CUDA Ampere and newer), else fp32.

    On CPU, bf16 matmuls are emulated on most chips (a bf16 DeepSpeed ZeRO-2 step measured ~3x
    slower than fp32 on the 2-core dev machine), so auto never picks bf16 there.
    """
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("train.precision=fp16 needs CUDA (DeepSpeed's fp16 does not run on CPU)")
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _get(d: dict, dotted: str):
    node = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_template(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    tpl = read_json(p, ConfigError, missing="parallel.ds_config names a file that does not exist")
    if not isinstance(tpl, dict):
        raise ConfigError(f"{p}: a DeepSpeed config template must be a JSON object")
    tpl.pop("_comment", None)
    for key, owner in OWNED.items():
        if _get(tpl, key) is not None:
            raise ConfigError(
                f"{p}: sets {key!r}, which the run config owns ({owner}); set it there instead"
            )
    return tpl


def communication_defaults(zero_stage: int, hidden_size: int, precision: str, cuda: bool) -> tuple[dict, dict]:
    """(top-level keys, zero_optimization keys) chosen for the model size; a template's values win.

    * Half-precision gradients are reduced in fp32 (``communication_data_type``): a bf16 sum over many
      ranks keeps 8 bits of mantissa, which Megatron (``--accumulate-allreduce-grads-in-fp32``) and
      torchtitan (FSDP ``reduce_dtype=float32``) avoid too; it doubles the reduction's bytes. Gradient
      accumulation across micro-batches stays in the model dtype (DeepSpeed's default; a template may set
      ``data_types.grad_accum_dtype: fp32``, which at ZeRO-1 selects DeepSpeed's BF16_Optimizer).
    * Buckets follow the hidden size d as in DeepSpeed's Hugging Face integration (``"auto"``):
      reduce bucket d² elements, ZeRO-3 prefetch bucket 0.9·d², and parameters of at most 10·d elements
      (norm weights) persist instead of being gathered every time; so every matrix of a real model is
      partitioned and gathered by ZeRO-3, at every size.
    * ``overlap_comm`` on CUDA: the reduce-scatter (ZeRO-1/2) or prefetch (ZeRO-3) overlaps backward /
      forward compute, for ~4.5 reduce buckets of extra memory; off on CPU, where gloo's collectives
      take the same cores as the compute."""
    top = {"communication_data_type": "fp32"} if precision in ("bf16", "fp16", "fp8") else {}
    zero: dict = {}
    if zero_stage >= 1:
        zero = {"overlap_comm": cuda, "contiguous_gradients": True, "reduce_bucket_size": hidden_size**2}
    if zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden_size**2),
                    stage3_param_persistence_threshold=10 * hidden_size)
    return top, zero


def autotp_partition_config(tp_plan: dict[str, str]) -> dict:
    """A family's tensor-parallel plan (``Family.tp_plan``: module-name pattern -> style) as DeepSpeed's
    configurable-AutoTP ``partition_config``: one layer spec per pattern, matched against the full parameter
    name; replicated modules are "skip" specs (with ``grad_allreduce`` where the plan says their gradient is
    summed over the TP ranks). ``use_default_specs`` off and ``strict_mode`` on: AutoTP then shards exactly
    what the plan says, and a linear layer the plan does not name is an error at start-up."""
    specs = []
    for pattern, style in tp_plan.items():
        spec = {"patterns": ["^" + plan_regex(pattern) + r"\.weight$"],
                "partition_type": {"column": "column", "row": "row"}.get(style, "skip")}
        if style == "replicated_with_grad_allreduce":
            spec["grad_allreduce"] = True
        specs.append(spec)
    return {"use_default_specs": False, "strict_mode": True, "layer_specs": specs}


def build_ds_config(cfg: RunConfig, dp_size: int, precision: str, model: ModelConfig | None = None) -> dict:
    """The DeepSpeed JSON of a run; with the model's config, the communication settings
    ``communication_defaults`` chooses from its width where the template sets none, and under tensor
    parallelism its family's plan for AutoTP (``autotp_partition_config``)."""
    hidden_size = model.hidden_size if model is not None else None
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    ds = load_template(p.ds_config)
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * dp_size
    ds["gradient_clipping"] = o.grad_clip
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)

    zero = dict(ds.get("zero_optimization", {}))
    if hidden_size is not None:
        top, zero_defaults = communication_defaults(p.zero_stage, hidden_size, precision, torch.cuda.is_available())
        for k, v in top.items():
            ds.setdefault(k, v)
        zero = {**zero_defaults, **zero}
    zero["stage"] = p.zero_stage
    if p.zero_hpz_partition_size > 1:  # ZeRO++ hpZ: a secondary copy of the weights within each node
        zero["zero_hpz_partition_size"] = p.zero_hpz_partition_size
    if (p.zero_quantized_weights or p.zero_quantized_gradients) and not torch.cuda.is_available():
        raise ConfigError("parallel.zero_quantized_weights / zero_quantized_gradients (ZeRO++ qwZ/qgZ) need CUDA: "
                          "DeepSpeed's quantizer kernels have no CPU implementation")
    if p.zero_quantized_weights:  # ZeRO++ qwZ
        zero["zero_quantized_weights"] = True
    if p.zero_quantized_gradients:  # ZeRO++ qgZ
        zero["zero_quantized_gradients"] = True
    if p.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds["zero_optimization"] = zero

    if precision in ("bf16", "fp8"):  # fp8: a bf16 engine whose linear layers compute in float8 (fp8.py)
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}

    # AdamW built by DeepSpeed from our param groups (decay / no-decay). Without offload: torch's AdamW,
    # fused into one kernel per step on CUDA (as fast as DeepSpeed's FusedAdam, which would need nvcc to
    # JIT-build on every new machine). With offload DeepSpeed picks its CPU Adam.
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
    }
    if p.offload == "none":
        ds["optimizer"]["params"]["torch_adam"] = True
        if torch.cuda.is_available():
            ds["optimizer"]["params"]["fused"] = True

    if p.expert_parallel:
        if model is None:
            raise ValueError("build_ds_config: expert parallelism needs the model config")
        ds["expert_parallel"] = experts.ds_section(model, p.expert_parallel)
    if p.tensor_parallel > 1:
        if model is None:
            raise ValueError("build_ds_config: tensor parallelism needs the model config (its family's plan)")
        ds["tensor_parallel"] = {"autotp_size": p.tensor_parallel,
                                 "partition_config": autotp_partition_config(family_of(model).tp_plan)}
    return ds

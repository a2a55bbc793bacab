"""Derive the DeepSpeed JSON from the run config.

The run config owns batch sizes, precision, ZeRO stage, offload, clipping, optimizer and tensor
parallelism; a ``parallel.ds_config`` template may add anything else (communication bucket sizes,
``zero_optimization`` tuning such as ``overlap_comm``, ...). A template that sets a value the run
config owns is an error, so no value is ever held in two places.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipeline.common.files import read_json

from .config import ConfigError, RunConfig

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
    "tensor_parallel": "parallel.tensor_parallel",
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


def build_ds_config(cfg: RunConfig, dp_size: int, precision: str) -> dict:
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    ds = load_template(p.ds_config)
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * dp_size
    ds["gradient_clipping"] = o.grad_clip
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)

    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = p.zero_stage
    if p.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds["zero_optimization"] = zero

    if precision == "bf16":
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

    if p.tensor_parallel > 1:
        ds["tensor_parallel"] = {"autotp_size": p.tensor_parallel}
    return ds

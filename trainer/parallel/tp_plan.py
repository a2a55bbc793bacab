"""The family's tensor-parallel plan against what DeepSpeed AutoTP did.

Each family states, in its package, which modules tensor parallelism splits and how (``Family.tp_plan``:
module-name pattern -> style, ``lmforge.model.registry.TP_STYLES``). The trainer hands that plan to
DeepSpeed's configurable AutoTP (``ds_config.autotp_partition_config``), and ``check`` verifies after
``deepspeed.initialize`` that it was carried out: a projection the plan splits that was left whole (every
rank would compute everything), one sharded the other way, a shard of the wrong size, a replicated weight
whose gradient the plan sums over the TP ranks without the hook that does it, or a layer the plan does not
mention, is a start-up error naming the modules. tests/test_parallel_parity.py runs it on 2 ranks for every
family.

"column": a DeepSpeed ``LinearLayer`` holding out_features / T rows of the weight; "row": a
``LinearAllreduce`` holding in_features / T columns (its partial outputs summed over the TP group);
"replicated": still a whole ``nn.Linear`` / ``nn.Embedding`` / norm; "replicated_with_grad_allreduce": whole,
with AutoTP's hook summing its gradient over the TP group.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lmforge.model import CausalLM, Family
from lmforge.model.registry import plan_regex

from ..config import ConfigError


def logical_shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned parameters keep their logical shape here


def applied(module: nn.Module) -> dict[str, tuple[str, torch.Size]]:
    """What AutoTP made of each module with a weight: name -> (style, the weight's shape on this rank)."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, TensorParallel_Layer

    out = {}
    for name, m in module.named_modules():
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(m, LinearAllreduce):
            out[name] = ("row", logical_shape(weight))
        elif isinstance(m, LinearLayer):
            out[name] = ("column", logical_shape(weight))
        elif isinstance(m, TensorParallel_Layer):
            out[name] = (type(m).__name__, logical_shape(weight))  # a kind no plan names: reported as is
        elif getattr(weight, "_ds_grad_allreduce_registered", False):
            out[name] = ("replicated_with_grad_allreduce", logical_shape(weight))
        else:
            out[name] = ("replicated", logical_shape(weight))
    return out


def planned(plan: dict[str, str], name: str, module: nn.Module | None = None) -> str | None:
    """The plan's style for module ``name``: its pattern's (``*`` = one name component, any layer index),
    else "replicated" for modules that are neither linear layers nor embeddings (norms), else None."""
    for pattern, style in plan.items():
        if re.fullmatch(plan_regex(pattern), name):
            return style
    if module is not None and not isinstance(module, (nn.Linear, nn.Embedding)):
        from deepspeed.module_inject.layers import TensorParallel_Layer

        if not isinstance(module, TensorParallel_Layer):
            return "replicated"
    return None


def mismatches(module: nn.Module, family: Family, tp: int, full_shapes: dict[str, torch.Size]) -> list[str]:
    """Where AutoTP's sharding of ``module`` differs from ``family.tp_plan`` at degree ``tp``; ``full_shapes``
    are the unsharded parameter shapes (``lmforge.model.parameter_shapes``)."""
    problems = []
    modules = dict(module.named_modules())
    for name, (style, shape) in applied(module).items():
        want = planned(family.tp_plan, name, modules[name])
        if want is None:
            problems.append(f"{name}: AutoTP made it {style}, but the {family.name} plan does not mention it")
            continue
        if style != want:
            problems.append(f"{name}: the {family.name} plan says {want}, AutoTP made it {style}")
            continue
        full = full_shapes.get(f"{name}.weight")
        if full is None:
            continue
        if style == "column":
            expect = (full[0] // tp, *full[1:])
        elif style == "row":
            expect = (full[0], full[1] // tp)
        else:
            expect = tuple(full)
        if tuple(shape) != tuple(expect):
            problems.append(f"{name}: {style} weight of shape {tuple(shape)} on this rank, expected {expect} "
                            f"(full {tuple(full)}, tensor parallel {tp})")
    return problems


def check(module: CausalLM, family: Family, tp: int, full_shapes: dict[str, torch.Size]) -> None:
    """ConfigError listing every module AutoTP split otherwise than the family's plan (module docstring)."""
    problems = mismatches(module, family, tp, full_shapes)
    if problems:
        raise ConfigError(
            f"parallel.tensor_parallel={tp}: DeepSpeed AutoTP did not shard the {family.name} model as its "
            f"tensor-parallel plan says (model/{family.name}/, Family.tp_plan), so it would not train as "
            "planned:\n  " + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
            + "\n(AutoTP recognises Hugging Face module names; see docs/adding-a-model-family.md)")


def start_up_error(e: Exception, family: Family, tp: int) -> ConfigError | None:
    """DeepSpeed's refusal (``strict_mode``) of a linear layer the family's plan does not name, as a start-up
    error naming the layer and where the plan lives; None for any other error."""
    if "No matching spec" not in str(e):
        return None
    return ConfigError(f"parallel.tensor_parallel={tp}: DeepSpeed AutoTP refused the {family.name} model: {e}. "
                       f"Every linear layer and embedding needs a style in its tensor-parallel plan "
                       f"(model/{family.name}/, Family.tp_plan; docs/adding-a-model-family.md)")

"""The family's tensor-parallel plan against what DeepSpeed AutoTP did.

Each family states, in its package, which modules tensor parallelism splits and how (``Family.tp_plan``:
module-name pattern -> "column" | "row" | "replicated"). AutoTP decides by itself, from module names, which
linear layers to shard. ``check`` compares the two after ``deepspeed.initialize``: a projection the plan
splits that AutoTP left whole (a family whose names AutoTP does not recognise would train unsharded, every
rank computing everything), one sharded the other way, a shard of the wrong size, or a layer the plan does
not mention, is a start-up error naming the modules. tests/test_parallel_parity.py runs it on 2 ranks for
every family with a plan.

"column": a DeepSpeed ``LinearLayer`` holding out_features / T rows of the weight; "row": a
``LinearAllreduce`` holding in_features / T columns (its partial outputs summed over the TP group);
"replicated": still a whole ``nn.Linear`` / ``nn.Embedding`` / norm.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from lmforge.model import CausalLM, Family

from ..config import ConfigError


def _shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned parameters keep their logical shape here


def applied(module: nn.Module) -> dict[str, tuple[str, torch.Size]]:
    """What AutoTP made of each layer with a weight: name -> (style, the weight's shape on this rank)."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, TensorParallel_Layer

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, LinearAllreduce):
            out[name] = ("row", _shape(m.weight))
        elif isinstance(m, LinearLayer):
            out[name] = ("column", _shape(m.weight))
        elif isinstance(m, TensorParallel_Layer):
            out[name] = (type(m).__name__, _shape(m.weight))  # a kind no plan names: reported as is
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            out[name] = ("replicated", _shape(m.weight))
    return out


def planned(plan: dict[str, str], name: str) -> str | None:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def mismatches(module: nn.Module, family: Family, tp: int, full_shapes: dict[str, torch.Size]) -> list[str]:
    """Where AutoTP's sharding of ``module`` differs from ``family.tp_plan`` at degree ``tp``; ``full_shapes``
    are the unsharded parameter shapes (``lmforge.model.parameter_shapes``)."""
    problems = []
    for name, (style, shape) in applied(module).items():
        want = planned(family.tp_plan, name)
        if want is None:
            problems.append(f"{name}: AutoTP made it {style}, but the {family.name} plan does not mention it")
            continue
        if style != want:
            problems.append(f"{name}: the {family.name} plan says {want}, AutoTP made it {style}")
            continue
        full = full_shapes.get(f"{name}.weight")
        if full is None:
            continue
        expect = {"column": (full[0] // tp, *full[1:]), "row": (full[0], full[1] // tp)}.get(style, tuple(full))
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

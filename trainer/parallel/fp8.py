"""FP8 training (``train.precision: fp8``) through torchao's float8 training (``torchao.float8``).

What it is: the run is a bf16 run in every other respect — DeepSpeed's bf16 engine, fp32 master weights
in the optimizer, bf16 weights in the module, the same checkpoint files — and the chosen ``nn.Linear``
layers of the decoder are swapped for torchao's ``Float8Linear`` (weight kept in the module's precision),
whose forward and backward matmuls cast their operands to float8 with dynamic scales
(``parallel.fp8_recipe``: ``tensorwise``, one scale per tensor, or ``rowwise``, one per row, closer to bf16
and slower) and multiply with ``torch._scaled_mm``. So checkpoints and exports do not change (the
parameter names are ``nn.Linear``'s), and a run may resume with ``bf16`` and back.

Which layers convert (``parallel.fp8_layers``):

* ``auto`` (default): a decoder ``nn.Linear`` with both dimensions multiples of 16 (the float8 GEMM's
  requirement) and large enough for float8 to pay on an H100-class GPU, torchao's measured thresholds
  (torchao 0.18 ``_auto_filter_for_recipe``, stated here rather than imported): tensorwise: not
  (in_features <= 4096 and out_features <= 1024); rowwise: out_features > 2048, in_features > 1024 and not
  (out_features <= 4096 and in_features <= 2048). At ``1b`` (d 2048, k/v 512, MLP 8192) tensorwise
  converts q, o, gate, up and down, and keeps the narrow k/v projections; rowwise converts gate and up.
* ``all``: every decoder ``nn.Linear`` with dimensions multiples of 16 (tests; small models).

Never converted: the loss head (``lm_head``: the chunked loss multiplies its weight itself, in bf16),
embeddings, norms, a Mixture of Experts' router and stacked experts (not ``nn.Linear``). The start-up
line names what converted and what did not.

Where it runs: CUDA GPUs of compute capability 8.9 or newer (Ada, Hopper, Blackwell: float8 tensor
cores); elsewhere a config error — except on CPU, where torchao's emulation (float8 rounding done in
higher precision, no speed-up) makes the path testable, and is said so at start-up. Not with tensor
parallelism: AutoTP replaces the linear layers with its own sharded ones, which are not converted
(a config error naming both keys). Compiled by default (``train.compile`` unset): torchao's casts are
separate kernels in eager mode, which costs more than float8 saves.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ConfigError

RECIPES = ("tensorwise", "rowwise")


def _import_torchao():
    """``torchao.float8``, without its import-time noise: torchao 0.18 logs a warning for each of its CUDA
    kernel libraries that cannot load (every CPU machine; float8 training does not use them) and torch warns
    about an Enum it registers."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.float8 as f8
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return f8
LAYERS = ("auto", "all")


def emulated() -> bool:
    """float8 is emulated where there is no CUDA device (CPU tests)."""
    return not torch.cuda.is_available()


def check(precision: str, recipe: str, layers: str, tp: int) -> None:
    """Start-up refusals for ``train.precision: fp8`` (nothing is built yet)."""
    if precision != "fp8":
        return
    if recipe not in RECIPES:
        raise ConfigError(f"parallel.fp8_recipe: {recipe!r} is not one of {', '.join(RECIPES)}")
    if layers not in LAYERS:
        raise ConfigError(f"parallel.fp8_layers: {layers!r} is not one of {', '.join(LAYERS)}")
    if tp > 1:
        raise ConfigError(f"train.precision=fp8 with parallel.tensor_parallel={tp}: not supported (DeepSpeed AutoTP "
                          "replaces the linear layers with its own sharded ones, which torchao does not convert); use "
                          "train.precision=bf16 or parallel.tensor_parallel=1")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        if cap < (8, 9):
            raise ConfigError(f"train.precision=fp8 needs float8 tensor cores (CUDA compute capability 8.9 or newer: "
                              f"Ada, Hopper, Blackwell); {torch.cuda.get_device_name()} is {cap[0]}.{cap[1]}; use "
                              "train.precision=bf16")
    try:
        _import_torchao()
    except ImportError as e:
        raise ConfigError(f"train.precision=fp8 needs torchao (pip install torchao; the project's environment has it: "
                          f"make setup): {e}") from None


def _multiples_of_16(m: nn.Linear) -> bool:
    return m.in_features % 16 == 0 and m.out_features % 16 == 0


def worth_converting(m: nn.Linear, recipe: str, layers: str) -> bool:
    """The shape rule (module docstring)."""
    if not _multiples_of_16(m):
        return False
    if layers == "all":
        return True
    k, n = m.in_features, m.out_features
    if recipe == "tensorwise":
        return not (k <= 4096 and n <= 1024)
    return n > 2048 and k > 1024 and not (n <= 4096 and k <= 2048)


def convert(model: nn.Module, recipe: str, layers: str) -> tuple[list[str], list[str]]:
    """Swap the chosen decoder linear layers for torchao's ``Float8Linear`` in place; returns (converted,
    kept) module names. The weights stay the same parameter objects (so ZeRO-3's partitioned parameters
    are untouched)."""
    f8 = _import_torchao()
    Float8LinearConfig, convert_to_float8_training = f8.Float8LinearConfig, f8.convert_to_float8_training
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulated():
        config = dataclasses.replace(config, emulate=True)
    converted, kept = [], []

    def choose(m: nn.Module, name: str) -> bool:
        if not isinstance(m, nn.Linear):
            return False
        ok = name.startswith("model.layers.") and worth_converting(m, recipe, layers)
        (converted if ok else kept).append(name)
        return ok

    convert_to_float8_training(model, config=config, module_filter_fn=choose)
    return converted, kept


def describe(converted: list[str], kept: list[str], recipe: str) -> str:
    """One start-up line: what converted (by projection kind) and what stayed in bf16."""
    def kinds(names):
        out = {}
        for n in names:
            out[n.rsplit(".", 1)[-1]] = out.get(n.rsplit(".", 1)[-1], 0) + 1
        return ", ".join(f"{k} ×{v}" for k, v in out.items()) or "none"

    how = "emulated on CPU: float8 rounding without float8 kernels, no speed-up" if emulated() else "torch._scaled_mm"
    return (f"fp8: torchao float8, {recipe} scaling ({how}); {len(converted)} linear layers converted "
            f"({kinds(converted)}); kept in bf16: {kinds(kept)}")

"""The fp32 master weights of a bf16/fp16 DeepSpeed checkpoint in layouts zero_to_fp32 does not read.

What DeepSpeed 0.19.8 writes for a bf16 run (checked on real 2-rank runs of trainer.train; fp16 on
CUDA uses the same optimizer classes):

- ZeRO-0 (DeepSpeed's ``DDP_BFLOAT16`` path, the default: ``grad_accum_dtype`` equals the model
  dtype): ``FP16_UnfusedOptimizer`` (torch AdamW) or ``FP16_Optimizer`` (FusedAdam). Every rank holds
  all masters; data-parallel rank 0 saves them in ``mp_rank_XX_model_states.pt['optimizer']`` as
  ``fp32_groups`` (one tensor per parameter) or ``fp32_groups_flat`` (one flat tensor per group), in
  optimizer param-group order and without parameter names.
- ZeRO-1 with ``data_types.grad_accum_dtype: fp32`` (a ``parallel.ds_config`` template may set it):
  ``BF16_Optimizer``, files ``bf16_zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt`` holding each
  rank's slice of every group (``single_partition_of_fp32_groups``) and a name -> (start, numel) map
  of that slice (``param_slice_mappings``). No ``zero_stage`` key, so zero_to_fp32 rejects them.
- ZeRO-1/2 otherwise and ZeRO-3: ``bf16_zero_pp_rank_*`` files of the ZeRO optimizers, which
  ``deepspeed.utils.zero_to_fp32`` consolidates (``weights.py`` uses it).

Both readers here are lazy (one parameter in memory at a time) and every master is checked against the
half-precision module weight saved beside it: the master rounded to that dtype must equal it bit for
bit, which is how DeepSpeed derives the module weight after each step. That check is what makes the
unnamed ZeRO-0 group order safe to reconstruct (a wrong order fails it). These layouts are
DeepSpeed's private file formats: like ``trainer/parallel/deepspeed_compat.py`` they were read off 0.19.8, and
tests/test_export_hf_bf16.py checks them against real bf16 runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.model import ModelConfig, build_model

from ..parallel.engine import param_groups
from .state import CheckpointError

Getter = Callable[[], torch.Tensor]


class MasterError(CheckpointError):
    """Masters present but unreadable or inconsistent with the module weights (message says why)."""


def group_orders(cfg: ModelConfig) -> list[list[list[str]]]:
    """Candidate parameter-name orders of the optimizer's groups: the trainer's (decay matrices, then
    1-D tensors; trainer.parallel.engine.param_groups) and DeepSpeed's single group of model.parameters()."""
    with torch.device("meta"):
        model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}  # tied weights appear once, as in the optimizer
    trainer = [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
    return [trainer, [list(names.values())]]


def _split_group(tensors: list[torch.Tensor], names: list[str], module: dict) -> dict[str, Getter] | None:
    """Name the masters of one group if their sizes fit ``names`` (per-parameter or one flat tensor)."""
    if any(n not in module for n in names):
        return None
    tensors = [t.detach() for t in tensors]  # DeepSpeed saves the masters as nn.Parameters
    sizes = [module[n].numel() for n in names]
    if len(tensors) == len(names) and [t.numel() for t in tensors] == sizes:
        return {n: (lambda t=t, n=n: t.view(module[n].shape)) for n, t in zip(names, tensors)}
    if len(tensors) == 1 and tensors[0].dim() == 1 and tensors[0].numel() == sum(sizes):
        out, off = {}, 0
        for n, size in zip(names, sizes):
            out[n] = (lambda o=off, s=size, n=n: tensors[0].narrow(0, o, s).view(module[n].shape))
            off += size
        return out
    return None


def zero0_masters(path: Path, state: dict, module: dict, cfg: ModelConfig) -> dict[str, Getter] | None:
    """Masters of a ZeRO-0 half-precision checkpoint (``state`` = the loaded model-states file), by name
    in this file's own (possibly tensor-parallel-sharded) shapes; None when it holds none."""
    opt = state.get("optimizer")
    if not isinstance(opt, dict):
        return None
    if isinstance(opt.get("fp32_groups"), list):
        groups = [list(g) for g in opt["fp32_groups"]]
    elif isinstance(opt.get("fp32_groups_flat"), list):
        groups = [[g] for g in opt["fp32_groups_flat"]]
    else:
        return None
    for order in group_orders(cfg):
        if len(order) != len(groups):
            continue
        parts = [_split_group(ts, names, module) for ts, names in zip(groups, order)]
        if all(p is not None for p in parts):
            return {k: g for p in parts for k, g in p.items()}
    sizes = [[tuple(t.shape) for t in g] for g in groups]
    raise MasterError(f"{path}: the optimizer's fp32 master groups (shapes {str(sizes)[:300]}) match neither "
                      "the trainer's parameter groups nor one group in model order")


_RANK_RE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def optim_files(tag_dir: Path) -> list[Path]:
    """Data-parallel ranks' optimizer files of tensor-parallel rank 0, in rank order."""
    found = [(int(m.group(1)), f) for f in tag_dir.iterdir() if (m := _RANK_RE.match(f.name))]
    ranks = sorted(r for r, _ in found)
    if ranks != list(range(len(ranks))):
        raise MasterError(f"{tag_dir}: optimizer files for data-parallel ranks {ranks}, expected 0..{len(ranks) - 1}")
    return [f for _, f in sorted(found)]


def load_optim(path: Path) -> dict:
    """One ``*_optim_states.pt``'s optimizer_state_dict. DeepSpeed pickles python objects there (its
    config, fragment addresses), so this needs weights_only=False, like zero_to_fp32: only ever called on
    files of the checkpoint directory the user named. mmap: tensors are read when sliced."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        opt = sd["optimizer_state_dict"]
    except Exception as e:
        raise MasterError(f"{path}: cannot be read as a DeepSpeed optimizer state file ({e})") from e
    opt.pop("base_optimizer_state", None)  # Adam moments: not needed
    opt.pop("optimizer_state_dict", None)
    return opt


def is_bf16_optimizer(opt: dict) -> bool:
    return "zero_stage" not in opt and "param_slice_mappings" in opt and "single_partition_of_fp32_groups" in opt


def bf16_optimizer_masters(files: list[Path], shapes: dict[str, torch.Size]) -> dict[str, Getter]:
    """Masters of a BF16_Optimizer checkpoint: each parameter is the concatenation, in data-parallel rank
    order, of its fragments in the ranks' flat partitions (ranks own consecutive ranges of each group)."""
    opts = [load_optim(f) for f in files]
    pieces: dict[str, list[tuple[torch.Tensor, int, int]]] = {}
    for f, opt in zip(files, opts):
        counts = opt["partition_count"]
        counts = counts if isinstance(counts, list) else [counts]
        if any(c != len(files) for c in counts):
            raise MasterError(f"{f}: written by {max(counts)} data-parallel ranks but {len(files)} optimizer "
                              "files are present (checkpoint incomplete or mixed with another run's files?)")
        for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append((flat, int(frag.start), int(frag.numel)))

    def get(name: str) -> torch.Tensor:
        full = torch.cat([flat.narrow(0, start, n) for flat, start, n in pieces[name]])
        if full.numel() != shapes[name].numel():
            raise MasterError(f"{files[0].parent}: fragments of {name} hold {full.numel()} values, the model "
                              f"config says {tuple(shapes[name])}")
        return full.view(shapes[name])

    return {k: (lambda k=k: get(k)) for k in pieces}


def checked_against_module(getters: dict[str, Getter], module: dict, where: Path) -> dict[str, Getter]:
    """Wrap each master getter: rounded to the module weight's dtype it must equal that weight bitwise."""
    def wrap(k: str, get: Getter) -> Getter:
        def run() -> torch.Tensor:
            t = get()
            ref = module.get(k)
            if ref is not None and ref.dtype != t.dtype and not torch.equal(t.to(ref.dtype), ref):
                bad = (t.to(ref.dtype) != ref).sum().item()
                raise MasterError(f"{where}: fp32 master of {k} does not round to the saved {ref.dtype} module "
                                  f"weight ({bad} of {ref.numel()} values differ): masters and weights are "
                                  "from different steps, or the master layout was misread")
            return t
        return run

    return {k: wrap(k, g) for k, g in getters.items()}

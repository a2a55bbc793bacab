"""Full model weights out of an lmforge DeepSpeed checkpoint of any layout, one tensor at a time.

Sources (chosen from lmforge.json and the files present, never from the current world size or devices).
A half-precision run's export always comes from its fp32 optimizer masters when the checkpoint has
them, and each master is checked to round to the saved bf16/fp16 module weight bit for bit
(``masters.py`` reads DeepSpeed's optimizer layouts):
- ZeRO 0/1/2 in fp32, tensor parallel 1: ``mp_rank_00_model_states.pt['module']`` holds the full
  weights, which equal the fp32 optimizer masters in an fp32 run. Loaded with ``mmap=True`` and
  ``weights_only=True``, so a tensor is read from disk only when it is asked for.
- ZeRO 0 in bf16/fp16: the masters in ``mp_rank_XX_model_states.pt['optimizer']`` (unnamed, in
  optimizer param-group order, which masters.py reconstructs and the rounding check confirms).
- ZeRO 1 in bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer): the masters' slices in
  ``bf16_zero_pp_rank_*_optim_states.pt``, joined per parameter by their recorded name and offsets.
- ZeRO 1/2 in bf16/fp16 otherwise and ZeRO 3 (any precision): DeepSpeed's own consolidation
  (``deepspeed.utils.zero_to_fp32``) from the fp32 master partitions in ``*_optim_states.pt``. In lazy
  mode ZeRO-3 tensors are gathered per parameter from mmapped files; for ZeRO 1/2 DeepSpeed
  concatenates each parameter group's partitions first (its implementation, so peak memory there is
  one fp32 copy of the model). DeepSpeed's optimizer files hold python objects (fragment mappings), so
  they are loaded with ``weights_only=False``; we only ever do so for files of the checkpoint
  directory the user named. (ZeRO-3 saves no module weights, so its masters are not cross-checked.)
- Tensor parallel (AutoTP) > 1: one ``mp_rank_XX_model_states.pt`` per TP rank (ZeRO-0 half precision:
  its masters, as above, per rank); each parameter is
  merged by comparing its shard shapes with the full shape from the model config: shards equal to the
  full shape are replicated (rank 0's copy is used), otherwise they are concatenated in rank order
  along the one dimension that differs (q/k/v/gate/up: dim 0, o/down: dim 1, vocab-parallel
  embedding/lm_head: dim 0).
- Tensor parallel > 1 with ZeRO-3 (any precision) or ZeRO 1/2 in half precision: the fp32 masters are
  partitioned over data-parallel ranks within each TP rank, a layout zero_to_fp32 does not read. DeepSpeed's
  universal-checkpoint conversion (``ds_to_universal``, the one resume uses) merges them into one full
  fp32 tensor per parameter; an existing complete ``<tag>_universal`` beside the tag is reused, otherwise
  the conversion is written to a scratch directory the caller owns (it also holds the Adam moments, so
  it needs about three times the masters' size on disk). ZeRO 1/2 masters are checked to round to the
  merged module weights.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.model import ModelConfig, parameter_shapes

from ..parallel import deepspeed_compat, experts
from . import masters as master_layouts
from .state import CheckpointError, CheckpointState
from .tags import universal_tag
from .universal import ds_to_universal, universal_complete

Getter = Callable[[], torch.Tensor]


def _load_states(path: Path) -> dict:
    """A model-states file (mmapped, weights only); its 'module' entry is checked to be a state dict."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (checkpoint incomplete or deleted while reading?)")
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a DeepSpeed model state file ({e})") from e
    if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
        raise CheckpointError(f"{path}: has no 'module' state dict")
    return sd


def _merge_tp(name: str, shards: list[torch.Tensor], full: torch.Size, files: list[Path]) -> torch.Tensor:
    if all(s.shape == full for s in shards):
        return shards[0]
    diff = [d for d in range(len(full)) if any(s.shape[d] != full[d] for s in shards)]
    if len(diff) != 1 or sum(s.shape[diff[0]] for s in shards) != full[diff[0]]:
        raise CheckpointError(f"{files[0].parent}: tensor-parallel shards of {name} have shapes "
                              f"{[tuple(s.shape) for s in shards]}, which do not tile the full shape "
                              f"{tuple(full)}")
    return torch.cat(shards, dim=diff[0])


class _MergedModule:
    """``get(name)``: a module weight merged over the tensor-parallel model-states files (lazily)."""

    def __init__(self, modules: list[dict], shapes: dict, files: list[Path]):
        self.modules, self.shapes, self.files = modules, shapes, files

    def get(self, name: str) -> torch.Tensor | None:
        if any(name not in m for m in self.modules):
            return None
        return _merge_tp(name, [m[name] for m in self.modules], self.shapes[name], self.files)


def _universal_masters(tag_dir: Path, tp: int, stage: int, shapes: dict, wanted: list[str],
                       scratch: Path | None, check_module: bool = True) -> tuple[dict[str, Getter], list[str], str]:
    """fp32 masters of a tensor-parallel ZeRO checkpoint through DeepSpeed's universal conversion."""
    uni = tag_dir.parent / universal_tag(tag_dir.name)
    if universal_complete(uni, tag_dir.name):
        where = f"the existing universal checkpoint {uni.name}"
    else:
        if scratch is None:
            raise CheckpointError(f"{tag_dir}: tensor- or expert-parallel ZeRO-{stage} masters need a universal "
                                  "conversion and no scratch directory was given")
        scratch.mkdir(parents=True, exist_ok=True)
        uni = ds_to_universal(tag_dir, scratch / universal_tag(tag_dir.name),
                              log=lambda m: print(m, file=sys.stderr))
        where = "DeepSpeed's universal-checkpoint conversion"
    zero = uni / "zero"
    missing = [k for k in wanted if not (zero / k / "fp32.pt").is_file()]
    if missing:
        raise CheckpointError(f"{uni}: no fp32 master for {missing[:5]} (conversion incomplete?)")
    extra = sorted(p.name for p in zero.iterdir() if p.is_dir() and p.name not in shapes)

    def get(k: str) -> torch.Tensor:
        f = zero / k / "fp32.pt"
        try:
            t = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot be read as a universal-checkpoint fp32 tensor ({e})") from e
        if isinstance(t, dict) and torch.is_tensor(t.get("param")):
            return t["param"]
        # DeepSpeed 0.19.8 writes a ZeRO-3 expert-parallel run's non-expert parameters as bare flat tensors
        if torch.is_tensor(t) and t.dim() == 1 and t.numel() == shapes[k].numel():
            return t.view(shapes[k])
        raise CheckpointError(f"{f}: holds {type(t).__name__} {tuple(getattr(t, 'shape', ()))}, not the fp32 "
                              f"tensor of {k} {tuple(shapes[k])}")

    getters = {k: (lambda k=k: get(k)) for k in wanted}
    source = f"fp32 master weights of {tp} tensor-parallel ZeRO-{stage} ranks merged by {where}"
    if stage < 3 and check_module:  # ZeRO-3 saves no module weights to compare with
        files = [tag_dir / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
        merged = _MergedModule([_load_states(f)["module"] for f in files], shapes, files)
        getters = master_layouts.checked_against_module(getters, merged, tag_dir)
        source += ", each checked to round to the saved module weights"
    return getters, extra, source


def _tensor_parallel(tag_dir: Path, cfg: ModelConfig, tp: int, stage: int, half: bool, shapes: dict,
                     wanted: list[str], scratch: Path | None) -> tuple[dict[str, Getter], list[str], str]:
    if stage == 3 or (stage in (1, 2) and half):
        return _universal_masters(tag_dir, tp, stage, shapes, wanted, scratch)
    files = [tag_dir / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    states = [_load_states(f) for f in files]
    modules = [s["module"] for s in states]
    extra = sorted(set().union(*map(set, modules)) - set(shapes))
    masters = None
    if half and stage == 0:
        found = [master_layouts.zero0_masters(f, s, s["module"], cfg) for f, s in zip(files, states)]
        if all(m is not None for m in found):
            masters = [master_layouts.checked_against_module(m, s["module"], f)
                       for m, s, f in zip(found, states, files)]
    src = masters or [{k: (lambda t=t: t) for k, t in m.items()} for m in modules]
    getters = {}
    for k in wanted:
        if any(k not in m for m in src):
            raise CheckpointError(f"{tag_dir}: parameter {k} missing from a tensor-parallel shard")
        getters[k] = (lambda k=k: _merge_tp(k, [m[k]() for m in src], shapes[k], files))
    what = "fp32 master weights (checked against the module weights)" if masters else "module weights"
    return getters, extra, f"{what} of {len(files)} tensor-parallel shards (mp_rank_XX_model_states.pt)"


def _zero_optimizer(tag_dir: Path, stage: int, shapes: dict,
                    wanted: list[str]) -> tuple[dict[str, Getter], list[str], str]:
    """fp32 masters from the ``*_optim_states.pt`` files: BF16_Optimizer's layout or zero_to_fp32."""
    files = master_layouts.optim_files(tag_dir)
    if not files:
        raise CheckpointError(f"{tag_dir}: no *_optim_states.pt files (ZeRO-{stage} checkpoint incomplete?)")
    if stage < 3 and master_layouts.is_bf16_optimizer(master_layouts.load_optim(files[0])):
        masters = master_layouts.bf16_optimizer_masters(files, shapes)
        source = f"fp32 master weights of DeepSpeed's BF16_Optimizer in {len(files)} bf16_zero_pp_rank_* files"
    else:
        try:
            sd = deepspeed_compat.zero_fp32_state_dict(tag_dir)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{tag_dir}: DeepSpeed ZeRO consolidation failed: {e}") from e
        # GatheredTensor (ZeRO-3, lazy) or a view (ZeRO 1/2): .contiguous() materialises one tensor.
        masters = {k: (lambda k=k: sd[k].contiguous()) for k in sd}
        source = f"fp32 master weights via deepspeed zero_to_fp32 (ZeRO-{stage})"
    extra = sorted(set(masters) - set(shapes))
    for k in wanted:
        if k not in masters:
            raise CheckpointError(f"{tag_dir}: parameter {k} not in the optimizer's fp32 masters")
    getters = {k: masters[k] for k in wanted}
    if stage < 3:  # ZeRO-3 saves no module weights to compare with
        path = tag_dir / "mp_rank_00_model_states.pt"
        getters = master_layouts.checked_against_module(getters, _load_states(path)["module"], path)
        source += ", each checked to round to the saved module weight"
    return getters, extra, source


def _expert_parallel(tag_dir: Path, state: CheckpointState, shapes: dict, wanted: list[str],
                     scratch: Path | None) -> tuple[dict[str, Getter], list[str], str]:
    """A checkpoint saved with DeepSpeed AutoEP (``parallel.expert_parallel``): its parameters carry AutoEP's
    names and each rank saved only its experts. ZeRO 1-3: the fp32 masters through DeepSpeed's universal
    conversion, which joins each expert tensor to its full (num_experts, ...) shape. ZeRO-0: the module
    weights in ``mp_rank_00_model_states.pt`` and one ``layer_L_expert_E_mp_rank_00_model_states.pt`` per
    expert (in a half-precision run these are the bf16/fp16 weights, not the fp32 masters). Either way the
    names are mapped back to the model's (``parallel/experts.py`` ``to_reference``)."""
    stage = state.zero_stage
    autoep = experts.autoep_shapes(shapes)
    if stage >= 1:
        got, _, source = _universal_masters(tag_dir, 1, stage, autoep, list(autoep), scratch, check_module=False)
        source = source.replace("1 tensor-parallel ZeRO", "expert-parallel ZeRO")
    else:
        path = tag_dir / "mp_rank_00_model_states.pt"
        module = _load_states(path)["module"]
        per_expert: dict[str, dict[int, Getter]] = {}
        for f in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_*_model_states.pt")):
            try:
                sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot be read as a DeepSpeed expert state file ({e})") from e
            for k, t in sd.items():
                name, _, e = k.rpartition(".")
                per_expert.setdefault(name, {})[int(e)] = (lambda t=t: t)
        got = {k: (lambda k=k: module[k]) for k in module}
        for name, by_expert in per_expert.items():
            n = autoep.get(name, (0,))[0]
            if sorted(by_expert) != list(range(n)):
                raise CheckpointError(f"{tag_dir}: expert files hold experts {sorted(by_expert)} of {name}, "
                                      f"expected 0..{n - 1} (checkpoint incomplete?)")
            got[name] = (lambda b=by_expert: torch.stack([b[e]() for e in sorted(b)]))
        source = (f"module weights in mp_rank_00_model_states.pt and {sum(map(len, per_expert.values()))} "
                  f"per-expert files (ZeRO-0, {state.precision})")
    missing = [k for k in autoep if k not in got]
    if missing:
        raise CheckpointError(f"{tag_dir}: parameter {missing[0]} missing ({len(missing)} in all; checkpoint "
                              "incomplete?)")
    getters = experts.to_reference(got)
    extra = sorted(set(getters) - set(shapes))
    return {k: getters[k] for k in wanted}, extra, source + "; AutoEP's names mapped to the model's"


def weight_source(tag_dir: Path, state: CheckpointState,
                  scratch: Path | None = None) -> tuple[dict[str, Callable[[], torch.Tensor]], str]:
    """Map every parameter name to a function returning its full tensor; also says which source it used.

    Tied ``lm_head.weight`` is left out (HF omits tied weights from the files). ``scratch``: a directory
    the caller deletes after the getters are used, for the universal conversion tensor-parallel ZeRO
    checkpoints need (see the module docstring)."""
    cfg = state.model
    stage, tp, precision = state.zero_stage, state.tensor_parallel, state.precision
    shapes = parameter_shapes(cfg)
    wanted = [k for k in shapes if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    half = precision != "fp32"
    if state.expert_parallel or next(tag_dir.glob("layer_*_expert_*_model_states.pt"), None) is not None:
        getters, extra, source = _expert_parallel(tag_dir, state, shapes, wanted, scratch)
    elif tp > 1:
        getters, extra, source = _tensor_parallel(tag_dir, cfg, tp, stage, half, shapes, wanted, scratch)
    elif stage == 3 or (stage in (1, 2) and half):
        getters, extra, source = _zero_optimizer(tag_dir, stage, shapes, wanted)
    else:
        path = tag_dir / "mp_rank_00_model_states.pt"
        states = _load_states(path)
        module = states["module"]
        extra = sorted(set(module) - set(shapes))
        masters = master_layouts.zero0_masters(path, states, module, cfg) if half else None
        src = module if masters is None else masters
        for k in wanted:
            if k not in src:
                raise CheckpointError(f"{path}: parameter {k} missing from the "
                                      f"{'module state dict' if masters is None else 'fp32 masters'}")
        if masters is None:
            getters = {k: (lambda k=k: module[k]) for k in wanted}
            source = f"module weights in mp_rank_00_model_states.pt (ZeRO-{stage}, {precision})"
            if half:
                source += "; the checkpoint holds no fp32 masters (saved without optimizer state)"
        else:
            getters = master_layouts.checked_against_module({k: masters[k] for k in wanted}, module, path)
            source = (f"fp32 master weights of the ZeRO-{stage} {precision} optimizer in "
                      "mp_rank_00_model_states.pt, each checked to round to the saved module weight")
    # Anything DeepSpeed saved that our model does not have means config and weights disagree.
    extra = [k for k in extra if not re.search(r"(inv_freq|_extra_state)$", k)]
    if extra:
        raise CheckpointError(f"{tag_dir}: checkpoint has tensors the model config does not: {extra[:5]}")

    def checked(k: str, get: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            t = get()  # may raise a CheckpointError lazily, while the export reads this tensor
            if t.shape != shapes[k]:
                raise CheckpointError(f"{tag_dir}: {k} has shape {tuple(t.shape)}, the model config says "
                                      f"{tuple(shapes[k])}")
            return t
        return run

    return {k: checked(k, g) for k, g in getters.items()}, source

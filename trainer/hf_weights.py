"""Weights out of an lmforge DeepSpeed checkpoint, one tensor at a time, and a streaming safetensors writer.

Sources (chosen from lmforge.json and the files present, never from the current world size or devices).
A half-precision run's export always comes from its fp32 optimizer masters when the checkpoint has
them (see trainer/fp32_masters.py for DeepSpeed's layouts), and each master is checked to round to the
saved bf16/fp16 module weight bit for bit:
- ZeRO 0/1/2 in fp32, tensor parallel 1: ``mp_rank_00_model_states.pt['module']`` holds the full
  weights, which equal the fp32 optimizer masters in an fp32 run. Loaded with ``mmap=True`` and
  ``weights_only=True``, so a tensor is read from disk only when it is asked for.
- ZeRO 0 in bf16/fp16: the masters in ``mp_rank_XX_model_states.pt['optimizer']`` (unnamed, in
  optimizer param-group order, which fp32_masters reconstructs and the rounding check confirms).
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

import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from model import LlamaForCausalLM, ModelConfig
from trainer import fp32_masters

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Getter = Callable[[], torch.Tensor]
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported; the message names the file and the reason."""


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter names and full shapes of LlamaForCausalLM(cfg), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


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
                       scratch: Path | None) -> tuple[dict[str, Getter], list[str], str]:
    """fp32 masters of a tensor-parallel ZeRO checkpoint through DeepSpeed's universal conversion."""
    import sys

    from trainer import checkpoint as ckpt
    from trainer import resume

    uni = tag_dir.parent / ckpt.universal_tag(tag_dir.name)
    if resume.universal_complete(uni, tag_dir.name):
        where = f"the existing universal checkpoint {uni.name}"
    else:
        if scratch is None:
            raise CheckpointError(f"{tag_dir}: tensor-parallel ZeRO-{stage} masters need a universal conversion "
                                  "and no scratch directory was given")
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            uni = resume.ds_to_universal(tag_dir, scratch / ckpt.universal_tag(tag_dir.name),
                                         log=lambda m: print(m, file=sys.stderr))
        except RuntimeError as e:
            raise CheckpointError(str(e)) from e
        where = "DeepSpeed's universal-checkpoint conversion"
    zero = uni / "zero"
    missing = [k for k in wanted if not (zero / k / "fp32.pt").is_file()]
    if missing:
        raise CheckpointError(f"{uni}: no fp32 master for {missing[:5]} (conversion incomplete?)")
    extra = sorted(p.name for p in zero.iterdir() if p.is_dir() and p.name not in shapes)

    def get(k: str) -> torch.Tensor:
        f = zero / k / "fp32.pt"
        try:
            return torch.load(f, map_location="cpu", weights_only=True)["param"]
        except Exception as e:
            raise CheckpointError(f"{f}: cannot be read as a universal-checkpoint fp32 tensor ({e})") from e

    getters = {k: (lambda k=k: get(k)) for k in wanted}
    source = f"fp32 master weights of {tp} tensor-parallel ZeRO-{stage} ranks merged by {where}"
    if stage < 3:  # ZeRO-3 saves no module weights to compare with
        files = [tag_dir / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
        merged = _MergedModule([_load_states(f)["module"] for f in files], shapes, files)
        getters = fp32_masters.checked_against_module(getters, merged, tag_dir)
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
        found = [fp32_masters.zero0_masters(f, s, s["module"], cfg) for f, s in zip(files, states)]
        if all(m is not None for m in found):
            masters = [fp32_masters.checked_against_module(m, s["module"], f) for m, s, f in zip(found, states, files)]
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
    files = fp32_masters.optim_files(tag_dir)
    if not files:
        raise CheckpointError(f"{tag_dir}: no *_optim_states.pt files (ZeRO-{stage} checkpoint incomplete?)")
    if stage < 3 and fp32_masters.is_bf16_optimizer(fp32_masters.load_optim(files[0])):
        masters = fp32_masters.bf16_optimizer_masters(files, shapes)
        source = f"fp32 master weights of DeepSpeed's BF16_Optimizer in {len(files)} bf16_zero_pp_rank_* files"
    else:
        from deepspeed.utils import zero_to_fp32

        try:
            sd = zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), False)
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
        getters = fp32_masters.checked_against_module(getters, _load_states(path)["module"], path)
        source += ", each checked to round to the saved module weight"
    return getters, extra, source


def weight_source(tag_dir: Path, meta: dict, cfg: ModelConfig,
                  scratch: Path | None = None) -> tuple[dict[str, Callable[[], torch.Tensor]], str]:
    """Map every parameter name to a function returning its full tensor; also says which source it used.

    Tied ``lm_head.weight`` is left out (HF omits tied weights from the files). ``scratch``: a directory
    the caller deletes after the getters are used, for the universal conversion tensor-parallel ZeRO
    checkpoints need (see the module docstring)."""
    stage = int(meta.get("zero_stage", 0))
    tp = int(meta.get("tensor_parallel", 1))
    precision = meta.get("precision", "fp32")
    shapes = expected_shapes(cfg)
    wanted = [k for k in shapes if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    half = precision != "fp32"
    try:
        if tp > 1:
            getters, extra, source = _tensor_parallel(tag_dir, cfg, tp, stage, half, shapes, wanted, scratch)
        elif stage == 3 or (stage in (1, 2) and half):
            getters, extra, source = _zero_optimizer(tag_dir, stage, shapes, wanted)
        else:
            path = tag_dir / "mp_rank_00_model_states.pt"
            states = _load_states(path)
            module = states["module"]
            extra = sorted(set(module) - set(shapes))
            masters = fp32_masters.zero0_masters(path, states, module, cfg) if half else None
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
                getters = fp32_masters.checked_against_module({k: masters[k] for k in wanted}, module, path)
                source = (f"fp32 master weights of the ZeRO-{stage} {precision} optimizer in "
                          "mp_rank_00_model_states.pt, each checked to round to the saved module weight")
    except fp32_masters.MasterError as e:
        raise CheckpointError(str(e)) from e
    # Anything DeepSpeed saved that our model does not have means config and weights disagree.
    extra = [k for k in extra if not re.search(r"(inv_freq|_extra_state)$", k)]
    if extra:
        raise CheckpointError(f"{tag_dir}: checkpoint has tensors the model config does not: {extra[:5]}")

    def checked(k: str, get: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            try:
                t = get()
            except fp32_masters.MasterError as e:  # raised lazily, while the export reads this tensor
                raise CheckpointError(str(e)) from e
            if t.shape != shapes[k]:
                raise CheckpointError(f"{tag_dir}: {k} has shape {tuple(t.shape)}, the model config says "
                                      f"{tuple(shapes[k])}")
            return t
        return run

    return {k: checked(k, g) for k, g in getters.items()}, source


def plan_shards(shapes: dict[str, torch.Size], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of tensors (in model order) into files of at most max_shard_bytes each
    (a tensor larger than the limit gets a file of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    item = torch.empty((), dtype=dtype).element_size()
    for k, s in shapes.items():
        n = s.numel() * item
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def write_safetensors(path: Path, names: list[str], shapes: dict[str, torch.Size], dtype: torch.dtype,
                      get: Callable[[str], torch.Tensor], on_tensor: Callable[[int], None] | None = None) -> None:
    """Write a safetensors file tensor by tensor: the header is computed from the known shapes first,
    then each tensor is fetched, cast, written and dropped, so only one tensor is in memory at a time."""
    item = torch.empty((), dtype=dtype).element_size()
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k in names:
        n = shapes[k].numel() * item
        header[k] = {"dtype": _ST_DTYPE[dtype], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format wants the data to start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in names:
            t = get(k).detach().to(dtype=dtype).contiguous()
            f.write(t.view(-1).view(torch.uint8).numpy().tobytes())
            if on_tensor:
                on_tensor(t.numel() * item)
            del t


def iter_shard_names(n: int) -> Iterator[str]:
    if n == 1:
        yield "model.safetensors"
    else:
        for i in range(n):
            yield f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]

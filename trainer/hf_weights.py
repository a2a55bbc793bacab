"""Weights out of an lmforge DeepSpeed checkpoint, one tensor at a time, and a streaming safetensors writer.

Sources (chosen from lmforge.json, never from the current world size or devices):
- ZeRO 0/1/2 in fp32, tensor parallel 1: ``mp_rank_00_model_states.pt['module']`` holds the full
  weights, which equal the fp32 optimizer masters in an fp32 run. Loaded with ``mmap=True`` and
  ``weights_only=True``, so a tensor is read from disk only when it is asked for.
- ZeRO 1/2 in bf16/fp16 and ZeRO 3 (any precision): DeepSpeed's own consolidation
  (``deepspeed.utils.zero_to_fp32``) from the fp32 master partitions in ``*_optim_states.pt``. In lazy
  mode ZeRO-3 tensors are gathered per parameter from mmapped files; for ZeRO 1/2 DeepSpeed
  concatenates each parameter group's partitions first (its implementation, so peak memory there is
  one fp32 copy of the model). DeepSpeed's optimizer files hold python objects (fragment mappings), so
  zero_to_fp32 loads them with ``weights_only=False``; we only ever pass it files from the checkpoint
  directory the user named.
- ZeRO 0 in bf16/fp16: the module weights (bf16/fp16) are used and upcast: exact for an export in the
  training dtype; the bf16 optimizer's fp32 masters are not read (that layout is untested here).
- Tensor parallel (AutoTP) > 1: one ``mp_rank_XX_model_states.pt`` per TP rank; each parameter is
  merged by comparing its shard shapes with the full shape from the model config: shards equal to the
  full shape are replicated (rank 0's copy is used), otherwise they are concatenated in rank order
  along the one dimension that differs (q/k/v/gate/up: dim 0, o/down: dim 1, vocab-parallel
  embedding/lm_head: dim 0). ZeRO-3 with AutoTP is rejected (DeepSpeed does not combine them).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from model import LlamaForCausalLM, ModelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported; the message names the file and the reason."""


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter names and full shapes of LlamaForCausalLM(cfg), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _load_module(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (checkpoint incomplete or deleted while reading?)")
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a DeepSpeed model state file ({e})") from e
    if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
        raise CheckpointError(f"{path}: has no 'module' state dict")
    return sd["module"]


def _merge_tp(name: str, shards: list[torch.Tensor], full: torch.Size, files: list[Path]) -> torch.Tensor:
    if all(s.shape == full for s in shards):
        return shards[0]
    diff = [d for d in range(len(full)) if any(s.shape[d] != full[d] for s in shards)]
    if len(diff) != 1 or sum(s.shape[diff[0]] for s in shards) != full[diff[0]]:
        raise CheckpointError(f"{files[0].parent}: tensor-parallel shards of {name} have shapes "
                              f"{[tuple(s.shape) for s in shards]}, which do not tile the full shape "
                              f"{tuple(full)}")
    return torch.cat(shards, dim=diff[0])


def weight_source(tag_dir: Path, meta: dict, cfg: ModelConfig) -> tuple[dict[str, Callable[[], torch.Tensor]], str]:
    """Map every parameter name to a function returning its full tensor; also says which source it used.

    Tied ``lm_head.weight`` is left out (HF omits tied weights from the files)."""
    stage = int(meta.get("zero_stage", 0))
    tp = int(meta.get("tensor_parallel", 1))
    precision = meta.get("precision", "fp32")
    shapes = expected_shapes(cfg)
    wanted = [k for k in shapes if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    getters: dict[str, Callable[[], torch.Tensor]] = {}

    if tp > 1:
        if stage == 3:
            raise CheckpointError(f"{tag_dir}: ZeRO-3 with tensor parallelism is not supported")
        files = [tag_dir / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
        modules = [_load_module(f) for f in files]
        extra = sorted(set().union(*map(set, modules)) - set(shapes))
        for k in wanted:
            if any(k not in m for m in modules):
                raise CheckpointError(f"{tag_dir}: parameter {k} missing from a tensor-parallel shard")
            getters[k] = (lambda k=k: _merge_tp(k, [m[k] for m in modules], shapes[k], files))
        source = f"module weights of {tp} tensor-parallel shards (mp_rank_XX_model_states.pt)"
    elif stage == 3 or (stage in (1, 2) and precision != "fp32"):
        from deepspeed.utils import zero_to_fp32

        try:
            sd = zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), False)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{tag_dir}: DeepSpeed ZeRO consolidation failed: {e}") from e
        extra = sorted(set(sd) - set(shapes))
        for k in wanted:
            if k not in sd:
                raise CheckpointError(f"{tag_dir}: parameter {k} not found by zero_to_fp32")
            # GatheredTensor (ZeRO-3, lazy) or a view (ZeRO 1/2): .contiguous() materialises one tensor.
            getters[k] = (lambda k=k: sd[k].contiguous())
        source = f"fp32 master weights via deepspeed zero_to_fp32 (ZeRO-{stage})"
    else:
        path = tag_dir / "mp_rank_00_model_states.pt"
        module = _load_module(path)
        extra = sorted(set(module) - set(shapes))
        for k in wanted:
            if k not in module:
                raise CheckpointError(f"{path}: parameter {k} missing from the module state dict")
            getters[k] = (lambda k=k: module[k])
        source = f"module weights in mp_rank_00_model_states.pt (ZeRO-{stage}, {precision})"
    # Anything DeepSpeed saved that our model does not have means config and weights disagree.
    extra = [k for k in extra if not re.search(r"(inv_freq|_extra_state)$", k)]
    if extra:
        raise CheckpointError(f"{tag_dir}: checkpoint has tensors the model config does not: {extra[:5]}")

    def checked(k: str, get: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            t = get()
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

"""Streaming safetensors writer: the header from the known shapes first, then one tensor at a time, so an
export never holds more than one tensor in memory."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]

"""Saves that do not stall training (``checkpoint.async_save``).

``BackgroundWriter`` is a DeepSpeed checkpoint engine (installed by
``deepspeed_compat.install_checkpoint_writer``): its ``save`` copies the state DeepSpeed hands it to
host memory — the only part the step waits for — and a writer thread serialises it to a hidden temporary
file beside its final name, computing the CRC-32 on the way, ``fsync``s it and renames it into place.
The completion rule is the synchronous save's: ``lmforge.json`` (with every file's size and CRC-32) and
``latest`` are written only after every rank's writer has finished (``save.finish``), so a crash while
the files are being written leaves an incomplete tag that is never used.

The price is host memory: a rank holds a copy of its checkpoint files' tensors until they are written.
"""

from __future__ import annotations

import copy
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch


def snapshot(obj):
    """``obj`` with every tensor copied to host memory and every container copied: training may change
    the originals the moment ``save`` returns."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type (OrderedDict, defaultdict's factory)
        out.clear()
        for k, v in obj.items():
            out[k] = snapshot(v)
        return out
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class _CrcFile:
    """A binary file that also computes the CRC-32 and size of what is written to it."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, b) -> int:
        self.crc = zlib.crc32(b, self.crc)
        n = self.f.write(b)
        self.size += n
        return n

    def flush(self) -> None:
        self.f.flush()


def write_durably(obj, path: str | Path, zipfile: bool = True) -> tuple[str, int, str]:
    """torch.save ``obj`` to ``path`` atomically and durably; returns (path, size, crc32 hex)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        out = _CrcFile(f)
        torch.save(obj, out, _use_new_zipfile_serialization=zipfile)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return str(path), out.size, f"{out.crc:08x}"


class BackgroundWriter:
    """The checkpoint engine interface DeepSpeed's ``save_checkpoint`` and ``load_checkpoint`` call
    (``deepspeed.runtime.checkpoint_engine.CheckpointEngine``), delegating all but ``save`` to the engine
    it replaces."""

    def __init__(self, inner):
        self.inner = inner
        self.name = "lmforge BackgroundWriter"
        self.zipfile = bool(getattr(inner, "zipfile_serialization", True))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-ckpt-writer")
        self._pending: list[Future] = []
        self._queued: list[tuple] = []
        # Installed once, it stays the engine's checkpoint engine: saves made with background=False
        # (final saves) write through the engine it replaced, at once.
        self.background = True

    # What DeepSpeed calls.
    def save(self, state_dict, path: str) -> None:
        if self.background:
            self.submit(state_dict, path)
        else:
            self.inner.save(state_dict, path)

    def create(self, info) -> None:
        self.inner.create(info)

    def commit(self, info) -> bool:
        return True  # completion is lmforge's: save.finish, after every rank's writer is done

    def makedirs(self, path, exist_ok=False) -> None:
        self.inner.makedirs(path, exist_ok=exist_ok)

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def __getattr__(self, name):  # is_data_parallel_writer, preserves_storage_sharing, is_decoupled, ...
        return getattr(self.inner, name)

    # lmforge's side.
    def submit(self, obj, path: str | Path) -> None:
        """Copy ``obj`` now; it is written after ``start`` (not while the rest is still being copied:
        the copies are what training waits for, and a concurrent writer would slow them down)."""
        self._queued.append((snapshot(obj), path))

    def start(self) -> None:
        for snap, path in self._queued:
            self._pending.append(self._pool.submit(write_durably, snap, path, self.zipfile))
        self._queued = []

    def done(self) -> bool:
        return not self._queued and all(f.done() for f in self._pending)

    def wait(self) -> dict[str, tuple[int, str]]:
        """Block until every submitted file is written; path -> (size, crc32). Raises a writer's error."""
        self.start()
        out = {}
        try:
            for f in self._pending:
                path, size, crc = f.result()
                out[path] = (size, crc)
        finally:
            self._pending = []
        return out

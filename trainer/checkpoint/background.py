"""How checkpoint files are written: durably always, in the background when asked (``checkpoint.async_save``).

``CheckpointWriter`` is a DeepSpeed checkpoint engine (installed on every engine by ``save.save`` through
``deepspeed_compat.install_checkpoint_writer``): every file DeepSpeed writes goes through its ``save``, which
serialises it to a hidden temporary file beside its final name, computing the CRC-32 on the way,
``fsync``s it and renames it into place (``write_durably``); the tag directory is fsynced afterwards
(``save.py``). So a tag is durable on every rank before ``lmforge.json`` marks it complete, and its files'
CRC-32s are known without reading them back.

* **Synchronous saves** (the default; always the stop and final saves) write at once.
* **Background saves**: ``save`` copies the state DeepSpeed hands it to host memory — the only part the
  step waits for — and a writer thread writes it. The completion rule is the same: ``lmforge.json`` (with
  every file's size and CRC-32) and ``latest`` are written only after every rank's writer has finished
  (``save.finish``), so a crash while the files are being written leaves an incomplete tag that is never
  used. The price is host memory: a rank holds a copy of its checkpoint files' tensors until they are written.
* **A write that fails** (disk full, quota, I/O error) is not raised inside DeepSpeed's ``save_checkpoint``,
  whose collectives the other ranks are in: it is kept and returned by ``wait``; ``save.py`` gathers
  every rank's errors after DeepSpeed returns and every rank raises the same error at once, instead of
  the others waiting in a barrier until the collective timeout.

Testing hook: ``LMFORGE_INJECT_SAVE_ERROR=R`` makes global rank R's writes fail (ENOSPC), so the tests can
exercise that path in a real run. Read at start-up; logged when set.
"""

from __future__ import annotations

import copy
import errno
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


INJECT_SAVE_ERROR_ENV = "LMFORGE_INJECT_SAVE_ERROR"


def injected_save_error_rank() -> int | None:
    raw = os.environ.get(INJECT_SAVE_ERROR_ENV, "").strip()
    return int(raw) if raw else None


class CheckpointWriter:
    """The checkpoint engine interface DeepSpeed's ``save_checkpoint`` and ``load_checkpoint`` call
    (``deepspeed.runtime.checkpoint_engine.CheckpointEngine``), delegating all but ``save`` to the engine
    it replaces."""

    def __init__(self, inner, rank: int = 0):
        self.inner = inner
        self.name = "lmforge CheckpointWriter"
        self.zipfile = bool(getattr(inner, "zipfile_serialization", True))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-ckpt-writer")
        self._pending: list[Future] = []
        self._queued: list[tuple] = []
        self._written: dict[str, tuple[int, str]] = {}
        self._errors: list[str] = []
        self.background = False  # set per save by save.save
        self.fail = injected_save_error_rank() == rank

    # What DeepSpeed calls.
    def save(self, state_dict, path: str) -> None:
        if self.background:
            self.submit(state_dict, path)
        else:
            self._write(state_dict, path)

    def create(self, info) -> None:
        self.inner.create(info)

    def commit(self, info) -> bool:
        return True  # completion is lmforge's: save.py, after every rank's files are written

    def makedirs(self, path, exist_ok=False) -> None:
        self.inner.makedirs(path, exist_ok=exist_ok)

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def __getattr__(self, name):  # is_data_parallel_writer, preserves_storage_sharing, is_decoupled, ...
        return getattr(self.inner, name)

    # lmforge's side.
    def _durably(self, obj, path) -> tuple[str, int, str]:
        if self.fail:
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {INJECT_SAVE_ERROR_ENV})", str(path))
        return write_durably(obj, path, self.zipfile)

    def _write(self, obj, path) -> None:
        try:
            p, size, crc = self._durably(obj, path)
            self._written[p] = (size, crc)
        except Exception as e:  # noqa: BLE001 - kept, raised on every rank together by save.py
            self._errors.append(f"writing {path}: {e}")

    def submit(self, obj, path: str | Path) -> None:
        """Background: copy ``obj`` now; it is written after ``start`` (not while the rest is still being
        copied: the copies are what training waits for, and a concurrent writer would slow them down).
        Synchronous: write it now."""
        if not self.background:
            self._write(obj, path)
            return
        self._queued.append((snapshot(obj), path))

    def start(self) -> None:
        for snap, path in self._queued:
            self._pending.append((path, self._pool.submit(self._durably, snap, path)))
        self._queued = []

    def done(self) -> bool:
        return not self._queued and all(f.done() for _, f in self._pending)

    def wait(self) -> tuple[dict[str, tuple[int, str]], list[str]]:
        """Block until every submitted file is written. Returns (path -> (size, crc32), errors) for
        everything written since the last ``wait``; never raises a write's error (module docstring)."""
        self.start()
        for path, f in self._pending:
            try:
                p, size, crc = f.result()
                self._written[p] = (size, crc)
            except Exception as e:  # noqa: BLE001
                self._errors.append(f"writing {path}: {e}")
        written, errors = self._written, self._errors
        self._pending, self._written, self._errors = [], {}, []
        return written, errors

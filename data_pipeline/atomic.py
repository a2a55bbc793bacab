"""Atomic file writes: write a temporary sibling, fsync, then ``os.replace`` it into place.

A reader (or a process restarted after ``kill -9``) sees either the old file or the complete new one,
never a partial write. The temporary name carries the pid and a random suffix, so concurrent writers
on a shared filesystem (several nodes, same pid) never collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **open_kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj, **dump_kw) -> None:
    dump_kw.setdefault("indent", 1)
    atomic_write_text(path, json.dumps(obj, **dump_kw) + "\n")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """Build a directory under a temporary sibling name and move it to ``out`` only on success.

    Yields the temporary path. An existing ``out`` is replaced only after the new one is complete (it is
    renamed aside first, so ``out`` is never half-written); on any exception the temporary is removed.
    """
    out = Path(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

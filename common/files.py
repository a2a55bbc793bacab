"""Files: atomic writes (temporary sibling, fsync, ``os.replace``) and content hashes.

A reader (or a process restarted after ``kill -9``) sees either the old file or the complete new one,
never a partial write. Temporary names are ``.NAME.tmp.PID.RANDOM`` beside the target, so concurrent
writers on a shared filesystem (several nodes, same pid) never collide and a restarted job can find and
delete what a killed one left (``glob(".NAME.tmp.*")``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, streamed in 4 MiB blocks (hashlib releases the GIL while hashing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Hex sha256 of a JSON-serialisable value in canonical form (sorted keys): an identity for configs
    and orders that does not depend on dict ordering."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file_cached(path: str | os.PathLike) -> str:
    """``sha256_file`` memoised per process by (real path, size, mtime): for files hashed again and again
    (every dataset built over the same shards hashes their ``.idx``), never for files being written."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(real)
    return _SHA_MEMO[key]


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}.{os.urandom(4).hex()}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a directory's entries (files created or renamed in it) durable: after a power loss a file
    whose own data was fsynced can still be missing, or have its old name, until its directory is."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (and platforms) refuse fsync on a directory: nothing to do there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **open_kw):
    """``open(path, mode)`` on a temporary sibling that replaces ``path`` only if the block succeeds;
    durable once it returns (the file fsynced before the rename, its directory after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
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


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, expect_sha256: str | None = None) -> None:
    """Copy ``src`` to ``dst`` atomically; with ``expect_sha256`` the copy must have that hash (checked
    before it replaces ``dst``), else ValueError naming ``src``."""
    with atomic_open(dst, "wb") as f, open(src, "rb") as s:
        h = hashlib.sha256()
        while block := s.read(_CHUNK):
            h.update(block)
            f.write(block)
        if expect_sha256 is not None and h.hexdigest() != expect_sha256:
            raise ValueError(f"{src}: sha256 {h.hexdigest()[:16]}... differs from the recorded "
                             f"{expect_sha256[:16]}... (file changed or corrupt)")


def remove_temp_files(directory: str | os.PathLike, name: str) -> None:
    """Delete what killed writers of ``directory/name`` left behind (their temporary siblings)."""
    for f in Path(directory).glob(f".{name}.tmp.*"):
        f.unlink(missing_ok=True)


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


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError, missing: str = "not found"):
    """A JSON file's contents; a missing file or invalid JSON raises ``error`` naming the file (and the
    line and reason for invalid JSON)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None

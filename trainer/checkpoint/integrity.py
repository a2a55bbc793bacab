"""What a checkpoint's files should be, and checking that they still are.

At save, after every rank's files are on disk, the ranks split the tag's files between them, each
records the size and CRC-32 of its share, and rank 0 writes the records into ``lmforge.json`` (written
last): ``"files": {"mp_rank_00_model_states.pt": {"size": N, "crc32": "1a2b3c4d"}, ...}``. Resume and
export check sizes always and checksums unless told not to (``checkpoint.verify``: ``checksums`` |
``sizes``); a damaged latest checkpoint is set aside — renamed ``step_N.damaged``, never deleted — and
the run resumes from the previous complete one. ``python -m lmforge.trainer.verify_checkpoint RUN_DIR`` checks
every tag of a run. CRC-32 (zlib's, ~GB/s) catches truncation, every single-bit flip and every burst of up to 32
bits; it is not a defence against deliberate tampering.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

from lmforge.common.files import atomic_write_text

from .state import STATE_FILE, CheckpointError, read_state
from .tags import LATEST, complete_tags, latest_tag, universal_tag

CHUNK = 16 << 20
DAMAGED_SUFFIX = ".damaged"


def crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def tag_files(tag_dir: Path) -> list[str]:
    """Every file of a tag (relative paths, sorted), the state file excepted."""
    out = []
    for root, _, names in os.walk(tag_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), tag_dir)
            if rel != STATE_FILE and not n.startswith("."):
                out.append(rel)
    return sorted(out)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj) -> list:
    """Collective (or single-process): every rank's ``obj``, in rank order."""
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    """Collective (or single-process): rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def record_files(tag_dir: Path, known: dict[str, tuple[int, str]] | None = None) -> dict[str, dict]:
    """Collective (or single-process): size and CRC-32 of every file of the tag — the union of the files
    every rank sees, so a file only its writer's node sees yet is recorded (and then missed by resume
    elsewhere, not silently left out). ``known``: this rank's files whose CRC-32 its writer computed while
    writing (absolute path -> (size, crc32)); every other file is read by one of the ranks that see it,
    spread over them."""
    rank, world = _world()
    recorded = {os.path.relpath(p, tag_dir): {"size": s, "crc32": c} for p, (s, c) in (known or {}).items()}
    views = gather_objects((tag_files(tag_dir), recorded))
    merged: dict[str, dict] = {}
    seen_by: dict[str, list[int]] = {}
    for r, (files, rec) in enumerate(views):
        merged.update(rec)
        for f in files:
            seen_by.setdefault(f, []).append(r)
    files = sorted(set(seen_by) | set(merged))
    todo = [f for f in files if f not in merged]
    mine = {f: {"size": (tag_dir / f).stat().st_size, "crc32": crc32_file(tag_dir / f)}
            for i, f in enumerate(todo) if seen_by[f][i % len(seen_by[f])] == rank}
    for part in gather_objects(mine):
        merged.update(part)
    return {f: merged[f] for f in files}


def check_files(tag_dir: Path, files: dict[str, dict], checksums: bool = True) -> list[str]:
    """Collective (or single-process): what is wrong with the tag's files, one line per damaged file
    (empty: intact). Sizes of every file on every rank (cheap); checksums spread over the ranks."""
    return sorted({p for part in gather_objects(_my_problems(tag_dir, files, checksums)) for p in part[1]})


def _my_problems(tag_dir: Path, files: dict[str, dict], checksums: bool) -> tuple[list[str], list[str]]:
    """(names, lines): what this rank finds wrong with the tag's files (sizes of all, its share of CRCs)."""
    rank, world = _world()
    names, problems = [], []
    for i, (name, want) in enumerate(sorted(files.items())):
        path = tag_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            names.append(name)
            problems.append(f"{path}: missing")
            continue
        if size != want["size"]:
            names.append(name)
            problems.append(f"{path}: {size} bytes, {want['size']} recorded at save (truncated or overwritten)")
        elif checksums and i % world == rank and (crc := crc32_file(path)) != want["crc32"]:
            names.append(name)
            problems.append(f"{path}: CRC-32 {crc} differs from {want['crc32']} recorded at save "
                            "(the file's contents changed)")
    return names, problems


def check_tag(tag_dir: Path, checksums: bool = True) -> list[str]:
    """Problems of one tag (collective when distributed). A tag saved before file records existed has
    only its state file checked."""
    try:
        state = read_state(tag_dir)
    except CheckpointError as e:
        return [str(e)]
    if state.files is None:
        return []
    return check_files(tag_dir, state.files, checksums)


def set_aside(ckpt_dir: Path, tag: str) -> Path:
    """Rename a damaged tag (and drop its universal conversion's claim by renaming it too): kept for
    inspection, never deleted, and no longer a candidate for resume. Rank 0 only."""
    dst = ckpt_dir / (tag + DAMAGED_SUFFIX)
    if dst.exists():
        dst = ckpt_dir / f"{tag}{DAMAGED_SUFFIX}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(ckpt_dir / tag, dst)
    uni = ckpt_dir / universal_tag(tag)
    if uni.exists():
        os.replace(uni, dst.with_name(dst.name + "_universal"))
    latest = ckpt_dir / LATEST
    if latest.is_file() and latest.read_text().strip() == tag:
        latest.unlink()
    return dst


def _view(tag_dir: Path) -> str:
    """What this rank sees of a tag, for comparing with rank 0's: its step, or why it cannot read it."""
    try:
        return f"step {read_state(tag_dir).step}"
    except CheckpointError as e:
        return f"no readable {STATE_FILE} ({e}); its own newest complete checkpoint: {latest_tag(tag_dir.parent)}"


class InconsistentViewError(CheckpointError):
    """The ranks see different checkpoint files (stale network-filesystem caches, or a run_dir that is not
    one shared filesystem)."""


def _inconsistent(what: str, views: list[str]) -> InconsistentViewError:
    import socket

    host = socket.gethostname()
    hosts = gather_objects(host)
    lines = [f"rank {r} ({hosts[r]}): {v}" for r, v in enumerate(views) if v != views[0]]
    return InconsistentViewError(f"{what}; rank 0 ({hosts[0]}) sees {views[0]}, but\n  " + "\n  ".join(lines[:8])
                                 + ("\n  ..." if len(lines) > 8 else "") + "\nEvery rank must see the same "
                                 "checkpoint directory: a stale network-filesystem cache (wait and restart), or a "
                                 "run_dir that is not shared by all nodes")


def newest_intact(ckpt_dir: Path, checksums: bool, log=print) -> str | None:
    """Collective: the tag every rank resumes from (None: none), decided once. Rank 0 chooses the newest
    complete tag and broadcasts it; every rank reads its ``lmforge.json`` and checks its files' sizes (and a
    share of the checksums). A tag damaged as rank 0 sees it (rank 0 re-checks what any rank found) is set
    aside by rank 0 and the previous one is tried; ranks that see another step or other files than rank 0
    stop every rank with one error naming them and what each saw (``InconsistentViewError``), rather than
    load different steps or set aside a good tag. Every rank enters every collective on every path."""
    import torch.distributed as dist

    rank, world = _world()
    while True:
        tag = _broadcast(latest_tag(ckpt_dir) if rank == 0 else None)
        if tag is None:
            return None
        tag_dir = ckpt_dir / tag
        views = gather_objects(_view(tag_dir))
        if views[0].startswith("step "):
            if any(v != views[0] for v in views):
                raise _inconsistent(f"resume: the ranks disagree about checkpoint {tag_dir}", views)
            files = _broadcast(read_state(tag_dir).files if rank == 0 else None)
            found = gather_objects(_my_problems(tag_dir, files, checksums) if files else ([], []))
            flagged = sorted({n for names, _ in found for n in names})
            # Rank 0 re-checks what any rank flagged: damage is what rank 0 sees too.
            damaged = _broadcast(_my_problems(tag_dir, {n: files[n] for n in flagged}, checksums)[1]
                                 if rank == 0 and flagged else [])
            if flagged and not damaged:
                seen = [("files as recorded" if not lines else "; ".join(lines[:3])) for _, lines in found]
                raise _inconsistent(f"resume: the ranks see different files of checkpoint {tag_dir}",
                                    ["files as recorded"] + seen[1:])
            if not damaged:
                return tag
        else:
            damaged = [views[0]]
        if rank == 0:
            dst = set_aside(ckpt_dir, tag)
            older = [t for t in complete_tags(ckpt_dir) if t < tag]
            log(f"checkpoint {tag_dir} is damaged:\n  " + "\n  ".join(damaged)
                + f"\nset aside as {dst.name}; "
                + (f"resuming from the previous complete checkpoint {older[-1]}" if older else
                   "no earlier complete checkpoint: starting from scratch"))
        if world > 1:
            dist.barrier()


SHARED_TOKEN = ".lmforge-shared-check"


def check_shared_run_dir(run_dir: Path) -> None:
    """Collective: refuse a ``run_dir`` that is not one filesystem shared by every rank (checkpoints are
    written by every rank and read back by every rank on resume). Rank 0 writes a random token into it;
    every rank reads it back under its own configured path; a rank that cannot is named with its host."""
    import secrets

    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return
    token = secrets.token_hex(16) if rank == 0 else None
    path = Path(run_dir) / SHARED_TOKEN
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, token)
    token = _broadcast(token)
    dist.barrier()
    try:
        seen = "the token" if path.read_text() == token else "another run's token"
    except OSError as e:
        seen = f"nothing ({e.strerror or e})"
    views = gather_objects(f"{path}: {seen}")
    dist.barrier()
    if rank == 0:
        path.unlink(missing_ok=True)
    if any(not v.endswith(": the token") for v in views):
        raise _inconsistent(f"run_dir {run_dir} is not one filesystem shared by all ranks (rank 0 wrote a token "
                            "that some ranks cannot read back); put run_dir on a filesystem every node mounts at the "
                            "same path", views)

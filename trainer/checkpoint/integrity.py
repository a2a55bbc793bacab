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


def _gather(obj):
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def record_files(tag_dir: Path, known: dict[str, tuple[int, str]] | None = None) -> dict[str, dict]:
    """Collective (or single-process): size and CRC-32 of every file of the tag. ``known``: this rank's
    files whose CRC-32 its writer computed while writing (absolute path -> (size, crc32)); every other
    file is read, every rank taking every world-th one, so the reading is spread over the ranks."""
    rank, world = _world()
    files = tag_files(tag_dir)
    merged: dict[str, dict] = {}
    for part in _gather({os.path.relpath(p, tag_dir): {"size": s, "crc32": c} for p, (s, c) in (known or {}).items()}):
        merged.update(part)
    todo = [f for f in files if f not in merged]
    mine = {f: {"size": (tag_dir / f).stat().st_size, "crc32": crc32_file(tag_dir / f)}
            for i, f in enumerate(todo) if i % world == rank}
    for part in _gather(mine):
        merged.update(part)
    return {f: merged[f] for f in files}


def check_files(tag_dir: Path, files: dict[str, dict], checksums: bool = True) -> list[str]:
    """Collective (or single-process): what is wrong with the tag's files, one line per damaged file
    (empty: intact). Sizes of every file on every rank (cheap); checksums spread over the ranks."""
    rank, world = _world()
    problems = []
    for i, (name, want) in enumerate(sorted(files.items())):
        path = tag_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, {want['size']} recorded at save (truncated or overwritten)")
        elif checksums and i % world == rank and (crc := crc32_file(path)) != want["crc32"]:
            problems.append(f"{path}: CRC-32 {crc} differs from {want['crc32']} recorded at save "
                            "(the file's contents changed)")
    return sorted({p for part in _gather(problems) for p in part})


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


def newest_intact(ckpt_dir: Path, checksums: bool, log=print) -> str | None:
    """Collective: the newest complete tag whose files are intact (None: none). Damaged ones on the way
    are set aside by rank 0, with a message naming each damaged file."""
    import torch.distributed as dist

    rank, world = _world()
    while True:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        problems = check_tag(ckpt_dir / tag, checksums)
        if not problems:
            return tag
        if rank == 0:
            dst = set_aside(ckpt_dir, tag)
            older = [t for t in complete_tags(ckpt_dir) if t < tag]
            log(f"checkpoint {ckpt_dir / tag} is damaged:\n  " + "\n  ".join(problems)
                + f"\nset aside as {dst.name}; "
                + (f"resuming from the previous complete checkpoint {older[-1]}" if older else
                   "no earlier complete checkpoint: starting from scratch"))
        if world > 1:
            dist.barrier()

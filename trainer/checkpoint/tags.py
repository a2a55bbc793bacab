"""Checkpoint tags on disk: naming, which ones are complete, ``latest``, finding one, and rotation.

    RUN_DIR/checkpoints/latest               tag of the newest complete checkpoint
    RUN_DIR/checkpoints/tokenizer.model      the run's tokenizer (export reads it); for a Hugging Face
                                             tokenizer: tokenizer.json (+ tokenizer_config.json, ...)
    RUN_DIR/checkpoints/step_00000200/       DeepSpeed's files, rng_state_rank{R}.pt, lmforge.json (last)
    RUN_DIR/checkpoints/step_00000200_universal/   DeepSpeed universal conversion of that tag (resume)

A tag directory without ``lmforge.json`` is incomplete (a crash mid-save) and is never used.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .state import STATE_FILE, CheckpointError

LATEST = "latest"
UNIVERSAL_SUFFIX = "_universal"
_TAG_RE = re.compile(r"^step_(\d{8})$")
_UNIVERSAL_RE = re.compile(r"^(step_\d{8})_universal$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    m = _TAG_RE.match(tag)
    if not m:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step_NNNNNNNN)")
    return int(m.group(1))


def universal_tag(tag: str) -> str:
    """Sibling directory holding the DeepSpeed universal conversion of ``tag``."""
    return tag + UNIVERSAL_SUFFIX


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / STATE_FILE).is_file()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a written lmforge.json, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if _TAG_RE.match(p.name) and is_complete(p))


def latest_pointer(ckpt_dir: Path) -> str | None:
    """What the ``latest`` file names (None without one)."""
    ptr = ckpt_dir / LATEST
    return ptr.read_text().strip() if ptr.is_file() else None


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if it is complete, else the newest complete tag (or None): what a resume
    continues from."""
    tag = latest_pointer(ckpt_dir)
    if tag and is_complete(ckpt_dir / tag):
        return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def find_checkpoint(path: Path, step: int | None = None) -> Path:
    """A run directory, its ``checkpoints/`` or one tag directory -> the complete tag directory to read:
    ``step``'s, else the one ``latest`` names. Stricter than ``latest_tag``: a ``latest`` that names an
    incomplete tag is an error here (export must not silently read an older step)."""
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    if is_complete(d) and step is None:
        return d
    if (d / "checkpoints").is_dir() and not (d / LATEST).exists():
        d = d / "checkpoints"
    tags = complete_tags(d)
    if step is not None:
        if tag_for(step) not in tags:
            raise CheckpointError(f"{d}: no complete checkpoint for step {step} (complete steps: "
                                  f"{[step_of(t) for t in tags] or 'none'})")
        return d / tag_for(step)
    named = latest_pointer(d)
    if named is not None:
        if not is_complete(d / named):
            raise CheckpointError(f"{d / LATEST} names {named}, which is not a complete checkpoint "
                                  f"(no {STATE_FILE}): was it deleted by checkpoint rotation?")
        return d / named
    if not tags:
        raise CheckpointError(f"{d}: no complete checkpoint (no '{LATEST}' file and no tag with {STATE_FILE})")
    return d / tags[-1]


def clear_tag(ckpt_dir: Path, tag: str) -> None:
    """Make room to (re)write ``tag``: a leftover of a crashed save, or an older complete checkpoint of
    the same step (a run resumed from an earlier tag got here again). The state file goes first, so a
    crash in the middle leaves an incomplete tag, never a complete-looking mix of old and new files;
    the universal conversion of the old contents goes too."""
    path = ckpt_dir / tag
    (path / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(ckpt_dir / universal_tag(tag), ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[str]:
    """Delete complete checkpoints beyond the newest ``keep_last`` unless step % keep_every == 0.
    Rank 0 only. Incomplete tags older than the newest complete one are removed too (crash debris),
    and universal conversions whose source tag is gone. Never touches the tag ``latest`` names."""
    tags = complete_tags(ckpt_dir)
    keep = set(tags[-keep_last:]) if keep_last > 0 else set(tags)
    current = latest_tag(ckpt_dir)
    if current is not None:
        keep.add(current)
    removed = []
    for tag in tags:
        if tag in keep or (keep_every and step_of(tag) % keep_every == 0):
            continue
        clear_tag(ckpt_dir, tag)
        removed.append(tag)
    if tags:
        newest = tags[-1]
        for p in ckpt_dir.iterdir():
            if _TAG_RE.match(p.name) and p.name < newest and not is_complete(p):
                clear_tag(ckpt_dir, p.name)
                removed.append(p.name)
    for p in ckpt_dir.iterdir():
        m = _UNIVERSAL_RE.match(p.name)
        if m and not is_complete(ckpt_dir / m.group(1)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed

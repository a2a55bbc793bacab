"""Checkpoints: DeepSpeed's engine state plus lmforge's own state, made visible only when complete.

Layout (documented in README "Checkpoints"):

    RUN_DIR/checkpoints/latest               tag of the newest complete checkpoint
    RUN_DIR/checkpoints/tokenizer.model      the run's tokenizer (export reads it)
    RUN_DIR/checkpoints/step_00000200/       engine.save_checkpoint(..., tag, save_latest=False)
        lmforge.json                         step, consumed samples, configs, fingerprints (written last)
        rng_state_rank{R}.pt                 per-rank Python/NumPy/torch/CUDA RNG states
    RUN_DIR/checkpoints/step_00000200_universal/
                                             DeepSpeed universal-checkpoint conversion of that tag, made
                                             by ``trainer.resume`` when a run resumes on another layout

A tag directory without ``lmforge.json`` is incomplete (a crash mid-save) and is never loaded.
``latest`` moves only after a barrier that follows every rank's write. The checkpoint directory must be
visible to every rank under the same path (a shared filesystem), as DeepSpeed requires for resume.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.atomic import atomic_write_text

STATE_FILE = "lmforge.json"
LATEST = "latest"
FORMAT = "lmforge-checkpoint-v1"
_TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL_SUFFIX = "_universal"
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


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a written lmforge.json, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(tags)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if it is complete, else the newest complete tag (or None)."""
    ptr = ckpt_dir / LATEST
    if ptr.is_file():
        tag = ptr.read_text().strip()
        if (ckpt_dir / tag / STATE_FILE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def read_state(ckpt_dir: Path, tag: str) -> dict:
    state = json.loads((ckpt_dir / tag / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{ckpt_dir / tag / STATE_FILE}: unknown checkpoint format {state.get('format')!r}")
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"][0]), state["python"][1]))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         state["numpy_has_gauss"], state["numpy_cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, state: dict) -> str:
    """Collective: every rank must call it. Returns the tag."""
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0:
        _clear_tag(ckpt_dir, tag)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_state_rank{rank}.pt")
    # Every rank's files are on disk before the state file marks the tag complete.
    dist.barrier()
    if rank == 0:
        state = {"format": FORMAT, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **state}
        atomic_write_text(ckpt_dir / tag / STATE_FILE, json.dumps(state, indent=1))
        atomic_write_text(ckpt_dir / LATEST, tag)
    dist.barrier()
    return tag


def _clear_tag(ckpt_dir: Path, tag: str) -> None:
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
        _clear_tag(ckpt_dir, tag)
        removed.append(tag)
    if tags:
        newest = tags[-1]
        for p in ckpt_dir.iterdir():
            if _TAG_RE.match(p.name) and p.name < newest and not (p / STATE_FILE).is_file():
                _clear_tag(ckpt_dir, p.name)
                removed.append(p.name)
    for p in ckpt_dir.iterdir():
        m = _UNIVERSAL_RE.match(p.name)
        if m and not (ckpt_dir / m.group(1) / STATE_FILE).is_file():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def load_rng(ckpt_dir: Path, tag: str, rank: int) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for ``rank`` (it was saved by
    fewer ranks), in which case the states stay as the seed left them."""
    path = ckpt_dir / tag / f"rng_state_rank{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True

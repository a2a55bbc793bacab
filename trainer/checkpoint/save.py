"""Writing a checkpoint (collective) and the per-rank RNG states it carries.

Every rank writes its DeepSpeed files and its RNG states; after a barrier (every rank's files are on
disk) the ranks record every file's size and CRC-32 (``integrity.py``), and global rank 0 writes them
with ``lmforge.json`` and then moves ``latest``. The checkpoint directory must be
visible to every rank under the same path (a shared filesystem), as DeepSpeed requires for resume.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lmforge.common.files import atomic_write_text

from ..parallel import deepspeed_compat
from .background import BackgroundWriter
from .integrity import record_files
from .state import CheckpointState, write_state
from .tags import LATEST, clear_tag, tag_for


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


@dataclass
class PendingSave:
    """A checkpoint whose files are being written in the background (``save(background=True)``)."""

    ckpt_dir: Path
    tag: str
    state: CheckpointState
    writer: BackgroundWriter
    started: float


def save(engine, ckpt_dir: Path, state: CheckpointState, background: bool = False) -> str | PendingSave:
    """Collective: every rank must call it (with the same ``state.step``). Returns the tag; with
    ``background``, a ``PendingSave`` as soon as the state is copied to host memory, which ``finish``
    completes (collective) once written."""
    tag = tag_for(state.step)
    rank = dist.get_rank()
    if rank == 0:
        clear_tag(ckpt_dir, tag)
    dist.barrier()
    writer = deepspeed_compat.install_checkpoint_writer(engine, BackgroundWriter) if background else None
    if isinstance(engine.checkpoint_engine, BackgroundWriter):  # installed by an earlier background save
        engine.checkpoint_engine.background = background
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    rng_path = ckpt_dir / tag / f"rng_state_rank{rank}.pt"
    if writer is not None:
        writer.submit(rng_state(), rng_path)
        writer.start()
        return PendingSave(ckpt_dir, tag, state, writer, time.time())
    torch.save(rng_state(), rng_path)
    _complete(ckpt_dir, tag, state, known=None)
    return tag


def finish(pending: PendingSave) -> str:
    """Collective: wait for this rank's writer, then record every file and mark the tag complete."""
    known = pending.writer.wait()
    _complete(pending.ckpt_dir, pending.tag, pending.state, known)
    return pending.tag


def _complete(ckpt_dir: Path, tag: str, state: CheckpointState, known) -> None:
    # Every rank's files are on disk before they are recorded and the state file marks the tag complete.
    dist.barrier()
    state.files = record_files(ckpt_dir / tag, known)
    if dist.get_rank() == 0:
        write_state(ckpt_dir / tag, state)
        atomic_write_text(ckpt_dir / LATEST, tag)
    dist.barrier()


def load_rng(tag_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for ``rank`` (it was saved by
    fewer ranks), in which case the states stay as the seed left them."""
    path = tag_dir / f"rng_state_rank{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True

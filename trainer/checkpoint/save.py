"""Writing a checkpoint (collective) and the per-rank RNG states it carries.

Every rank writes its DeepSpeed files and its RNG states durably (``background.py``: temporary file,
fsync, rename; then the tag directory fsynced), so a tag is on stable storage on every rank before
anything says it is complete. Then, collectively: every rank's write errors are gathered (one failed
write fails the save on every rank at once, naming the rank and file, and the tag stays incomplete); the
ranks record every file's size and CRC-32 (``integrity.py``: the union of every rank's files); global rank
0 writes them into ``lmforge.json``, then ``latest`` (each atomic and fsynced with its directory). Pruning
older tags happens only after that (``train.py``). The checkpoint directory must be one filesystem
visible to every rank under the same path (checked at start-up: ``integrity.check_shared_run_dir``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lmforge.common.files import atomic_write_text, fsync_dir

from ..parallel import deepspeed_compat
from .background import CheckpointWriter
from .integrity import gather_objects, record_files
from .state import CheckpointError, CheckpointState, write_state
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
    writer: CheckpointWriter
    started: float


def save(engine, ckpt_dir: Path, state: CheckpointState, background: bool = False) -> str | PendingSave:
    """Collective: every rank must call it (with the same ``state.step``). Returns the tag; with
    ``background``, a ``PendingSave`` as soon as the state is copied to host memory, which ``finish``
    completes (collective) once written. Raises ``CheckpointError`` on every rank if any rank's write failed."""
    tag = tag_for(state.step)
    rank = dist.get_rank()
    if rank == 0:
        clear_tag(ckpt_dir, tag)
    dist.barrier()
    writer = deepspeed_compat.install_checkpoint_writer(engine, CheckpointWriter, rank=rank)
    writer.background = background
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    writer.submit(rng_state(), ckpt_dir / tag / f"rng_state_rank{rank}.pt")
    if background:
        writer.start()
        return PendingSave(ckpt_dir, tag, state, writer, time.time())
    _complete(ckpt_dir, tag, state, *writer.wait())
    return tag


def finish(pending: PendingSave) -> str:
    """Collective: wait for this rank's writer, then record every file and mark the tag complete."""
    _complete(pending.ckpt_dir, pending.tag, pending.state, *pending.writer.wait())
    return pending.tag


def _complete(ckpt_dir: Path, tag: str, state: CheckpointState, written: dict, errors: list[str]) -> None:
    tag_dir = ckpt_dir / tag
    if not errors:
        try:
            fsync_dir(tag_dir)  # this rank's files' names are durable too
        except OSError as e:
            errors = [f"fsync of {tag_dir}: {e}"]
    failed = [(r, e) for r, errs in enumerate(gather_objects(errors)) for e in errs]
    if failed:  # every rank raises the same error: the tag stays incomplete, `latest` names the previous one
        raise CheckpointError(f"checkpoint {tag_dir} was not saved (the previous complete checkpoint stays the "
                              "one to resume from): " + "; ".join(f"rank {r}: {e}" for r, e in failed[:4])
                              + (f"; and {len(failed) - 4} more" if len(failed) > 4 else ""))
    state.files = record_files(tag_dir, written)
    if dist.get_rank() == 0:
        write_state(tag_dir, state)  # atomic, fsynced with its directory: the tag is complete
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

"""DeepSpeed's universal-checkpoint conversion of a tag: one file per parameter and optimizer state,
independent of the data-parallel and tensor-parallel layout that saved it.

Resume uses it to continue on another layout (``<tag>_universal`` beside the tag, made once and reused);
export uses it to read the fp32 masters of tensor-parallel ZeRO checkpoints (in a scratch directory).
The conversion is DeepSpeed's own ``python -m deepspeed.checkpoint.ds_to_universal`` in a subprocess,
written into a staging directory and renamed into place only when complete, with ``UNIVERSAL_MARKER``
naming the tag it was made from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

from lmforge.common.files import atomic_write_text

from .state import CheckpointError
from .tags import universal_tag

UNIVERSAL_MARKER = "lmforge_universal.json"
_FAILED_SUFFIX = ".failed"


def universal_complete(out: Path, tag: str) -> bool:
    marker = out / UNIVERSAL_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("source_tag") == tag


def ds_to_universal(src: Path, out: Path, log=print, workers: int | None = None) -> Path:
    """Convert the checkpoint tag folder ``src`` into ``out`` (appears only when complete). One process."""
    # The converter also writes a `latest_universal` file next to its output folder: give it a private
    # parent so nothing lands beside `out` except the finished directory.
    for stale in out.parent.glob(f".{out.name}.staging.*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.staging.{os.getpid()}"
    staging.mkdir()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(staging / out.name), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2)),
           # Our model sets no UNIVERSAL_CHECKPOINT_INFO of its own (no Megatron-style vocab padding or
           # fused QKV to describe); AutoTP checkpoints carry DeepSpeed's, which this does not replace.
           "--inject_missing_state"]
    log(f"converting {src} to a DeepSpeed universal checkpoint ...")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (staging / "convert.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [x.strip() for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
        cause = next((x for x in reversed(lines) if "Error" in x.split(":")[0]), lines[-1] if lines else "")
        raise CheckpointError(
            f"DeepSpeed's universal-checkpoint conversion of {src} failed: {cause}\n"
            f"(full log: {staging / 'convert.log'}). The conversion is needed to resume on another data- or "
            "tensor-parallel size and to export tensor-parallel ZeRO checkpoints; resuming with the layout the "
            "checkpoint was saved with needs none. Tensor-parallel ZeRO-3 checkpoints saved by lmforge before "
            "its DeepSpeed 0.19.8 fixes (trainer/parallel/deepspeed_compat.py: fix_autotp_replicated_shapes) cannot "
            "be converted.")
    shutil.move(str(staging / "convert.log"), staging / out.name / "convert.log")
    atomic_write_text(staging / out.name / UNIVERSAL_MARKER,
                      json.dumps({"source_tag": src.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging / out.name, out)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"universal checkpoint {out} written in {time.time() - t0:.1f}s")
    return out


def convert_to_universal(ckpt_dir: Path, tag: str, log=print, workers: int | None = None) -> Path:
    """checkpoints/<tag> -> checkpoints/<tag>_universal (atomically). One process."""
    return ds_to_universal(ckpt_dir / tag, ckpt_dir / universal_tag(tag), log=log, workers=workers)


HEARTBEAT_S = 5.0  # how often rank 0 shows it is still converting
STALE_S = 120.0  # a heartbeat unchanged this long (waiter's own clock): rank 0 died or hangs


class _Heartbeat:
    """Rank 0, while it converts: rewrites ``path`` with a counter every HEARTBEAT_S (a thread)."""

    def __init__(self, path: Path):
        import threading

        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self._run, name="lmforge-universal-heartbeat", daemon=True)

    def _run(self) -> None:
        n = 0
        while True:
            n += 1
            try:
                atomic_write_text(self.path, f"{n} {os.getpid()}")
            except OSError:
                pass
            if self.stop.wait(HEARTBEAT_S):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.path.unlink(missing_ok=True)


def ensure_universal(ckpt_dir: Path, tag: str, log=print, poll_s: float = 2.0, stale_s: float = STALE_S) -> Path:
    """Collective: make ``<tag>_universal`` exist; global rank 0 converts (or reuses a complete one), the
    others wait for it. The wait polls the filesystem rather than sitting in a barrier: a large model's
    conversion can take longer than the process group's collective timeout. It has a deadline all the same:
    rank 0 rewrites a heartbeat file every HEARTBEAT_S while it converts, and a waiter that sees neither the
    result nor a new heartbeat for ``stale_s`` seconds (its own monotonic clock: node clocks may differ)
    stops with an error saying rank 0 died or hangs, instead of waiting forever."""
    out = ckpt_dir / universal_tag(tag)
    failed = ckpt_dir / f".{out.name}{_FAILED_SUFFIX}"
    beat = ckpt_dir / f".{out.name}.heartbeat"
    if dist.get_rank() == 0:
        if universal_complete(out, tag):
            log(f"reusing universal checkpoint {out}")
        else:
            failed.unlink(missing_ok=True)
            try:
                with _Heartbeat(beat):
                    convert_to_universal(ckpt_dir, tag, log=log)
            except Exception as e:
                atomic_write_text(failed, str(e))
                raise
    else:
        last, since = None, time.monotonic()
        while not universal_complete(out, tag):
            if failed.is_file():
                raise CheckpointError(f"universal conversion of {ckpt_dir / tag} failed on rank 0: "
                                      f"{failed.read_text()}")
            try:
                now_beat = beat.read_text()
            except OSError:
                now_beat = None
            if now_beat != last:
                last, since = now_beat, time.monotonic()
            elif time.monotonic() - since > stale_s:
                raise CheckpointError(
                    f"waited {stale_s:.0f}s for rank 0's universal conversion of {ckpt_dir / tag} without a sign of "
                    f"progress (its heartbeat {beat.name} {'stopped' if last else 'never appeared'}): rank 0 died or "
                    "hangs; this rank stops. Start the run again (the conversion is redone), or convert by hand "
                    "with python -m deepspeed.checkpoint.ds_to_universal")
            time.sleep(poll_s)
    dist.barrier()
    return out

"""What recording and checking a checkpoint's files costs (trainer/checkpoint/integrity.py), and how long
a save stalls training, synchronous vs ``checkpoint.async_save`` (trainer/checkpoint/background.py): one
rank saves the real DeepSpeed engine of ``--preset`` (fp32, ZeRO-1: weights + Adam moments); the CRC-32
records are computed as the synchronous save does, then checked as resume and export do (sizes only,
and with checksums); then the same state is saved through the background writer, timing how long
``save_checkpoint`` holds the training thread and when the files are durable.

    .venv/bin/python benchmarks/checkpoint_integrity.py --preset 350m --dir /tmp/ckpt_bench

On several ranks the reading is split between them (every world-th file each).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmforge.model import all_presets, build_model, get_preset, num_params  # noqa: E402
from lmforge.trainer.checkpoint.background import CheckpointWriter  # noqa: E402
from lmforge.trainer.checkpoint.integrity import check_files, record_files  # noqa: E402
from lmforge.trainer.config import RunConfig  # noqa: E402
from lmforge.trainer.parallel import deepspeed_compat, distributed  # noqa: E402
from lmforge.trainer.parallel.ds_config import build_ds_config  # noqa: E402
from lmforge.trainer.parallel.engine import param_groups  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="350m", choices=list(all_presets()))
    ap.add_argument("--dir", default="/tmp/lmforge_ckpt_bench", help="scratch directory (removed at the end)")
    a = ap.parse_args()
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    distributed.init()
    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.precision, cfg.parallel.zero_stage = 1, "fp32", 1
    mcfg = get_preset(a.preset, vocab_size=32000)
    model = build_model(mcfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1),
                                      config=build_ds_config(cfg, 1, "fp32", mcfg))
    x = torch.randint(0, 32000, (1, 64))
    engine.backward(engine(x, labels=x))
    engine.step()  # Adam moments exist
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        engine.save_checkpoint(str(root), tag="t", save_latest=False)
        os.sync()
        t_save = time.perf_counter() - t0
        tag = root / "t"
        t0 = time.perf_counter()
        files = record_files(tag)
        t_record = time.perf_counter() - t0
        size = sum(f["size"] for f in files.values())
        t0 = time.perf_counter()
        assert check_files(tag, files, checksums=False) == []
        t_sizes = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert check_files(tag, files, checksums=True) == []
        t_sums = time.perf_counter() - t0
        gb = size / 2**30
        print(f"checkpoint_integrity: preset {a.preset} ({num_params(mcfg) / 1e6:.0f}M params), fp32 ZeRO-1, 1 rank: "
              f"{len(files)} files, {gb:.2f} GiB")
        print(f"  save (DeepSpeed, + sync)    {t_save:7.2f} s")
        print(f"  record sizes + CRC-32       {t_record:7.2f} s  ({gb / t_record:.2f} GiB/s; "
              f"x{t_record / t_save:.2f} of the save)")
        print(f"  check sizes only            {t_sizes:7.3f} s")
        print(f"  check sizes + CRC-32        {t_sums:7.2f} s  ({gb / t_sums:.2f} GiB/s)")
        writer = deepspeed_compat.install_checkpoint_writer(engine, CheckpointWriter)
        writer.background = True
        t0 = time.perf_counter()
        engine.save_checkpoint(str(root), tag="a", save_latest=False)
        writer.start()
        t_stall = time.perf_counter() - t0
        known, errors = writer.wait()
        assert not errors, errors
        t_total = time.perf_counter() - t0
        files_a = record_files(root / "a", known)
        assert sum(f["size"] for f in files_a.values()) > 0
        print(f"  synchronous save stalls training for save + records = {t_save + t_record:.2f} s")
        print(f"  async save stalls training for {t_stall:.2f} s (state copied to host memory); files "
              f"durable after {t_total:.2f} s, CRC-32 computed while writing")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m lmforge.trainer.verify_checkpoint PATH``: check every checkpoint of a run against the file sizes and
CRC-32s recorded when it was saved (trainer/checkpoint/integrity.py).

PATH is a run directory, its ``checkpoints/`` directory or one tag directory. Prints one line per tag
(and each damaged file); exit status 0 if every complete tag is intact, 1 if any is damaged, 2 for a
path that holds no checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lmforge.common.errors import CheckFailed, run_cli
from lmforge.trainer.checkpoint import CheckpointError, check_tag, complete_tags, read_state
from lmforge.trainer.checkpoint.integrity import DAMAGED_SUFFIX
from lmforge.trainer.checkpoint.tags import is_complete


def verify(path: Path, checksums: bool = True) -> int:
    path = Path(path)
    if is_complete(path):
        ckpt_dir, tags = path.parent, [path.name]
    else:
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        tags = complete_tags(ckpt_dir)
    if not tags:
        raise CheckpointError(f"{path}: no complete checkpoint")
    damaged = 0
    for tag in tags:
        t0 = time.time()
        problems = check_tag(ckpt_dir / tag, checksums)
        if problems:
            damaged += 1
            print(f"{tag}: DAMAGED\n  " + "\n  ".join(problems))
            continue
        files = read_state(ckpt_dir / tag).files
        if files is None:
            print(f"{tag}: saved without file records (an older lmforge): state file readable, files unchecked")
        else:
            size = sum(f["size"] for f in files.values())
            print(f"{tag}: ok ({len(files)} files, {size / 2**30:.2f} GiB, "
                  f"{'checksums' if checksums else 'sizes'} checked in {time.time() - t0:.1f}s)")
    aside = sorted(p.name for p in ckpt_dir.iterdir() if DAMAGED_SUFFIX in p.name)
    if aside:
        print(f"set aside earlier (damaged): {', '.join(aside)}")
    if damaged:
        raise CheckFailed(f"{damaged} of {len(tags)} checkpoints in {ckpt_dir} are damaged")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmforge.trainer.verify_checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="run directory, its checkpoints/ directory, or one tag directory")
    ap.add_argument("--sizes-only", action="store_true", help="compare sizes only (no reading)")
    a = ap.parse_args(argv)
    return run_cli(lambda: verify(a.path, checksums=not a.sizes_only), prog="lmforge.trainer.verify_checkpoint")


if __name__ == "__main__":
    sys.exit(main())

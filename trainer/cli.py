"""``lmforge`` console entry: one command for every stage.

    lmforge train-tokenizer | preprocess | inspect | verify | merge ...   (data pipeline)
    lmforge train --config CFG [overrides]        (single process; use the deepspeed launcher for many)
    lmforge export-hf | import-hf | generate ...
    lmforge plan CFG [overrides] --gpus N --gpus-per-node G --gpu h100   (fits? how fast? which layouts)
"""

from __future__ import annotations

import sys

DATA_COMMANDS = {"train-tokenizer", "preprocess", "inspect", "verify", "merge"}
MODULES = {
    "train": "lmforge.trainer.train",
    "export-hf": "lmforge.trainer.hf.export",
    "import-hf": "lmforge.trainer.hf.importer",
    "generate": "lmforge.trainer.hf.generate",
    "plan": "lmforge.trainer.plan.__main__",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nRun `lmforge COMMAND --help` for a command's options.")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in DATA_COMMANDS:
        from lmforge.data_pipeline.cli import main as data_main

        return data_main([cmd, *rest])
    if cmd in MODULES:
        import importlib

        return importlib.import_module(MODULES[cmd]).main(rest) or 0
    print(f"lmforge: unknown command {cmd!r}; run `lmforge --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

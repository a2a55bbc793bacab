"""Where the suite's inputs live: everything is inside the repository (a clone has nothing beside it)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = ROOT / "tests" / "data"
# Attributed cuts of real Wikipedia and Gutenberg text with the traps the tests need
# (tests/data/corpus/README.md lists every file, its source, license and what it is for).
CORPUS = TEST_DATA / "corpus"
# The demo's sample corpus (data_pipeline/sample_corpus/README.md): 37 Wikipedia articles and 3 books.
SAMPLE = ROOT / "data_pipeline" / "sample_corpus"
# The virtual environment's bin/ (deepspeed, mpirun): the tests run the tools the set-up installed.
# Where DeepSpeed was installed elsewhere (the GPU check's wheels), the deepspeed on PATH.
BIN = Path(sys.executable).parent
if not (BIN / "deepspeed").exists() and shutil.which("deepspeed"):
    BIN = Path(shutil.which("deepspeed")).parent

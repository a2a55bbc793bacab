"""``python -m lmforge.trainer.import_hf``: import a Hugging Face model as initial weights (trainer/hf/importer.py)."""

import sys

from lmforge.trainer.hf.importer import main

if __name__ == "__main__":
    sys.exit(main())

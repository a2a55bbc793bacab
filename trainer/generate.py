"""``python -m lmforge.trainer.generate``: Generate with transformers from an export (see trainer/hf/generate.py)."""

import sys

from lmforge.trainer.hf.generate import main

if __name__ == "__main__":
    sys.exit(main())

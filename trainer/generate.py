"""``python -m trainer.generate``: Generate with transformers from an export (see trainer/hf/generate.py)."""

import sys

from trainer.hf.generate import main

if __name__ == "__main__":
    sys.exit(main())

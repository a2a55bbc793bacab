"""``python -m lmforge.trainer.export_hf``: Export a checkpoint to Hugging Face format (see trainer/hf/export.py)."""

import sys

from lmforge.trainer.hf.export import main

if __name__ == "__main__":
    sys.exit(main())

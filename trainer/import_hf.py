"""``python -m trainer.import_hf``: Import a Hugging Face Llama as initial weights (see trainer/hf/importer.py)."""

import sys

from trainer.hf.importer import main

if __name__ == "__main__":
    sys.exit(main())

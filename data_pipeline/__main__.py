"""``python -m lmforge.data_pipeline ...`` (see ``data_pipeline.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

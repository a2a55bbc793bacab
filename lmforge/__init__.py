"""``lmforge`` in a clone that is not installed: ``python -m lmforge.X`` run in the clone's root finds this
folder first (the working directory leads ``sys.path``) and reaches the clone's ``common/``,
``data_pipeline/``, ``model/`` and ``trainer/`` under their ``lmforge.*`` names, exactly the files the
installed package maps (pyproject.toml; this folder itself is not installed). So a command started in a
new shell without the project's environment gets lmforge's one line about what to do
(``lmforge.common.errors``: ``source .venv/bin/activate``) instead of Python's "No module named 'lmforge'".
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent)]

"""Foundations every lmforge stage shares (``lmforge.common``): errors and exit codes (``errors``), atomic
files and hashes (``files``), the launcher environment: MPI, Slurm, torch-style variables (``launch_env``),
and which tokenizer a path is (``tokenizer_files``).

Nothing here imports torch, DeepSpeed or any other lmforge package: every stage (the data pipeline, the
model, the trainer) may depend on it, and it on none of them.
"""

from .errors import install_missing_dependency_hook

install_missing_dependency_hook()  # a command run in a Python without lmforge's dependencies: one line

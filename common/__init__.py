"""Foundations every lmforge command shares: files (atomic writes, hashing), errors and exit codes, and
the launcher environment (MPI, Slurm, torch-style variables).

They live in ``data_pipeline`` because it is the first package of the flow (corpus -> shards ->
samples -> engine -> checkpoint -> Hugging Face) and every later package may depend on it; nothing here
imports torch, DeepSpeed or any other lmforge module.
"""

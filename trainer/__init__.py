"""lmforge trainer: DeepSpeed engine setup, the step loop, checkpoints, metrics and HF export/import."""

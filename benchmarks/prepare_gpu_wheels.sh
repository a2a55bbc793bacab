#!/usr/bin/env bash
# Fill .whl/ with the wheels benchmarks/gpu_check.sh needs on a bare GPU machine that has no network (the lent
# H200's image, as the 2026-11-29 check found it: Python 3.12, torch 2.11 + CUDA 13, transformers, sentencepiece,
# tensorboard, mpi4py, pytest; no DeepSpeed, pydantic, hjson, zstandard, and no torchao). Run it on a machine
# with PyPI, then carry .whl/ (git-ignored) with the working tree:
#
#   bash benchmarks/prepare_gpu_wheels.sh            # PY_VERSIONS="3.11 3.12" for other interpreters
#
# Versions are the project's pins (requirements-lock.txt). What goes in:
#   always installed by gpu_check.sh (the image lacks them, or its version is not the pinned one):
#     deepspeed 0.19.8    built here from its sdist (PyPI has no wheel) with DS_BUILD_OPS=0: pure Python, its
#                         CUDA ops JIT-built where used (the trainer uses none: torch's fused AdamW)
#     torchao 0.18.0      float8 training (train.precision fp8) is Python over torch._scaled_mm; the wheel is
#                         cp310-abi3 (any CPython >= 3.10) and declares no dependencies; 0.18.0 is the release
#                         built for torch 2.11 (its __init__ loads its C++/CUDA kernels only on torch >= 2.11.0,
#                         and float8 training does not use them), so the pin fits the image's torch 2.11 and
#                         the CPU machines' 2.13 alike
#     pydantic, pydantic_core, annotated-types, typing-inspection, typing_extensions, hjson (DeepSpeed's config)
#   installed only where the image lacks the distribution (DeepSpeed's other imports, the pipeline's readers):
#     einops, msgpack, py-cpuinfo, ninja, psutil, PyYAML, zstandard
# Binary wheels are fetched for each Python in PY_VERSIONS (default 3.12, the image's); gpu_check.sh installs
# them by name from .whl/ (pip --no-index --find-links), so pip picks the one that fits the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
PY_VERSIONS="${PY_VERSIONS:-3.12}"
lock() { grep -i "^$1==" requirements-lock.txt | head -1; }   # the pinned requirement, e.g. pydantic==2.14.3
ALWAYS="deepspeed torchao pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson"
IF_ABSENT="einops msgpack py-cpuinfo ninja psutil PyYAML zstandard"
rm -rf .whl && mkdir -p .whl
reqs=()
for name in $ALWAYS $IF_ABSENT; do
  r=$(lock "$name")
  [ -n "$r" ] || { echo "prepare_gpu_wheels: $name is not pinned in requirements-lock.txt"; exit 1; }
  reqs+=("$r")
done
# Pure-Python and binary wheels, for each target interpreter (deepspeed is built below).
for v in $PY_VERSIONS; do
  "$PIP" download -q --no-deps --only-binary=:all: --python-version "$v" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 -d .whl $(printf '%s\n' "${reqs[@]}" | grep -v '^deepspeed==')
done
# DeepSpeed: an sdist on PyPI; a pure-Python wheel without prebuilt ops (setup.py imports torch: this
# environment's, no build isolation).
DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps --no-build-isolation -w .whl "$(lock deepspeed)"
# What gpu_check.sh installs: names with their pins, and whether always or only where the image lacks them.
{ for name in $ALWAYS; do echo "always $(lock "$name")"; done
  for name in $IF_ABSENT; do echo "if-absent $(lock "$name")"; done; } > .whl/install.txt
ls -l .whl
du -sh .whl

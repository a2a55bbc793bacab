#!/bin/bash
# usage: benchmarks/autoep_probe/run_gc.sh TAG [grad_check.py args...]: step-0 gradients and post-step weights
# against a dumped reference (--dump FILE / --ref FILE); the log in $AUTOEP_OUT/TAG.log
HERE=$(cd "$(dirname "$0")" && pwd)
export MASTER_ADDR=127.0.0.1 OMP_NUM_THREADS=1 PATH="$HERE/../../.venv/bin:$PATH" AUTOEP_OUT=${AUTOEP_OUT:-/tmp/autoep_out}
mkdir -p "$AUTOEP_OUT"
TAG=$1; shift; PORT=$((29500 + RANDOM % 400))
timeout 170 deepspeed --num_gpus 2 --master_port $PORT "$HERE/grad_check.py" "$@" > "$AUTOEP_OUT/$TAG.log" 2>&1
echo "rc=$? $TAG"; grep -E "LOSSES|diffs|mismatch|max \||grad rel|Error" "$AUTOEP_OUT/$TAG.log" | grep -v "^\[rank1\]" | head -20

#!/bin/bash
# usage: benchmarks/autoep_probe/run.sh TAG [train.py args...]: 2 CPU ranks; per-rank losses printed and
# written to $AUTOEP_OUT/TAG.r{0,1}.json (default /tmp/autoep_out), the log to $AUTOEP_OUT/TAG.log
HERE=$(cd "$(dirname "$0")" && pwd)
export MASTER_ADDR=127.0.0.1 OMP_NUM_THREADS=1 PATH="$HERE/../../.venv/bin:$PATH" AUTOEP_OUT=${AUTOEP_OUT:-/tmp/autoep_out}
mkdir -p "$AUTOEP_OUT"
TAG=$1; shift
PORT=$((29500 + RANDOM % 400))
timeout 170 deepspeed --num_gpus 2 --master_port $PORT "$HERE/train.py" --tag "$TAG" "$@" > "$AUTOEP_OUT/$TAG.log" 2>&1
echo "rc=$? $TAG"; cat "$AUTOEP_OUT/$TAG".r*.json 2>/dev/null; echo

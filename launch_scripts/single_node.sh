#!/usr/bin/env bash
# One node: `deepspeed --num_gpus N` starts N ranks on this machine (one per GPU; on a CPU-only
# machine N gloo ranks). Anything after the config is passed to trainer.train as section.key=value.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch_scripts/single_node.sh [-n NPROC] [-p PORT] CONFIG [section.key=value ...]

Train on this machine with the DeepSpeed launcher (deepspeed --num_gpus NPROC --module trainer.train).

  -n NPROC   ranks to start (default: number of visible CUDA GPUs, or 1 without CUDA)
  -p PORT    rendezvous port on 127.0.0.1 (default: $MASTER_PORT or 29500)
  -h         this help

Examples:
  launch_scripts/single_node.sh configs/demo.yaml
  launch_scripts/single_node.sh -n 8 configs/my_run.yaml train.max_steps=2000 parallel.zero_stage=3
Relative paths inside CONFIG are resolved against the current directory.
USAGE
}

NPROC=""
PORT=${MASTER_PORT:-29500}
while getopts ":hn:p:" opt; do
  case $opt in
    h) usage; exit 0 ;;
    n) NPROC=$OPTARG ;;
    p) PORT=$OPTARG ;;
    :) echo "error: -$OPTARG needs a value" >&2; usage >&2; exit 2 ;;
    *) echo "error: unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
CONFIG=$1; shift
[[ -f $CONFIG ]] || { echo "error: config $CONFIG not found" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # trainer/ importable from any directory
if [[ -z $NPROC ]]; then
  NPROC=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "error: -n must be a positive integer, got '$NPROC'" >&2; exit 2; }
[[ $PORT =~ ^[0-9]+$ ]] || { echo "error: -p must be a port number, got '$PORT'" >&2; exit 2; }

exec deepspeed --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" \
  --module trainer.train --config "$CONFIG" "$@"

#!/usr/bin/env bash
# One node: `deepspeed --num_gpus N` starts N ranks on this machine (one per GPU; on a CPU-only
# machine N gloo ranks). Anything after the config is passed to lmforge.trainer.train as section.key=value.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch_scripts/single_node.sh [-n NPROC] [-p PORT] CONFIG [section.key=value ...]

Train on this machine with the DeepSpeed launcher (deepspeed --num_gpus NPROC --module lmforge.trainer.train).

  -n NPROC   ranks to start (default: number of visible CUDA GPUs, or 1 without CUDA)
  -p PORT    rendezvous port on 127.0.0.1 (default: $MASTER_PORT or 29500)
  -h         this help

Examples:
  launch_scripts/single_node.sh configs/demo.yaml
  launch_scripts/single_node.sh -n 8 configs/my_run.yaml train.max_steps=2000 parallel.zero_stage=3
Relative paths inside CONFIG are resolved against the current directory.
USAGE
}
# shellcheck source=launch_scripts/common.sh
source "$(dirname "$0")/common.sh"

NPROC=""
PORT=${MASTER_PORT:-29500}
while getopts ":hn:p:" opt; do
  case $opt in
    h) usage; exit 0 ;;
    n) NPROC=$OPTARG ;;
    p) PORT=$OPTARG ;;
    :|\?) opt_error "$opt" "$OPTARG" ;;
  esac
done
shift $((OPTIND - 1))
need_config "$@"; shift
need_env

if [[ -z $NPROC ]]; then
  NPROC=$("${PYTHON:-python}" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
check_posint -n "$NPROC"
check_port "$PORT"

exec "${PYTHON:-python}" -m lmforge.trainer.launch -- deepspeed --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" \
  --module lmforge.trainer.train --config "$CONFIG" "$@"

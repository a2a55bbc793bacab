#!/usr/bin/env bash
# Two "nodes" on one machine: two independent DeepSpeed launchers, as on two hosts without ssh
# (`deepspeed --no_ssh --node_rank i`), meeting at 127.0.0.1. This exercises the multi-node code path
# (node ranks, global rank mapping, cross-node rendezvous) on a laptop or in CI.
# DeepSpeed maps nodes to hosts through a hostfile even with --no_ssh, so a throwaway one lists two
# fake hostnames (never contacted) with GPUS slots each.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch_scripts/two_nodes_local.sh [-g GPUS] [-p PORT] [-r DIR] CONFIG [section.key=value ...]

Start "node 0" and "node 1" on this machine (deepspeed --no_ssh --node_rank 0|1 --num_nodes 2), each
with GPUS ranks (default 1: world size 2). Output lines are prefixed with [node0] / [node1]; the
script exits non-zero if either node fails (and then stops the other).

  -g GPUS   ranks per node (default 1)
  -p PORT   rendezvous port on 127.0.0.1 (default: $MASTER_PORT or 29500)
  -r DIR    give each node its own run_dir, DIR/node0 and DIR/node1, as node-local disks would: the
            trainer refuses to start (a run_dir must be one filesystem shared by all nodes)
  -h        this help

Example: launch_scripts/two_nodes_local.sh -p 29533 configs/demo.yaml train.max_steps=20
USAGE
}
# shellcheck source=launch_scripts/common.sh
source "$(dirname "$0")/common.sh"

GPUS=1
PORT=${MASTER_PORT:-29500}
NODE_DIRS=""
while getopts ":hg:p:r:" opt; do
  case $opt in
    h) usage; exit 0 ;;
    g) GPUS=$OPTARG ;;
    p) PORT=$OPTARG ;;
    r) NODE_DIRS=$OPTARG ;;
    :|\?) opt_error "$opt" "$OPTARG" ;;
  esac
done
shift $((OPTIND - 1))
need_config "$@"; shift
need_env
check_posint -g "$GPUS"
check_port "$PORT"

HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/lmforge-hostfile.XXXXXX")
printf 'fake-node-0 slots=%s\nfake-node-1 slots=%s\n' "$GPUS" "$GPUS" > "$HOSTFILE"

PYTHON=${PYTHON:-python}
pids=()
cleanup() {
  # Each node's lmforge.trainer.launch runs in its own session (setsid): kill the whole group of any node still
  # running (after a failure), so no rank is left behind.
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  rm -f "$HOSTFILE"
}
trap cleanup EXIT
# A stop (SIGTERM from a scheduler, Ctrl-C, SIGUSR1): hand it to each node's lmforge.trainer.launch, which passes
# it to its ranks and waits while they save; keep waiting here. A second signal kills (lmforge.trainer.launch).
stop() {
  echo "two_nodes_local: SIG$1: asking both nodes to stop (send it again to kill at once)" >&2
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'stop TERM' TERM
trap 'stop INT' INT
trap 'stop USR1' USR1

# Each node's output goes through a line prefixer that ignores stop signals (a group SIGTERM must not
# close the pipe under the node while it saves).
for node in 0 1; do
  node_args=()
  if [[ -n $NODE_DIRS ]]; then node_args=("run_dir=$NODE_DIRS/node$node"); fi
  setsid "$PYTHON" -m lmforge.trainer.launch -- deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$node" \
    --num_nodes 2 --num_gpus "$GPUS" --master_addr 127.0.0.1 --master_port "$PORT" \
    --module lmforge.trainer.train --config "$CONFIG" "$@" ${node_args[@]+"${node_args[@]}"} \
    > >(trap "" TERM INT USR1; exec sed -u "s/^/[node$node] /") 2>&1 &
  pids+=("$!")
done

# Wait for whichever node finishes first; a failure stops the other node (cleanup) instead of leaving
# it blocked in a collective until the rendezvous timeout. `wait -n -p` needs bash >= 5.1; a trapped
# signal interrupts it without a finished node (done_pid empty): then wait on.
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  done_pid=""
  status=0
  wait -n -p done_pid "${remaining[@]}" || status=$?
  if [[ -z ${done_pid:-} ]]; then continue; fi
  if ((status != 0)); then
    # A stopped run exits with train.stopped_exit_status on every node: give the other node a moment to
    # end with the same status (then it is the run's), else this is a failure and the other node is stopped.
    other=""
    for pid in "${remaining[@]}"; do [[ $pid != "$done_pid" ]] && other=$pid; done
    other_status=-1
    if [[ -n $other ]]; then
      for _ in $(seq 1 100); do kill -0 "$other" 2>/dev/null || break; sleep 0.2; done
      if ! kill -0 "$other" 2>/dev/null; then other_status=0; wait "$other" || other_status=$?; fi
    fi
    if ((other_status == status)); then
      pids=()
      echo "both nodes exited with status $status" >&2
      exit "$status"
    fi
    echo "error: node process $done_pid exited with status $status; stopping the other node" >&2
    exit 1
  fi
  left=()
  for pid in "${remaining[@]}"; do
    if [[ $pid != "$done_pid" ]]; then left+=("$pid"); fi
  done
  remaining=("${left[@]+"${left[@]}"}")
done
pids=()
echo "both nodes finished"

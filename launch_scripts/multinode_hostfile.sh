#!/usr/bin/env bash
# Several nodes from a hostfile, started over ssh by the DeepSpeed launcher's pdsh backend.
#
# What every node needs (the launcher runs `cd $PWD && python -u -m deepspeed.launcher.launch ...`
# on each host, with the launching node's python path):
#   * the repository, the Python environment and the current directory at the SAME absolute paths
#     as on this node;
#   * the training data (shards + manifest) at the same path: a shared filesystem, or identical
#     node-local copies (read-only use; the sample-index cache is built once per node);
#   * the run directory (run_dir) on a SHARED filesystem: every rank writes its ZeRO shards into
#     run_dir/checkpoints and resume reads all of them; metrics/TensorBoard are written by rank 0 only;
#   * the tokenizer file at the same path (read by every rank).
# Environment: only variables whose names start with NCCL, PYTHON, UCX, MV2 or MLFLOW are forwarded
# to the other nodes, plus the KEY=VALUE lines of ~/.deepspeed_env or ./.deepspeed_env (put
# OMP_NUM_THREADS, LD_LIBRARY_PATH, HF_HOME etc. there).
# NCCL knobs worth knowing (export them before running this script):
#   NCCL_SOCKET_IFNAME=eth0|ib0   interface for bootstrap/socket traffic (multi-homed nodes)
#   NCCL_IB_HCA=mlx5_0,mlx5_1     InfiniBand adapters to use;  NCCL_IB_DISABLE=1 forces TCP sockets
#   NCCL_DEBUG=INFO               prints the chosen transport/rings: check IB/RoCE is really used
#   NCCL_NET_GDR_LEVEL, NCCL_P2P_DISABLE, NCCL_CROSS_NIC  topology tuning; leave unset unless needed
#   GLOO_SOCKET_IFNAME is the gloo (CPU) equivalent of NCCL_SOCKET_IFNAME (not forwarded: use
#   .deepspeed_env).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch_scripts/multinode_hostfile.sh [-H HOSTFILE] [-N NODES] [-n GPUS] [-m MASTER_ADDR] [-p PORT]
                                            CONFIG [section.key=value ...]

Train on the nodes of a hostfile (lines "HOST slots=GPUS"), launched over passwordless ssh with pdsh.

  -H HOSTFILE     hostfile (default: launch_scripts/hostfile)
  -N NODES        use the first NODES hosts of the hostfile (default: all)
  -n GPUS         ranks per node (default: each host's slots)
  -m MASTER_ADDR  rendezvous address of node 0 reachable from all nodes (default: the first IP of
                  `hostname -I` on the first host; set it on multi-homed nodes)
  -p PORT         rendezvous port (default: $MASTER_PORT or 29500)
  -h              this help

Requirements (shared filesystem, paths, forwarded environment): see the comment at the top of this file.
Example:
  NCCL_SOCKET_IFNAME=ib0 launch_scripts/multinode_hostfile.sh -H hosts.txt -m 10.0.0.1 \
      configs/my_run.yaml train.max_steps=100000
USAGE
}
# shellcheck source=launch_scripts/common.sh
source "$(dirname "$0")/common.sh"

HOSTFILE=$ROOT/launch_scripts/hostfile
NODES=""; GPUS=""; MASTER=""
PORT=${MASTER_PORT:-29500}
while getopts ":hH:N:n:m:p:" opt; do
  case $opt in
    h) usage; exit 0 ;;
    H) HOSTFILE=$OPTARG ;;
    N) NODES=$OPTARG ;;
    n) GPUS=$OPTARG ;;
    m) MASTER=$OPTARG ;;
    p) PORT=$OPTARG ;;
    :|\?) opt_error "$opt" "$OPTARG" ;;
  esac
done
shift $((OPTIND - 1))
need_config "$@"; shift
need_env
[[ -f $HOSTFILE ]] || { echo "error: hostfile $HOSTFILE not found" >&2; exit 2; }
command -v pdsh >/dev/null || { echo "error: pdsh not found (apt-get install pdsh)" >&2; exit 2; }
check_posint -N "$NODES" allow-empty
check_posint -n "$GPUS" allow-empty
check_port "$PORT"

# PYTHONPATH (set in common.sh) is forwarded to every node by the launcher (PYTHON* prefix).
args=(--hostfile "$HOSTFILE" --launcher pdsh --master_port "$PORT")
[[ -n $NODES ]] && args+=(--num_nodes "$NODES")
[[ -n $GPUS ]] && args+=(--num_gpus "$GPUS")
[[ -n $MASTER ]] && args+=(--master_addr "$MASTER")
# pdsh runs the command in the current directory on every node, so it must exist at the same path
# there (run from the repository root or a shared run area); relative paths in CONFIG resolve against it.
exec "${PYTHON:-python}" -m lmforge.trainer.launch -- deepspeed "${args[@]}" --module lmforge.trainer.train --config "$CONFIG" "$@"

#!/usr/bin/env bash
# MPI launch: `mpirun -n N python -m lmforge.trainer.train ...`, one process per GPU (per gloo rank on CPU).
# trainer/parallel/distributed.py reads rank and world size from MPI (mpi4py), the local rank from the
# node-local communicator, and uses MASTER_ADDR/MASTER_PORT from the environment when they are set
# (otherwise rank 0's first `hostname -I` address and port 29500).
# Works with MPICH / Intel MPI (hydra: -genv, -f) and Open MPI (-x, --hostfile); the flavour is read
# from `mpirun --version`. Hostfile formats differ: MPICH "host:slots", Open MPI "host slots=N".
# Stops: the script becomes `python -m lmforge.trainer.launch -- mpirun ...` (exec: a signal to the script's
# pid reaches it), which runs mpirun in a session of its own, forwards the first SIGTERM / SIGINT / SIGUSR1
# to the ranks on this machine, waits while they save, and exits 0 after a clean stop (docs/launching.md).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch_scripts/mpirun.sh [-n NPROC] [-f HOSTFILE] [-m MASTER_ADDR] [-p PORT] CONFIG [section.key=value ...]

Train with mpirun as the process launcher (no DeepSpeed launcher, no ssh of our own).

  -n NPROC        total processes (default 1)
  -f HOSTFILE     MPI hostfile for several nodes (MPICH: "host:slots"; Open MPI: "host slots=N")
  -m MASTER_ADDR  rendezvous address (default: $MASTER_ADDR, else rank 0's first `hostname -I` IP)
  -p PORT         rendezvous port (default: $MASTER_PORT or 29500)
  -h              this help

Environment: MPIRUN (default mpirun), PYTHON (default python); every node needs the repository and
Python environment at the same paths. Example:
  launch_scripts/mpirun.sh -n 2 -m 127.0.0.1 -p 29533 configs/demo.yaml train.max_steps=20
USAGE
}
# shellcheck source=launch_scripts/common.sh
source "$(dirname "$0")/common.sh"

NPROC=1; HOSTFILE=""
MASTER=${MASTER_ADDR:-}
PORT=${MASTER_PORT:-29500}
while getopts ":hn:f:m:p:" opt; do
  case $opt in
    h) usage; exit 0 ;;
    n) NPROC=$OPTARG ;;
    f) HOSTFILE=$OPTARG ;;
    m) MASTER=$OPTARG ;;
    p) PORT=$OPTARG ;;
    :|\?) opt_error "$opt" "$OPTARG" ;;
  esac
done
shift $((OPTIND - 1))
need_config "$@"; shift
need_env
check_posint -n "$NPROC"
check_port "$PORT"
[[ -z $HOSTFILE || -f $HOSTFILE ]] || { echo "error: hostfile $HOSTFILE not found" >&2; exit 2; }

MPIRUN=${MPIRUN:-mpirun}
PYTHON=${PYTHON:-python}
command -v "$MPIRUN" >/dev/null || { echo "error: $MPIRUN not found (pip install mpich, or load your MPI)" >&2; exit 2; }
export MASTER_PORT=$PORT
[[ -n $MASTER ]] && export MASTER_ADDR=$MASTER

# Pass the variables the ranks need explicitly: Open MPI forwards nothing unless asked (-x), hydra
# forwards the whole environment by default but -genv makes it explicit on remote nodes too.
vars=(PYTHONPATH MASTER_PORT OMP_NUM_THREADS)
[[ -n $MASTER ]] && vars+=(MASTER_ADDR)
args=(-n "$NPROC")
# Read the version first: `mpirun --version | grep -q` can fail under pipefail (grep exits at its first
# match, mpirun then dies of SIGPIPE), which would take Open MPI for hydra.
flavour=$("$MPIRUN" --version 2>&1 || true)
if grep -qi "open mpi\|open-mpi\|openmpi" <<<"$flavour"; then
  [[ -n $HOSTFILE ]] && args+=(--hostfile "$HOSTFILE")
  for v in "${vars[@]}"; do
    if [[ -n ${!v:-} ]]; then args+=(-x "$v"); fi
  done
else
  [[ -n $HOSTFILE ]] && args+=(-f "$HOSTFILE")
  for v in "${vars[@]}"; do
    if [[ -n ${!v:-} ]]; then args+=(-genv "$v" "${!v}"); fi
  done
fi
exec "$PYTHON" -m lmforge.trainer.launch -- "$MPIRUN" "${args[@]}" "$PYTHON" -u -m lmforge.trainer.train --config "$CONFIG" "$@"

"""Process-group start-up for every launcher: deepspeed (hostfile/pdsh, --no_ssh), torchrun, mpirun, srun.

The deepspeed launcher and torchrun export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under
``mpirun`` (MPICH/Open MPI/Intel MPI) or Slurm's ``srun`` they are missing, so we derive them here:

* MPI: rank and size from ``MPI.COMM_WORLD`` (mpi4py), the local rank and local size from the
  node-local communicator (``COMM_TYPE_SHARED``), and MASTER_ADDR from the environment when the user
  set it (``mpirun -x MASTER_ADDR`` / ``-genv``); only otherwise rank 0's first ``hostname -I`` address,
  broadcast to all ranks. DeepSpeed's own MPI discovery always overwrites MASTER_ADDR with that
  address, which picks the wrong interface on multi-homed nodes, so we turn it off.
* srun (one task per GPU): SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID (srun sets these per
  task), MASTER_ADDR = the first host of the job unless set. The step's task count is used, never the
  job's SLURM_NTASKS: a plain ``python`` in the batch script (one process, no srun step variables) is
  a single-process run and must not wait for SLURM_NTASKS ranks that will never come.
* nothing: a single process, world size 1 on 127.0.0.1 (MASTER_ADDR/MASTER_PORT still honoured).

MASTER_PORT defaults to 29500 when unset; set it when several jobs share a node.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import torch

# Per-rank variables that MPI launchers export: Open MPI, MPICH/Intel MPI (hydra), PMIx (Open MPI 5, srun).
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _under_mpi() -> bool:
    return any(v in os.environ for v in _MPI_RANK_VARS)


def _first_ip() -> str:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return socket.gethostbyname(socket.gethostname())


def _from_mpi() -> tuple[int, int, int, int, str]:
    try:
        from mpi4py import MPI  # imported only under MPI: the normal path needs no MPI library
    except ImportError as e:
        raise RuntimeError(
            "launched under MPI (found one of " + ", ".join(_MPI_RANK_VARS) + ") but mpi4py is not "
            "importable; install it (pip install mpi4py, plus an MPI such as the 'mpich' wheel)"
        ) from e
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    # Rank 0 decides (its environment, else its own address) and everyone takes rank 0's answer, so
    # ranks can never disagree even if only some of them were given MASTER_ADDR.
    master = comm.bcast((os.environ.get("MASTER_ADDR") or _first_ip()) if rank == 0 else None, root=0)
    return rank, size, local_rank, local_size, master


def _from_slurm() -> tuple[int, int, int, int, str]:
    rank = int(os.environ["SLURM_PROCID"])
    size = int(os.environ["SLURM_STEP_NUM_TASKS"])
    local_rank = int(os.environ.get("SLURM_LOCALID", 0))
    # SLURM_STEP_TASKS_PER_NODE looks like "4(x2)" or "4,3": the first count is this node's for
    # homogeneous steps, which is the only layout the sbatch template uses.
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1")
    local_size = int(per_node.split("(")[0].split(",")[0])
    master = os.environ.get("MASTER_ADDR")
    if not master:
        nodes = subprocess.run(
            ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        master = nodes[0]
    return rank, size, local_rank, local_size, master


def setup_env_from_launcher() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT when a launcher did not."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    if _under_mpi():
        rank, size, local_rank, local_size, master = _from_mpi()
    elif "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
        rank, size, local_rank, local_size, master = _from_slurm()
    else:
        rank, size, local_rank, local_size = 0, 1, 0, 1
        master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if not 0 <= rank < size or not 0 <= local_rank < local_size:
        raise RuntimeError(f"launcher gave rank {rank}/{size}, local rank {local_rank}/{local_size}")
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_size),
        MASTER_ADDR=master, MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
    )
    # DeepSpeed's CPU shared-memory collectives read LOCAL_SIZE (its launcher sets it).
    os.environ.setdefault("LOCAL_SIZE", str(local_size))


def init(timeout_minutes: int = 30) -> None:
    import datetime

    import deepspeed

    setup_env_from_launcher()
    # gloo on CPU, nccl on CUDA: DeepSpeed's accelerator picks the backend.
    deepspeed.init_distributed(
        auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    release_shm_segment()


def shm_segment_path(rank: int, addr: str | None = None, port: int | str | None = None) -> Path:
    """The /dev/shm file DeepSpeed's CPU shared-memory all-reduce creates for `rank` of the job whose
    rendezvous is addr:port (default: this process's MASTER_ADDR/MASTER_PORT)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_segment() -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce segment as soon as every rank has mapped it.

    When all ranks of a CPU job share one node, DeepSpeed's shm all-reduce op (0.19.x) creates a ~66 MB
    segment per rank in /dev/shm during `init_distributed` (each rank maps every other rank's segment
    before returning) and never unlinks it. /dev/shm is RAM: every run leaked 66 MB per rank until the
    machine ran out of memory. After a barrier every mapping exists, so the names can go now; the memory is
    freed when the last process exits, however it exits (kill -9 included).
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    shm_segment_path(dist.get_rank()).unlink(missing_ok=True)


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL only reduces CUDA tensors, gloo CPU ones."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

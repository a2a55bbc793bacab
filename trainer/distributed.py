"""Process-group start-up for every launcher: deepspeed (hostfile/pdsh, --no_ssh), torchrun, mpirun, srun.

The deepspeed launcher and torchrun export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under
``mpirun`` (MPICH/Open MPI) or Slurm's ``srun`` they are missing, so we derive them here: rank and size
from the launcher's variables (or mpi4py), the local rank from the node-local communicator, and
MASTER_ADDR from the environment when the user set it — DeepSpeed's own MPI discovery always
overwrites it with rank 0's ``hostname -I``, which picks the wrong interface on multi-homed nodes.
"""

from __future__ import annotations

import os
import socket
import subprocess

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


def setup_env_from_launcher() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT when a launcher did not."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    if _under_mpi():
        from mpi4py import MPI  # imported only under MPI: the normal path needs no MPI library

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank = local.Get_rank()
        master = os.environ.get("MASTER_ADDR") or (_first_ip() if rank == 0 else None)
        master = comm.bcast(master, root=0)
    elif "SLURM_PROCID" in os.environ:
        rank, size = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
        master = os.environ.get("MASTER_ADDR")
        if not master:
            nodes = subprocess.run(
                ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                capture_output=True, text=True, check=True,
            ).stdout.split()
            master = nodes[0]
    else:
        rank, size, local_rank, master = 0, 1, 0, os.environ.get("MASTER_ADDR", "127.0.0.1")
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank), MASTER_ADDR=master,
        MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
    )
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))


def init(timeout_minutes: int = 30) -> None:
    import datetime

    import deepspeed

    setup_env_from_launcher()
    # gloo on CPU, nccl on CUDA: DeepSpeed's accelerator picks the backend.
    deepspeed.init_distributed(
        auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes)
    )

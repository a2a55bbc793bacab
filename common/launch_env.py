"""Which launcher started this process, and this process's place in the job.

One rule for every command (the data pipeline's ``mpirun -n K ... preprocess`` and the trainer under
``mpirun``, ``srun``, ``deepspeed`` or ``torchrun``):

* **MPI** (mpirun/mpiexec of MPICH, Intel MPI, Open MPI; ``srun --mpi=pmi2|pmix``): an MPI rank
  variable is set (``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``, ``PMIX_RANK``, ``MV2_COMM_WORLD_RANK``) and
  no MPI size variable says 1. Rank and size then come from ``MPI.COMM_WORLD`` (mpi4py, imported only
  here: the single-process path needs neither mpi4py nor an MPI library), the local rank and size from
  the node-local communicator (``COMM_TYPE_SHARED``). ``mpirun -n 1`` is a plain single process.
* **Slurm srun without MPI** (the trainer's sbatch template: one task per GPU): ``SLURM_PROCID``,
  ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``. The step's task count is used, never the job's
  ``SLURM_NTASKS``: a plain ``python`` in a batch script is one process and must not wait for ranks
  that will never come.
* **torch-style** (the deepspeed launcher, torchrun): ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are set.
* **nothing**: one process.

``torch_env()`` fills the torch-style variables for the process group from whichever applies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
DEFAULT_MASTER_PORT = "29500"


def mpi_launched() -> bool:
    """Started by an MPI launcher with more than one process (see the module docstring)."""
    if not any(v in os.environ for v in MPI_RANK_VARS):
        return False
    sizes = [int(os.environ[v]) for v in MPI_SIZE_VARS if os.environ.get(v, "").isdigit()]
    return not sizes or max(sizes) > 1


def srun_launched() -> bool:
    """A task of a Slurm job step (srun), whatever its size."""
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ


class SingleProcess:
    """The one-process world, with the few collectives the data pipeline uses."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    def barrier(self) -> None:
        pass

    def gather(self, obj, root: int = 0):
        return [obj]

    def bcast(self, obj, root: int = 0):
        return obj

    def allgather(self, obj):
        return [obj]

    def alltoall(self, objs):
        return list(objs)

    def scatter(self, objs, root: int = 0):
        return objs[0]


class MpiWorld:
    """``MPI.COMM_WORLD`` with its node-local rank and size."""

    def __init__(self) -> None:
        try:
            from mpi4py import MPI  # only under an MPI launcher
        except ImportError as e:
            raise RuntimeError(
                "started by an MPI launcher (" + ", ".join(v for v in MPI_RANK_VARS if v in os.environ) +
                " is set) but mpi4py is not importable; install it (pip install mpi4py, plus an MPI such "
                "as the 'mpich' wheel)") from e
        self._comm = MPI.COMM_WORLD
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()
        local = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()

    def barrier(self) -> None:
        self._comm.barrier()

    def gather(self, obj, root: int = 0):
        return self._comm.gather(obj, root=root)

    def bcast(self, obj, root: int = 0):
        return self._comm.bcast(obj, root=root)

    def allgather(self, obj):
        return self._comm.allgather(obj)

    def alltoall(self, objs):
        return self._comm.alltoall(objs)

    def scatter(self, objs, root: int = 0):
        return self._comm.scatter(objs, root=root)

    def abort(self, code: int) -> None:
        """End every rank of the job now (MPI_Abort): for an error on one rank while the others may be
        waiting in a collective that would never complete."""
        sys.stdout.flush()
        sys.stderr.flush()
        self._comm.Abort(code)


_WORLD: SingleProcess | MpiWorld | None = None


def mpi_world() -> SingleProcess | MpiWorld:
    """The MPI world when MPI started this process, else the single-process stand-in (cached)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = MpiWorld() if mpi_launched() else SingleProcess()
    return _WORLD


def first_ip() -> str:
    """This host's first address from ``hostname -I`` (else its resolved name)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return socket.gethostbyname(socket.gethostname())


def _from_mpi() -> tuple[int, int, int, int, str]:
    w = mpi_world()
    # Rank 0 decides (its environment, else its own address) and everyone takes rank 0's answer, so
    # ranks never disagree even if only some of them were given MASTER_ADDR.
    master = w.bcast((os.environ.get("MASTER_ADDR") or first_ip()) if w.rank == 0 else None, root=0)
    return w.rank, w.size, w.local_rank, w.local_size, master


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
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        master = nodes[0]
    return rank, size, local_rank, local_size, master


def torch_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT when the launcher did not
    (MPI, srun, or a single process; MASTER_ADDR/MASTER_PORT are honoured when set; the port defaults to
    29500: set it when several jobs share a node)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    if mpi_launched():
        rank, size, local_rank, local_size, master = _from_mpi()
    elif srun_launched():
        rank, size, local_rank, local_size, master = _from_slurm()
    else:
        rank, size, local_rank, local_size = 0, 1, 0, 1
        master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if not 0 <= rank < size or not 0 <= local_rank < local_size:
        raise RuntimeError(f"launcher gave rank {rank}/{size}, local rank {local_rank}/{local_size}")
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_size),
        MASTER_ADDR=master, MASTER_PORT=os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT),
    )
    # DeepSpeed's CPU shared-memory collectives read LOCAL_SIZE (its launcher sets it).
    os.environ.setdefault("LOCAL_SIZE", str(local_size))

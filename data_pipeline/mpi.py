"""Optional MPI: ``mpirun -n K python -m data_pipeline preprocess ...`` splits the work among ranks.

mpi4py is imported only when the process was started by an MPI launcher (its rank variables are set),
so the ordinary single-process path needs neither mpi4py nor an MPI library.
"""

from __future__ import annotations

import os

_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_by_mpi() -> bool:
    # SLURM_PROCID alone (srun without MPI) is not enough: require an MPI size variable > 1.
    return any(int(os.environ.get(v, "1")) > 1 for v in _SIZE_VARS)


class _Single:
    """The one-process stand-in with the few collective calls the pipeline uses."""

    rank = 0
    size = 1

    def barrier(self) -> None:
        pass

    def gather(self, obj, root: int = 0):
        return [obj]

    def bcast(self, obj, root: int = 0):
        return obj


class _Mpi:
    def __init__(self) -> None:
        from mpi4py import MPI  # lazy: only under an MPI launcher

        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()

    def barrier(self) -> None:
        self._comm.barrier()

    def gather(self, obj, root: int = 0):
        return self._comm.gather(obj, root=root)

    def bcast(self, obj, root: int = 0):
        return self._comm.bcast(obj, root=root)


_WORLD = None


def world():
    global _WORLD
    if _WORLD is None:
        _WORLD = _Mpi() if launched_by_mpi() else _Single()
    return _WORLD

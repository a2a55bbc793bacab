"""The process group and the few collectives the step loop itself calls.

``init`` works under every launcher (deepspeed with a hostfile or ``--no_ssh``, torchrun, mpirun, srun):
``data_pipeline.common.launch_env.torch_env`` derives RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR from
whichever started the process. DeepSpeed's own MPI discovery is off: it always overwrites MASTER_ADDR
with rank 0's first ``hostname -I`` address, which picks the wrong interface on multi-homed nodes.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from data_pipeline.common.launch_env import torch_env

from . import deepspeed_compat


def init(timeout_minutes: int = 30) -> None:
    import deepspeed

    torch_env()
    # gloo on CPU, nccl on CUDA: DeepSpeed's accelerator picks the backend.
    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes))
    deepspeed_compat.release_shm_segment()


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL only reduces CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_agree(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a stop signal that reached one rank)."""
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_across_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()

"""The process group and the few collectives the step loop itself calls.

``init`` works under every launcher (deepspeed with a hostfile or ``--no_ssh``, torchrun, mpirun, srun):
``lmforge.common.launch_env.torch_env`` derives RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR from
whichever started the process. DeepSpeed's own MPI discovery is off: it always overwrites MASTER_ADDR
with rank 0's first ``hostname -I`` address, which picks the wrong interface on multi-homed nodes.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from lmforge.common.launch_env import torch_env

from . import deepspeed_compat


def init(timeout_minutes: float = 30) -> None:
    """Join the job's process group (collective). A collective waiting longer than ``timeout_minutes``
    fails the job; with NCCL, asynchronous error handling turns that (or a dead peer) into an error on
    every rank instead of a hang."""
    import os

    import deepspeed

    torch_env()
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # gloo on CPU, nccl on CUDA: DeepSpeed's accelerator picks the backend.
    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes))
    deepspeed_compat.release_shm_segment()


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL only reduces CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


class StepSums:
    """Small per-step values summed over all ranks, read on the host without making it wait for the device.

    ``push(step, values)`` starts an asynchronous all-reduce of the values (a few floats per step) and,
    on CUDA, a non-blocking copy of the result into pinned host memory followed by an event, so the host
    goes on queueing the next step's kernels. ``ready(wait_through)`` returns, in step order, the records
    that have completed, first waiting for every record up to step ``wait_through`` (the step loop waits
    through step - LAG each step, and through the current step only at log, eval and save steps). So the
    host runs at most LAG steps ahead of the device, and a value pushed at step s (a stop request, a
    non-finite loss) is seen by every rank by the end of step s + LAG at the latest.
    """

    LAG = 2

    def __init__(self, names: tuple[str, ...], sizes: dict[str, int] | None = None):
        """``sizes``: entries of ``names`` that are vectors of that many values (pushed as 1-D tensors and
        read back as lists); every other entry is one number."""
        self.names = names
        self.sizes = {n: (sizes or {}).get(n, 1) for n in names}
        self.vectors = set(sizes or ())
        self.device = collective_device()
        # (step, all-reduce work, result, CUDA event, pinned input kept alive until the copy is done)
        self._pending: list[tuple[int, object, torch.Tensor, object, torch.Tensor]] = []

    def push(self, step: int, values: list[torch.Tensor | float]) -> None:
        """Start summing ``values`` (device scalars and host numbers, in ``names`` order) over ranks."""
        cuda = self.device.type == "cuda"
        numbers = torch.tensor([float(v) for v in values if not torch.is_tensor(v)], dtype=torch.float64)
        if cuda:  # a copy from pinned memory does not make the host wait for the device
            numbers = numbers.pin_memory()
        it = iter(numbers.to(self.device, non_blocking=True))
        t = torch.cat([v.detach().reshape(-1).to(device=self.device, dtype=torch.float64) if torch.is_tensor(v)
                       else next(it).reshape(1) for v in values])
        work = dist.all_reduce(t, async_op=True)
        event = None
        if cuda:
            work.wait()  # orders the copy after the reduction on the current stream; does not block the host
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            t, work = host, None
        self._pending.append((step, work, t, event, numbers))

    def ready(self, wait_through: int) -> list[tuple[int, dict[str, float]]]:
        out = []
        while self._pending:
            step, work, t, event, _ = self._pending[0]
            done = event.query() if event is not None else work.is_completed()
            if not done and step > wait_through:
                break
            if event is not None:
                event.synchronize()
            else:
                work.wait()
            self._pending.pop(0)
            flat, record, at = t.tolist(), {}, 0
            for name in self.names:
                n = self.sizes[name]
                record[name] = flat[at:at + n] if name in self.vectors else flat[at]
                at += n
            out.append((step, record))
        return out

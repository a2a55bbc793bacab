"""Run under `deepspeed --num_gpus N`: trainer.distributed.init() must give NCCL on CUDA, and collectives work.

Prints one line ``NCCL_OK rank world backend`` per rank on success.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from trainer import distributed


def main() -> None:
    distributed.init(timeout_minutes=5)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    backend = dist.get_backend()
    assert backend == "nccl", backend
    x = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    assert torch.all(x == world * (world + 1) / 2), x[:4]  # 1 + 2 + ... + world, exact in fp32
    parts = [torch.empty(4, device="cuda") for _ in range(world)]
    dist.all_gather(parts, torch.full((4,), float(rank), device="cuda"))
    assert [int(p[0].item()) for p in parts] == list(range(world))
    dist.barrier()
    print(f"NCCL_OK {rank} {world} {backend}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

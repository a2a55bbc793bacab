"""What a plan is about: a cluster (``Cluster``, with its GPU's ``GpuSpec``) and one candidate parallel layout of a
run on it (``PlanLayout``). Shared by the memory, communication and time models of ``lmforge.trainer.plan``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model: memory (GiB, as torch reports it: 2**30 bytes), dense bf16 peak (TFLOP/s), and the
    per-GPU bus bandwidths (GB/s = 1e9 bytes/s, unidirectional) within a node (NVLink/NVSwitch) and across
    nodes (InfiniBand/RoCE NIC per GPU)."""

    name: str
    memory_gib: float
    peak_tflops: float
    intra_gbps: float
    inter_gbps: float


@dataclass(frozen=True)
class Cluster:
    gpu: GpuSpec
    gpus: int  # world size
    gpus_per_node: int

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)


@dataclass(frozen=True)
class PlanLayout:
    """One way to run the config on the cluster. dp = world / (tp · sp); expert parallel groups of ``ep``
    ranks are carved out of the data-parallel ranks (DeepSpeed AutoEP); ``hpz``: ZeRO++ secondary partition
    size (1 = off)."""

    zero_stage: int
    tp: int = 1
    sp: int = 1
    ep: int = 0
    activation_checkpointing: int = 0  # 0 = off, N = every N-th layer recomputed
    offload: str = "none"  # none | optimizer | optimizer+params
    micro_batch: int = 1
    grad_accum: int = 1
    hpz: int = 1

    def dp(self, world: int) -> int:
        return world // (self.tp * self.sp)

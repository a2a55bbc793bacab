"""The GPUs ``lmforge plan`` knows (``--gpu NAME``), and ``custom:MEM_GIB,PEAK_TFLOPS,INTRA_GBPS,INTER_GBPS``.

Memory is what ``torch.cuda.get_device_properties(0).total_memory`` reports, in GiB (2**30 bytes) — a little
less than the marketing figure: the planner compares its prediction with that. Peak: dense (no sparsity)
bf16 tensor-core TFLOP/s (the figure MFU divides by, ``trainer/metrics.py``). Bandwidths: GB/s (1e9 bytes/s)
per GPU per direction, within a node (NVLink through NVSwitch) and across nodes (the GPU's own NIC).

====  ==========  ======  ======  ======  ==========================================================================
GPU   memory GiB  peak    NVLink  NIC     sources
====  ==========  ======  ======  ======  ==========================================================================
h100  79.6        989     450     50      H100 SXM5 80GB: NVIDIA H100 datasheet (989.4 TFLOP/s dense BF16; NVLink 4:
                                          900 GB/s bidirectional); 81,559 MiB as NVML reports it (Modal, "Why does
                                          an NVIDIA H100 80GB card offer 85.52 GB?", thundergolfer.com); one 400 Gb/s
                                          ConnectX-7 NIC per GPU (DGX H100)
h200  139.8       989     450     50      H200 SXM 141GB: torch's total_memory on the lent machine (nvidia-smi
                                          143,771 MiB, benchmarks/results/h200-2026-11-29/env.txt); H100's compute
                                          and NVLink (NVIDIA H200 datasheet); 400 Gb/s NIC per GPU
a100  80.0        312     300     25      A100 SXM4 80GB: NVIDIA A100 datasheet (312 TFLOP/s dense BF16; NVLink 3:
                                          600 GB/s bidirectional); 81,920 MiB (NVML, same source as h100);
                                          200 Gb/s HDR NIC per GPU (DGX A100)
b200  178.35      2250    900     50      B200 (HGX/DGX B200, 180 GB HBM3e): totalGlobalMem 178.35 GiB as queried
                                          on a B200 in pytorch/ao pull request 4002 (2026-03); 2.25 PFLOP/s dense
                                          BF16 (DGX B200 datasheet: 72 PFLOP/s FP8 training for 8 GPUs, dense
                                          FP8 = 2 × BF16; torchao's roofline table, ``bf16_peak_tops`` 2.25e15);
                                          NVLink 5: 1.8 TB/s bidirectional; 400 Gb/s ConnectX-7 NIC per GPU
====  ==========  ======  ======  ======  ==========================================================================
"""

from __future__ import annotations

from .layout import GpuSpec

GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", memory_gib=79.6, peak_tflops=989.0, intra_gbps=450.0, inter_gbps=50.0),
    "h200": GpuSpec("h200", memory_gib=139.8, peak_tflops=989.0, intra_gbps=450.0, inter_gbps=50.0),
    "a100": GpuSpec("a100", memory_gib=80.0, peak_tflops=312.0, intra_gbps=300.0, inter_gbps=25.0),
    "b200": GpuSpec("b200", memory_gib=178.35, peak_tflops=2250.0, intra_gbps=900.0, inter_gbps=50.0),
}


def parse_gpu(text: str) -> GpuSpec:
    """A known name (``GPUS``) or ``custom:MEM_GIB,PEAK_TFLOPS,INTRA_GBPS,INTER_GBPS``; ValueError saying
    what is expected."""
    t = text.strip().lower()
    if t in GPUS:
        return GPUS[t]
    if t.startswith("custom:"):
        parts = t[len("custom:"):].split(",")
        try:
            mem, peak, intra, inter = (float(x) for x in parts)
        except ValueError:
            raise ValueError(f"--gpu {text!r}: custom needs four numbers, custom:MEM_GIB,PEAK_TFLOPS,INTRA_GBPS,"
                             "INTER_GBPS (e.g. custom:80,989,450,50)") from None
        if min(mem, peak, intra, inter) <= 0:
            raise ValueError(f"--gpu {text!r}: every custom figure must be > 0")
        return GpuSpec("custom", mem, peak, intra, inter)
    raise ValueError(f"--gpu {text!r}: one of {', '.join(GPUS)} or custom:MEM_GIB,PEAK_TFLOPS,INTRA_GBPS,INTER_GBPS")

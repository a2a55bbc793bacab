"""Step time of a layout: compute at a measured efficiency, plus the communication compute does not hide
(``comms.py``), plus the host work of offload.

* **Compute**: the model's training FLOPs per optimizer step (``lmforge.model.flops_per_token``, the PaLM
  convention: 6 per weight per token and attention over whole rows, plus one more forward of the recomputed
  layers under activation checkpointing) per GPU, divided by the GPU's dense peak × ``EFFICIENCY``: the MFU
  measured on one H200 for the ``1b`` preset (bf16, ZeRO-1, micro-batch 4 × 4096, packed documents), whole
  steps (optimizer included, no communication: one GPU), recorded in the repository (``EFFICIENCY``'s
  ``source``). Compiled layers (``train.compile``) use the compiled flex-attention figure, eager layers the
  eager causal one. This is one model shape on one GPU: other shapes (and a Mixture of Experts, whose
  experts are not what was timed) inherit it until they are measured.
* **Communication**: ``comms.collectives`` lists the step's collectives for the layout, ``comms.exposed``
  prices them on the cluster (bus-bandwidth model) and subtracts what overlaps the forward and backward
  compute (one third and two thirds of it, recomputation in backward).
* **Offload** (an assumption, not measured): the optimizer step on the host at ``CPU_ADAM_PARAMS_PER_S``
  parameters per second per GPU's share of the cores, and the gradients to and parameters from the host over
  PCIe at ``PCIE_GBPS`` per GPU, not overlapped.
"""

from __future__ import annotations

import functools

from lmforge.model import ModelConfig, flops_per_token

from .layout import Cluster, PlanLayout

try:  # the communication model (another part of the planner); absent, communication is left out
    from . import comms
except ImportError:  # pragma: no cover - only while comms.py is being written
    comms = None

# Measured on the lent H200 (benchmarks/train_throughput.py; the run's JSON is the source of truth).
EFFICIENCY = {
    "compiled": {"mfu": 0.528, "variant": "compiled:flex",
                 "source": "benchmarks/results/h200-2026-11-29/throughput_run2.json",
                 "what": "1b bf16 ZeRO-1, 1 H200, micro-batch 4 × seq 4096, ~500-token documents, layers compiled, "
                         "flex document attention"},
    "eager": {"mfu": 0.410, "variant": "eager:causal",
              "source": "benchmarks/results/h200-2026-11-29/throughput_run2.json",
              "what": "1b bf16 ZeRO-1, 1 H200, micro-batch 4 × seq 4096, eager layers, causal attention"},
}
CPU_ADAM_PARAMS_PER_S = 1.0e9  # assumption: DeepSpeed's CPU Adam, per GPU's share of a node's cores
PCIE_GBPS = 25.0  # assumption: host <-> GPU, per GPU (PCIe Gen4/5 x16 in practice)


def efficiency(compiled: bool) -> dict:
    return EFFICIENCY["compiled" if compiled else "eager"]


@functools.lru_cache(maxsize=1024)
def _per_token(mcfg: ModelConfig, seq_len: int, every: int) -> float:
    f = flops_per_token(mcfg, seq_len)
    if every:
        n = len(range(0, mcfg.num_hidden_layers, every))
        f += (flops_per_token(mcfg, seq_len, recompute=True) - f) * n / mcfg.num_hidden_layers
    return f


def step_flops(mcfg: ModelConfig, seq_len: int, tokens: int, every: int, recompute: bool = True) -> float:
    """Training FLOPs of ``tokens`` tokens (PaLM convention); with ``recompute``, plus one forward of the layers
    activation checkpointing recomputes (every ``every``-th)."""
    return _per_token(mcfg, seq_len, every if recompute else 0) * tokens


def step_time(mcfg: ModelConfig, layout: PlanLayout, cluster: Cluster, seq_len: int, precision: str,
              compiled: bool, partition_params: float, ds_config: dict | None = None) -> dict:
    """Predicted seconds of one optimizer step and what they are made of: {"step_s", "compute_s",
    "comm_exposed_s", "comm_total_s", "offload_s", "tokens_per_s", "mfu", "efficiency", "comm_model",
    "collectives"}."""
    world = cluster.gpus
    dp = layout.dp(world)
    global_batch = layout.micro_batch * layout.grad_accum * dp
    tokens = global_batch * seq_len
    peak = cluster.gpu.peak_tflops * 1e12
    eff = efficiency(compiled)
    work = step_flops(mcfg, seq_len, tokens, layout.activation_checkpointing) / world
    compute = work / (peak * eff["mfu"])
    recompute_share = step_flops(mcfg, seq_len, tokens, layout.activation_checkpointing) / \
        step_flops(mcfg, seq_len, tokens, 0) - 1.0
    forward = compute / (3 + recompute_share * 3) if recompute_share else compute / 3
    backward = compute - forward
    if comms is not None:
        cols = comms.collectives(mcfg, layout, world, seq_len, precision, ds_config=ds_config,
                                 gpus_per_node=cluster.gpus_per_node)
        total = comms.comm_time(cols, cluster)
        exp = comms.exposed(cols, cluster, overlap_comm=True, forward_s=forward, backward_s=backward)
        comm_exposed, comm_total, model = exp["exposed_s"], total["total_s"], "trainer/plan/comms.py"
        top = sorted(exp["collectives"], key=lambda r: -r["exposed_s"])[:5]
    else:
        comm_exposed = comm_total = 0.0
        model, top = "none (trainer/plan/comms.py absent: communication not counted)", []
    offload = 0.0
    if layout.offload != "none":
        offload = partition_params / CPU_ADAM_PARAMS_PER_S + partition_params * (4 + 2) / (PCIE_GBPS * 1e9)
        if layout.offload == "optimizer+params":
            offload += partition_params * 2 * 2 * layout.grad_accum / (PCIE_GBPS * 1e9)
    step = compute + comm_exposed + offload
    model_flops = step_flops(mcfg, seq_len, tokens, 0)
    return {"step_s": step, "compute_s": compute, "comm_exposed_s": comm_exposed, "comm_total_s": comm_total,
            "offload_s": offload, "tokens_per_s": tokens / step, "mfu": model_flops / step / world / peak,
            "efficiency": eff, "comm_model": model, "collectives": top, "global_batch": global_batch,
            "tokens_per_step": tokens}

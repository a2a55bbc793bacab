"""Per-GPU memory of one layout: model states by ZeRO stage and precision, DeepSpeed's communication buffers,
activations (measured: ``activations.py``) and an allocator reserve, over the phases of a step.

Parameter counts come from the model's own shapes (``lmforge.model.parameter_shapes``, built on the meta
device): Ψr = what one rank holds whole (tensor-parallel linears cut as the family's ``tp_plan`` says, the
experts of a Mixture of Experts divided by ``parallel.expert_parallel``), Ψz = its ZeRO partition (dense
parameters over the ZeRO group N = data- × sequence-parallel ranks, experts over the expert-data-parallel
group N / E, as DeepSpeed AutoEP groups them). p = bytes of a training parameter (2 in bf16/fp16/fp8, 4 in
fp32).

=================  ============================================================================================
weights            p·Ψr (ZeRO 0-2); ZeRO-3: p·Ψz plus the parameters of at most
                   ``stage3_param_persistence_threshold`` elements (norms), kept whole; 0 with
                   ``offload: optimizer+params``. ZeRO++ hpZ adds the secondary copy, p·Ψr / hpz.
gradients          the half-precision (fp32 in fp32 runs) gradients: ZeRO-0/1 p·Ψr (each parameter's
                   ``.grad``, reduced at the accumulation boundary); ZeRO-2 p·Ψz (the partition
                   ``copy_grads_in_partition`` fills); ZeRO-3 p·Ψz (``grad_partitions_flat_buffer``,
                   allocated at start-up). Off the GPU with optimizer offload (ZeRO-2/3 copy them to the
                   host). ZeRO-0/1/2 gradients appear during backward (a layer's once its backward ran),
                   ZeRO-3's always; with gradient accumulation they persist from the first micro-batch on.
optimizer states   Adam's two fp32 moments, 8 bytes per parameter, plus fp32 master weights (4) in half
                   precision (DeepSpeed keeps fp32 masters for bf16 and fp16): of Ψr at ZeRO-0, of Ψz at
                   ZeRO >= 1; on the host with optimizer offload.
fp32 gradients     at the optimizer step only, when activations are gone: the reduced gradients in fp32
                   (ZeRO-1/2 ``single_grad_partition``, ZeRO-3 per sub-group of at most ``sub_group_size``
                   elements, ZeRO-0 bf16/fp16 the FP16_Optimizer's flat copy): 4·Ψz (4·Ψr at ZeRO-0); none
                   in fp32 runs (the gradients are fp32 already) or with offload.
activations        decoder layers (measured: ``activations.py``) at the phase of the peak.
loss head          embedding, final norm and chunked loss (measured), at the phase of the peak.
buffers            DeepSpeed's communication buffers from the run's DeepSpeed JSON (the template's values,
                   else ``communication_defaults``, else DeepSpeed's defaults): ZeRO-1/2 the gradient bucket,
                   ``reduce_bucket_size`` elements, ×4.5 with ``overlap_comm`` (DeepSpeed's documented cost),
                   plus one fp32 copy of a bucket when gradients are reduced in fp32
                   (``communication_data_type``); ZeRO-3 the gathered parameters, up to
                   ``stage3_max_live_parameters`` (bounded by the rank's parameters, at least the largest
                   module) plus the ``stage3_prefetch_bucket_size`` prefetch, the largest module's gradient
                   before its reduce-scatter, and the reduce bucket as ZeRO-1/2's; ZeRO-0 the all-reduce
                   buffer at the step (at most 5e8 elements, ``buffered_allreduce_fallback``) when the
                   data-parallel group has more than one rank.
reserve            what PyTorch's caching allocator and the CUDA context take beyond the allocated peak:
                   ``RESERVE_FRACTION`` of the peak (fragmentation, blocks cached but free) plus
                   ``RESERVE_FIXED_GIB`` (CUDA context, cuBLAS and NCCL workspaces). A stated rule, not
                   measured yet (the H200 check records ``max_memory_allocated``, which the peak is compared
                   with, without the reserve).
=================  ============================================================================================

The peak is the largest of: each layer's forward and the loss head (weights, optimizer states, buffers,
persistent gradients, activations held), each layer's backward (the same, the gradients of the layers whose
backward has run) and the optimizer step (no activations; the fp32 gradients). DeepSpeed's own estimators
(``estimate_zero2/3_model_states_mem_needs``) count the same model states: tests/test_plan.py checks them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from lmforge.model import ModelConfig, family_of, parameter_shapes
from lmforge.model.registry import plan_regex

from .activations import Activations
from .layout import PlanLayout

GIB = 2**30
RESERVE_FRACTION = 0.05
RESERVE_FIXED_GIB = 1.0
OVERLAP_BUCKETS = 4.5  # DeepSpeed: overlap_comm costs about 4.5 reduce buckets
ZERO0_ALLREDUCE_ELEMENTS = 500_000_000  # DeepSpeed engine.buffered_allreduce_fallback's elements_per_buffer

# DeepSpeed 0.19.8's defaults for the settings a run's DeepSpeed JSON may leave out (DeepSpeedZeroConfig).
DS_ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                    "stage3_max_live_parameters": 1_000_000_000, "stage3_param_persistence_threshold": 100_000,
                    "overlap_comm": False, "sub_group_size": 1_000_000_000}


def param_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class RankParams:
    """Parameter counts of one rank (module docstring): ``replica`` Ψr and ``partition`` Ψz, the rank's
    parameters per decoder layer and outside them (embedding, final norm, head), the largest single module,
    and the ZeRO-3 persistent (small) parameters."""

    replica: int
    partition: float
    per_layer: tuple[int, ...]
    outside: int
    largest_module: int
    persistent: int


@functools.lru_cache(maxsize=256)
def rank_params(mcfg: ModelConfig, tp: int = 1, ep: int = 0, zero_group: int = 1,
                persistence_threshold: int = 0) -> RankParams:
    """``RankParams`` of ``mcfg`` under tensor parallelism ``tp`` (the family's plan), expert parallelism
    ``ep`` (AutoEP: a rank holds num_experts / ep of each expert tensor) and a ZeRO group of ``zero_group``
    ranks."""
    plan = family_of(mcfg).tp_plan if tp > 1 else {}
    rules = [(re.compile("^" + plan_regex(p) + "$"), s) for p, s in plan.items()]
    per_layer = [0] * mcfg.num_hidden_layers
    outside = dense = expert = 0
    modules: dict[str, int] = {}
    persistent = 0
    seen_tied = mcfg.tie_word_embeddings
    for name, shape in parameter_shapes(mcfg).items():
        if name == "lm_head.weight" and seen_tied:
            continue  # a tied head is the embedding's tensor
        module = name.rsplit(".", 1)[0]
        style = next((s for rx, s in rules if rx.match(module)), "replicated")
        n = 1
        for s in shape:
            n *= s
        if style in ("column", "row"):
            n //= tp
        is_expert = ".experts." in name
        if is_expert and ep >= 1:
            n //= ep
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            per_layer[int(m.group(1))] += n
        else:
            outside += n
        modules[module] = modules.get(module, 0) + n
        if is_expert:
            expert += n
        else:
            dense += n
        if n <= persistence_threshold:
            persistent += n
    edp = max(1, zero_group // ep) if ep >= 1 else zero_group
    return RankParams(replica=dense + expert, partition=dense / zero_group + expert / edp,
                      per_layer=tuple(per_layer), outside=outside, largest_module=max(modules.values()),
                      persistent=persistent)


def model_states(params: RankParams, precision: str, zero_stage: int, offload: str = "none",
                 sub_group_size: int = DS_ZERO_DEFAULTS["sub_group_size"], hpz: int = 1) -> dict[str, float]:
    """Bytes per GPU of the model states (module docstring): weights, gradients (half precision; fp32 in fp32
    runs), master weights and Adam moments, and the fp32 gradients of the optimizer step."""
    p = param_bytes(precision)
    half = precision != "fp32"
    R, Z = params.replica, params.partition
    opt_on_gpu = offload == "none"
    if zero_stage == 3:
        weights = 0.0 if offload == "optimizer+params" else p * (Z + params.persistent)
        if hpz > 1:
            weights += p * R / hpz
    else:
        weights = p * R
    if zero_stage <= 1:
        grads = p * R
    else:
        grads = p * Z if opt_on_gpu else 0.0
    share = R if zero_stage == 0 else Z
    master = 4 * share if half and opt_on_gpu else 0.0
    moments = 8 * share if opt_on_gpu else 0.0
    if not half or not opt_on_gpu:
        grads32 = 0.0
    elif zero_stage == 3:
        grads32 = 4 * min(Z, sub_group_size)
    else:
        grads32 = 4 * share
    return {"weights": weights, "gradients": grads, "master_weights": master, "adam_moments": moments,
            "gradients_fp32": grads32}


def buffers(params: RankParams, precision: str, zero_stage: int, zero: dict, comm_fp32: bool,
            zero_group: int) -> dict[str, float]:
    """DeepSpeed's communication buffers (module docstring): {"backward": bytes held from backward on,
    "always": bytes held throughout (ZeRO-3 gathers), "step": bytes at the optimizer step}."""
    p = param_bytes(precision)
    z = {**DS_ZERO_DEFAULTS, **zero}
    bucket = float(z["reduce_bucket_size"])
    out = {"backward": 0.0, "always": 0.0, "step": 0.0}
    if zero_stage == 0:
        if zero_group > 1:
            out["step"] = min(ZERO0_ALLREDUCE_ELEMENTS, params.replica) * (4 if comm_fp32 else p)
        return out
    reduce = bucket * p * (OVERLAP_BUCKETS if z["overlap_comm"] else 1.0) + (bucket * 4 if comm_fp32 else 0.0)
    if zero_group <= 1:
        reduce = bucket * p  # one rank: DeepSpeed still fills its bucket, nothing to overlap
    out["backward"] = reduce
    if zero_stage == 3:
        live = min(float(z["stage3_max_live_parameters"]), params.replica)
        gathered = max(live, params.largest_module) + float(z["stage3_prefetch_bucket_size"])
        out["always"] = p * gathered
        out["backward"] += p * params.largest_module  # the largest module's whole gradient before its reduce
    return out


def reserve(peak: float) -> float:
    """The allocator and CUDA-context reserve on top of an allocated peak (module docstring)."""
    return RESERVE_FRACTION * peak + RESERVE_FIXED_GIB * GIB


def breakdown(params: RankParams, acts: Activations, precision: str, layout: PlanLayout, zero: dict,
              comm_fp32: bool, zero_group: int) -> dict:
    """The per-GPU memory of ``layout`` at its peak: {"lines": {name: bytes}, "peak_allocated", "reserve",
    "total", "phase", "phases": {phase: bytes}} (module docstring)."""
    states = model_states(params, precision, layout.zero_stage, layout.offload,
                          int({**DS_ZERO_DEFAULTS, **zero}["sub_group_size"]), layout.hpz)
    buf = buffers(params, precision, layout.zero_stage, zero, comm_fp32, zero_group)
    p = param_bytes(precision)
    every, L = layout.activation_checkpointing, len(acts.kinds)
    optimizer = states["master_weights"] + states["adam_moments"]
    base = states["weights"] + optimizer + buf["always"]
    full_grads = layout.zero_stage <= 1
    # gradients held before this micro-batch's backward: ZeRO-3 always; the others from the second
    # micro-batch of an accumulation on (the last micro-batch's backward is the worst case)
    early = states["gradients"] if layout.zero_stage == 3 or layout.grad_accum > 1 else 0.0

    from_layer = [0] * (L + 1)  # parameters of layer i and those after it
    for i in reversed(range(L)):
        from_layer[i] = from_layer[i + 1] + params.per_layer[i]

    def grads_during(layer: int) -> float:
        """Gradients during ``layer``'s backward: the head's, this layer's and those after it."""
        if early or not states["gradients"]:
            return early
        if not full_grads:
            return states["gradients"]  # ZeRO-2: the partition buffer, filled from the first bucket on
        return p * (params.outside + from_layer[layer])

    phases: dict[str, tuple[float, float, float, float]] = {}  # name -> (total, layers, head, grads)
    held = 0
    # what each layer keeps after its backward stays until its next forward: the later layers' still there
    left_after = acts.left_after(every)
    for i in range(L):
        f = acts.layer(i, every)
        phases[f"forward of layer {i}"] = (base + early + held + f.fwd_peak + left_after[i],
                                           held + f.fwd_peak + left_after[i], 0.0, early)
        held += f.saved
    phases["loss head"] = (base + early + held + acts.head.peak, held, acts.head.peak, early)
    for i in reversed(range(L)):
        f = acts.layer(i, every)
        held -= f.saved
        g = grads_during(i)
        hold = acts.head.bwd_hold
        phases[f"backward of layer {i}"] = (base + buf["backward"] + g + held + f.peak + hold, held + f.peak, hold, g)
        held += f.left  # what a layer keeps after its backward, until its next forward (activations.py)
    step = states["weights"] + optimizer + states["gradients"] + states["gradients_fp32"] + buf["step"] \
        + buf["always"] + held
    phases["optimizer step"] = (step, held, 0.0, states["gradients"])
    phase = max(phases, key=lambda k: phases[k][0])
    total, layers, head, grads = phases[phase]
    at_step = phase == "optimizer step"
    lines = {
        "weights": states["weights"],
        "gradients": grads,
        "optimizer_states": optimizer,
        "gradients_fp32": states["gradients_fp32"] if at_step else 0.0,
        "activations": layers,
        "loss_head": head,
        "buffers": buf["always"] + (buf["step"] if at_step else buf["backward"] if phase.startswith("backward")
                                    else 0.0),
    }
    assert abs(sum(lines.values()) - total) < 1.0, (lines, total)
    r = reserve(total)
    lines["reserve"] = r
    return {"lines": lines, "peak_allocated": total, "reserve": r, "total": total + r, "phase": phase,
            "phases": {k: v[0] for k, v in phases.items()}, "model_states": states, "buffers": buf}


def host_bytes(params: RankParams, precision: str, layout: PlanLayout, gpus_per_node: int) -> float:
    """Host memory per node that offload needs (fp32 masters, moments and gradients; the half-precision
    parameters too with ``optimizer+params``), for ``gpus_per_node`` ranks; 0 without offload."""
    if layout.offload == "none":
        return 0.0
    Z = params.partition
    per_rank = 16 * Z + (param_bytes(precision) * Z if layout.offload == "optimizer+params" else 0.0)
    return per_rank * gpus_per_node

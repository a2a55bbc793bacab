"""The communication model of ``lmforge plan``: which collectives one optimizer step of a layout calls, how many
bytes each moves, over which group, and how long that takes on a cluster.

``collectives(mcfg, layout, world, seq_len, precision)`` lists them as DeepSpeed 0.19.8 and the trainer call
them, derived from the model's parameter shapes (``lmforge.model.parameter_shapes``), the family's
tensor-parallel plan and the DeepSpeed JSON the trainer builds (``trainer/parallel/ds_config.py``: bucket
sizes decide how many calls, never how many bytes). ``comm_time`` prices them with the bus-bandwidth model
and ``exposed`` applies the overlap assumptions. tests/test_plan_comms.py checks the bytes and the calls
against DeepSpeed's own comms logger on real 2- and 4-rank engines.

Bytes: what DeepSpeed's comms logger records
============================================

``Collective.bytes`` is the per-rank message size summed over one optimizer step exactly as
``deepspeed.comm``'s logger counts it (``deepspeed/comm/utils.py: get_msg_size_from_args``): the size of the
tensor passed as ``tensor``, the *input*. So

* ``all_reduce``: the whole tensor;
* ``reduce_scatter_tensor``: the whole (unscattered) input, group × the output;
* ``all_gather_into_tensor``: this rank's *shard* (the input), 1/group of the gathered output;
* ``all_to_all_single``: this rank's whole input.

``Collective.kind`` is the logger's op name. Every rank of a symmetric layout logs the same totals.

What one step calls (DeepSpeed 0.19.8; d = hidden size, B = micro-batch, T = sequence length, A = activation
bytes: 4 in fp32, 2 in bf16/fp16/fp8, whose activations between layers are bf16)
=============================================================================================================

ZeRO partitions over the data-parallel ranks (× the sequence-parallel ranks under Ulysses: the
"sequence-data-parallel" group, the whole world); its group is strided by T under tensor parallelism
(DeepSpeed's (data, tensor) mesh puts tensor parallelism on consecutive ranks: ``trainer/parallel/layout.py``).
Gradients are reduced in ``communication_data_type`` (fp32 for half precision: ``ds_config.py``), and ZeRO-1/2
reduce in fp32 whenever sequence parallelism is on (DeepSpeed's ``allreduce_bucket``); parameters are
gathered in their own dtype.

* **ZeRO-0** (no ZeRO): the engine all-reduces all gradients once per optimizer step, after the last
  micro-batch, in buckets of 5e8 elements (``MEMORY_OPT_ALLREDUCE_SIZE``).
* **ZeRO-1**: one gradient all-reduce per optimizer step, at the last micro-batch (micro-batches before it
  accumulate locally: ``reduce_ready_partitions_and_remove_grads`` reduces only at the boundary).
  DeepSpeed 0.19.8 reduces with ``all_reduce`` of each bucket (``use_multi_rank_bucket_allreduce``, on by
  default), not ``reduce_scatter``: twice a reduce-scatter's traffic. Then one ``all_gather_into_tensor``
  per optimizer param group of the updated partitions (the flat group padded to a multiple of 2 × group).
* **ZeRO-2**: as ZeRO-1, but the gradient all-reduce runs in *every micro-batch's* backward (checked:
  ``partition_gradients`` reduces from the gradient hooks into the partitioned gradients; 2 × the bytes
  at grad_accum = 2).
* **ZeRO-3**: per micro-batch, one ``reduce_scatter_tensor`` per gradient bucket (each gradient padded to a
  multiple of the group) and the parameter all-gathers of forward and backward; per optimizer step one
  all-gather per *persistent* parameter (at most ``stage3_param_persistence_threshold`` elements, 10·d here:
  the norms), which are refreshed after the update and never gathered otherwise. The gathers are replayed
  from DeepSpeed's ``PartitionedParameterCoordinator`` (``_zero3_gathers``) on the module trace of one
  forward and backward, built from the model's call tree (``_module_tree``: every module is fetched before
  its children and released after them; backward visits the modules whose output needs a gradient with
  their children reversed): a fetch gathers the module's non-resident parameters in one call and then
  prefetches along the trace's parameter queue, skipping resident ones, until
  ``stage3_prefetch_bucket_size`` elements are in flight (at most ``stage3_max_live_parameters``
  resident); a release frees the module's parameters unless the queue has already passed a later use of
  them or they recur within ``stage3_max_reuse_distance`` elements of parameters along the trace. So a
  model far below 1e9 elements gathers each matrix once per micro-batch, and a 7B model re-gathers in
  backward all but its last layers. Exact (bytes and calls) against DeepSpeed's logger on the ``debug``
  preset across reuse distances, live limits, prefetch buckets, gradient accumulation and activation
  checkpointing (tests/test_plan_comms.py). The trace is that of the model without checkpointing: under
  checkpointing the recomputation's gathers replace the backward's (measured: the same bytes and calls).
* **hpZ** (ZeRO++ ``zero_hpz_partition_size`` = h): a parameter's first gather in an optimizer step reads
  the primary partitions (the ZeRO group) and leaves a secondary copy partitioned over h consecutive
  ranks; every later gather of it in the step (a tied head, backward, later micro-batches) reads the
  secondary copy (1/h of the parameter per rank, within a node).
* **Tensor parallelism** (AutoTP, T): per micro-batch and layer, forward all-reduces the output of each
  row-parallel linear (o_proj, down_proj: B·T·d·A), backward all-reduces the input gradient of each
  column-parallel linear (q, k, v, gate, up: B·T·d·A each). A checkpointed layer repeats o_proj's in
  backward, not down_proj's: PyTorch's non-reentrant checkpoint stops recomputing once it has the last
  tensor backward saved (down_proj's input), before that layer's final all-reduce (measured). Qwen3's q/k
  norms (``replicated_with_grad_allreduce``) all-reduce their gradients per micro-batch.
* **Ulysses** (S): per micro-batch and layer, four ``all_to_all_single`` forward (q, k, v, attention
  output: B·T/S·heads·head_dim·A each; k/v carry the query heads when S does not divide the kv heads) and
  four backward; a checkpointed layer repeats the forward four.
* **Expert parallelism** (AutoEP, E ranks): per MoE layer and micro-batch, an ``all_to_all_single`` of the
  per-expert token counts (int32) and the token dispatch and combine, forward and backward (B·T·k·d·A
  each: exact for what a rank sends, B·T·k rows; what it receives, in the combine and the dispatch's
  backward, varies with the routing, so the prediction is the ranks' mean). Expert gradients are reduced
  over the expert-data-parallel group (ZeRO group / E). ZeRO-1/2 share one gradient bucket between dense
  and expert gradients and all-reduce each bucket once per process group; ZeRO-3 closes a bucket when the
  next gradient belongs to another group. A checkpointed MoE layer repeats the counts, dispatch and
  combine of its forward in backward. AutoEP creates its routers after the optimizer groups exist:
  ZeRO-1/2 append them to the decay group, ZeRO-3 keeps them in a group (and a bucket) of their own.
* **Scalars**: ZeRO's gradient norm (one all-reduce per optimizer group, 4 bytes, 8 at ZeRO-3, plus the
  same over the TP group; with AutoEP one more for the experts' average, or at ZeRO-3 over the
  expert-parallel group), the overflow flag (1 byte: ZeRO-1/2 in bf16/fp16, ZeRO-3 in fp16), and ZeRO-0's
  clip norm (the trainer's ``keep_zero0_grad_norm``). Latency only.

Excluded: start-up (DeepSpeed's broadcast of the initial weights, ZeRO-3's trace checks in its first
steps), checkpointing, evaluation, and the trainer's own per-step scalars (``StepSums``: one small
``torch.distributed`` all-reduce per step that DeepSpeed's logger does not see). Groups of one rank (data
parallel 1 under TP 2) are listed because DeepSpeed calls and logs them; they take no time. Offload moves
data over PCIe, not the network: not a collective here. ZeRO++ qwZ/qgZ (quantized) are not modelled.

Time: the bus-bandwidth model
=============================

``comm_time``: a ring collective over n ranks moves, per rank, 2(n-1)/n × the tensor for ``all_reduce``,
(n-1)/n × the tensor for ``reduce_scatter``/``all_gather`` (the *gathered* size: n × the logged shard)
and (n-1)/n × the input for ``all_to_all`` (nccl-tests' "bus bandwidth"). That volume divides by the
per-GPU bandwidth of the slowest link the group crosses: ``GpuSpec.intra_gbps`` when every member is on one
node, ``GpuSpec.inter_gbps`` when it spans nodes (a ring that leaves the node runs at the NIC's rate, also
for a "mixed" group with several ranks per node). Each call adds a fixed latency: ``LATENCY_INTRA_S`` or
``LATENCY_INTER_S``. Groups: tensor- and sequence-parallel and hpZ groups are consecutive ranks, ZeRO's is
strided by T, expert-parallel groups consecutive, expert-data-parallel strided by E; nodes hold
``Cluster.gpus_per_node`` consecutive ranks.

Overlap: what ``exposed`` assumes
=================================

* TP all-reduces, Ulysses and expert all-to-alls sit on the critical path: fully exposed.
* ZeRO-1/2 gradient all-reduces, with ``overlap_comm`` (on for CUDA in the trainer's config), run on a
  side stream during backward: all but the last bucket of each reduction hide behind backward compute.
  Without ``overlap_comm`` (CPU) they are exposed. (ZeRO-1 reduces in the last micro-batch's backward
  only; ``exposed`` bounds what hides by the whole step's backward, optimistic at grad_accum > 1.)
* ZeRO-3 gathers are prefetched (``stage3_prefetch_bucket_size``): all but the first gather of each pass
  hide behind that pass's compute; its reduce-scatters hide behind backward except the last bucket.
* ZeRO-0's all-reduce, ZeRO-1/2's parameter all-gather after the step, ZeRO-3's persistent-parameter
  gather and all scalars are exposed.
* Hidden communication is bounded by the compute it hides behind: given the per-step forward and backward
  compute seconds, what exceeds them is exposed too.
"""

from __future__ import annotations

import collections
import functools
import math
import re
from dataclasses import dataclass, field

from lmforge.model import ModelConfig, family_of, parameter_shapes
from lmforge.model.registry import plan_regex

from .layout import Cluster, PlanLayout

LATENCY_INTRA_S = 10e-6  # per call within a node (NVLink/NVSwitch ring start-up, kernel launch)
LATENCY_INTER_S = 30e-6  # per call across nodes (InfiniBand/RoCE)

# DeepSpeed 0.19.8's defaults for the keys lmforge's config leaves unset (DeepSpeedZeroConfig;
# tests/test_plan_comms.py checks them against the installed DeepSpeed).
DS_ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "use_multi_rank_bucket_allreduce": True,
    "overlap_comm": False,
}
ZERO0_BUCKET = 500_000_000  # deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE, ZeRO-0's all-reduce bucket
ZERO12_ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor: a ZeRO-1/2 flat group pads to 2 × group

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}

# Bus bytes per logged byte for a group of n (module docstring).
_RING = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter_tensor": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather_into_tensor": lambda n: float(n - 1),  # the logger counts the shard: (n-1)/n × n shards
    "all_gather": lambda n: float(n - 1),
    "all_to_all_single": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
}


@dataclass(frozen=True)
class Collective:
    """One kind of call a training step makes, summed over the step.

    kind: DeepSpeed's comms-logger op name. what: what it is for. bytes: per rank per optimizer step, as the
    logger counts them (module docstring). count: calls per optimizer step. group: ranks in its process
    group; stride: rank distance between group members. scope: "intra", "inter" or "mixed" (members on one
    node, each on its own node, several per node on several nodes) for the ``gpus_per_node`` the list was
    made for. phase: "forward", "backward" or "step" (after backward, around the optimizer step). overlap:
    "none" (on the critical path), "bucketed" (hidden behind its phase's compute but the last call of each
    pass), "prefetched" (hidden but the first call of each pass). passes: how many times per optimizer step
    its sequence of calls runs (micro-batches)."""

    kind: str
    what: str
    bytes: int
    count: int
    group: int
    scope: str = "intra"
    phase: str = "step"
    overlap: str = "none"
    passes: int = 1
    stride: int = 1

    def bus_bytes(self) -> float:
        """Bytes each rank sends over its links in one step (ring algorithms: module docstring)."""
        if self.group <= 1:
            return 0.0
        return _RING.get(self.kind, lambda n: 1.0)(self.group) * self.bytes


def group_scope(size: int, stride: int, gpus_per_node: int) -> str:
    """Where a group of ``size`` ranks ``stride`` apart lies on nodes of ``gpus_per_node`` consecutive ranks
    (groups aligned to node boundaries, as DeepSpeed's are when gpus_per_node is a multiple of the inner
    group sizes)."""
    if size <= 1 or (size - 1) * stride + 1 <= gpus_per_node:
        return "intra"
    return "inter" if stride >= gpus_per_node else "mixed"


# --------------------------------------------------------------------------------------------------
# The model as DeepSpeed sees it on one rank


@dataclass(frozen=True)
class _Param:
    name: str
    numel: int  # on this rank before ZeRO: after AutoTP's and AutoEP's split
    ndim: int
    expert: bool = False
    router: bool = False  # AutoEP's router: ZeRO groups it apart (module docstring, "Expert parallelism")


@dataclass
class _Module:
    """A module as DeepSpeed's hooks see it: its own (not its children's) parameters and its children in the
    order its forward calls them. ``backward``: whether its output needs a gradient (hooks fire in backward)."""

    name: str
    params: list[_Param] = field(default_factory=list)
    children: list[_Module] = field(default_factory=list)
    backward: bool = True


# Call order of the children of each module the families share (model/common/*.py, qwen3_moe/model.py);
# children not listed keep their registration order, after the listed ones.
_CALL_ORDER = {
    "": ("model", "lm_head"),
    "model": ("embed_tokens", "rotary_emb", "layers", "norm"),
    "layer": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "self_attn": ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "o_proj"),
    "mlp": ("gate", "router", "experts", "gate_proj", "up_proj", "down_proj"),
}
_FORWARD_ONLY = ("rotary_emb",)  # outputs (cos, sin) need no gradient: no backward hooks
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@functools.lru_cache(maxsize=32)
def _module_names(mcfg: ModelConfig) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(module name, its children's names) in registration order, containers (``nn.ModuleList``, which is
    never called) replaced by their children; built on the meta device."""
    import torch
    from torch import nn

    from lmforge.model import build_model

    with torch.device("meta"):
        model = build_model(mcfg)

    def kids(module: nn.Module, prefix: str) -> list[str]:
        out = []
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            out += kids(child, full) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [full]
        return out

    return tuple((name, tuple(kids(m, name))) for name, m in model.named_modules()
                 if not isinstance(m, (nn.ModuleList, nn.ModuleDict)))


def _module_tree(mcfg: ModelConfig, params: list[_Param]) -> _Module:
    """The model's call tree with this rank's parameters on their modules (a tied head holds the embedding's)."""
    own: dict[str, list[_Param]] = {}
    for p in params:
        own.setdefault(p.name.rsplit(".", 1)[0], []).append(p)
    if mcfg.tie_word_embeddings:
        own["lm_head"] = [p for p in params if p.name == "model.embed_tokens.weight"]
    names = dict(_module_names(mcfg))

    def build(name: str) -> _Module:
        kind = "layer" if re.fullmatch(r"model\.layers\.\d+", name) else name.rsplit(".", 1)[-1]
        order = _CALL_ORDER.get(kind, ())

        def rank(child: str) -> int:  # a ModuleList's items (``model.layers.3``) sort as the list
            parts = child.split(".")
            last = parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
            return order.index(last) if last in order else len(order)

        children = sorted(names.get(name, ()), key=rank)
        return _Module(name, own.get(name, []), [build(c) for c in children],
                       backward=name.rsplit(".", 1)[-1] not in _FORWARD_ONLY)

    return build("")


def _trace(root: _Module) -> tuple[list[tuple[str, int]], list[_Module], int]:
    """One forward and backward as DeepSpeed's ZeRO-3 hooks see them: events ("fetch", position) and
    ("release", position) in order, the modules by fetch position, and the first backward position. Forward
    fetches a module before its children and releases it after them; backward visits the modules that
    need gradients in the same way with the children reversed (tests/test_plan_comms.py checks the result
    against DeepSpeed's logged gathers)."""
    events, order = [], []

    def visit(m: _Module, reverse: bool) -> None:
        if reverse and not m.backward:
            return
        pos = len(order)
        order.append(m)
        events.append(("fetch", pos))
        for c in (reversed(m.children) if reverse else m.children):
            visit(c, reverse)
        events.append(("release", pos))

    visit(root, False)
    first_backward = len(order)
    visit(root, True)
    return events, order, first_backward


def _style(module: str, plan: dict[str, str]) -> str:
    for pattern, style in plan.items():
        if re.fullmatch(plan_regex(pattern), module):
            return style
    return "replicated"


def _local_params(mcfg: ModelConfig, tp: int, ep: int) -> tuple[list[_Param], dict[str, str]]:
    """This rank's parameters in registration order (a tied head once, under the embedding's name) and each
    module's tensor-parallel style."""
    plan = family_of(mcfg).tp_plan if tp > 1 else {}
    out, styles = [], {}
    for name, shape in parameter_shapes(mcfg).items():
        if name == "lm_head.weight" and mcfg.tie_word_embeddings:
            continue
        shape = list(shape)
        module = name.rsplit(".", 1)[0]
        style = styles.setdefault(module, _style(module, plan))
        if style == "column":
            shape[0] //= tp
        elif style == "row":
            shape[1] //= tp
        expert = ".experts." in name and ep >= 1  # AutoEP's experts: their own groups (module docstring)
        if expert:
            shape[0] //= ep  # AutoEP: num_experts / E whole experts per rank
        if expert and name.endswith("gate_up_proj"):  # AutoEP's w1 (gate) and w3 (up)
            half = [shape[0], shape[1] // 2, shape[2]]
            out += [_Param(name[:-len("gate_up_proj")] + w, math.prod(half), 3, True) for w in ("w1", "w3")]
            continue
        router = ep >= 1 and name.endswith(".mlp.gate.weight") and getattr(mcfg, "num_experts", 0) > 0
        out.append(_Param(name, math.prod(shape), len(shape), expert, router))
    return out, styles


# --------------------------------------------------------------------------------------------------
# DeepSpeed's buckets


def _flushes(order: list[_Param], bucket: int, group=None) -> list[list[_Param]]:
    """The gradient buckets DeepSpeed's ZeRO reduces, in order: a bucket is reduced when the next gradient
    would overflow it (or, with ``group``, belongs to another process group); a gradient larger than the
    bucket is reduced alone."""
    out, cur, elements = [], [], 0
    for p in order:
        if elements > 0 and (elements + p.numel > bucket or (group is not None and group(p) != group(cur[0]))):
            out.append(cur)
            cur, elements = [], 0
        cur.append(p)
        elements += p.numel
    if cur:
        out.append(cur)
    return out


def _zero12_slices(groups: list[list[_Param]], n: int) -> dict[str, list[int]]:
    """Each parameter's pieces in the partitions of its flat ZeRO-1/2 group (sizes, in offset order)."""
    out = {}
    for group in groups:
        total = sum(p.numel for p in group)
        part = math.ceil(total / (ZERO12_ALIGNMENT * n)) * ZERO12_ALIGNMENT * n // n
        offset = 0
        for p in group:
            cuts, start, end = [], offset, offset + p.numel
            while start < end:
                stop = min(end, (start // part + 1) * part)
                cuts.append(stop - start)
                start = stop
            out[p.name] = cuts
            offset = end
    return out


def _zero12_calls(flushes: list[list[_Param]], slices: dict[str, list[int]], bucket: int) -> list[int]:
    """Elements of each all-reduce DeepSpeed's ``allreduce_and_scatter`` makes of the buckets: a bucket's
    partition slices are all-reduced together, split where the running size passes the bucket size."""
    calls = []
    for flush in flushes:
        numel = 0
        for p in flush:
            for piece in slices[p.name]:
                numel += piece
                if numel > bucket:
                    calls.append(numel)
                    numel = 0
        if numel:
            calls.append(numel)
    return calls


def _zero3_gathers(root: _Module, partitioned: set[str], zero: dict) -> list[tuple[str, list[_Param]]]:
    """The all-gathers of one ZeRO-3 forward and backward, as (phase, parameters gathered in one call), by
    replaying DeepSpeed 0.19.8's ``PartitionedParameterCoordinator`` on the module trace once it is recorded:
    a module's fetch gathers its parameters that are not resident, then prefetches along the trace's
    parameter queue (skipping resident ones) until ``stage3_prefetch_bucket_size`` elements are in flight
    (and at most ``stage3_max_live_parameters`` resident); a release frees the module's parameters unless
    the queue has already passed a later use of them or they recur within ``stage3_max_reuse_distance``
    elements of parameters along the trace."""
    events, order, first_backward = _trace(root)
    bucket = int(zero["stage3_prefetch_bucket_size"])
    max_live = int(zero["stage3_max_live_parameters"])
    max_reuse = int(zero["stage3_max_reuse_distance"])
    before = [0]  # before[j]: parameter elements of the modules at positions < j
    where: dict[str, list[int]] = {}
    for pos, m in enumerate(order):
        before.append(before[-1] + sum(p.numel for p in m.params))
        for p in m.params:
            where.setdefault(p.name, []).append(pos)
    queue = collections.deque((p, pos) for pos, m in enumerate(order) for p in m.params)
    last_fetched: dict[str, int] = collections.defaultdict(lambda: -10**10)
    resident: set[str] = set()
    live, step, calls = 0, 0, []
    for what, pos in events:
        m = order[pos]
        phase = "forward" if pos < first_backward else "backward"
        if what == "fetch":
            need = [p for p in m.params if p.name in partitioned and p.name not in resident]
            if need:
                calls.append((phase, need))
                resident.update(p.name for p in need)
                live += sum(p.numel for p in need)
            due = {p.name for p in m.params if last_fetched[p.name] < step}
            popped: set[str] = set()
            while queue and len(popped) < len(due):
                p, at = queue.popleft()
                last_fetched[p.name] = at
                popped.add(p.name)
            if bucket > 0:
                limit, numel, prefetch = min(max_live - live, bucket), 0, []
                while queue and numel < limit:
                    p, at = queue.popleft()
                    last_fetched[p.name] = max(last_fetched[p.name], at)
                    if p.name in partitioned and p.name not in resident and p not in prefetch:
                        prefetch.append(p)
                        numel += p.numel
                if prefetch:
                    calls.append((phase, prefetch))
                    resident.update(p.name for p in prefetch)
                    live += numel
            step += 1
        else:
            for p in m.params:
                if p.name not in partitioned or p.name not in resident or last_fetched[p.name] > step:
                    continue
                later = [j for j in where[p.name] if j >= step]
                if later and before[later[0]] - before[step] < max_reuse:
                    continue  # used again within the reuse distance
                resident.discard(p.name)
                live -= p.numel
    return calls


# --------------------------------------------------------------------------------------------------
# The plan


def plan_ds_config(mcfg: ModelConfig, layout: PlanLayout, world: int, precision: str, cuda: bool = True) -> dict:
    """The DeepSpeed JSON the trainer would build for this layout (``build_ds_config``), for a CUDA cluster
    (``overlap_comm`` on) unless ``cuda`` is False."""
    from ..config import RunConfig
    from ..parallel.ds_config import build_ds_config

    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.precision = \
        layout.micro_batch, layout.grad_accum, precision
    p = cfg.parallel
    p.zero_stage, p.tensor_parallel, p.sequence_parallel = layout.zero_stage, layout.tp, layout.sp
    p.expert_parallel, p.zero_hpz_partition_size = layout.ep, layout.hpz
    p.activation_checkpointing, p.offload = layout.activation_checkpointing, layout.offload
    ds = build_ds_config(cfg, layout.dp(world), precision, mcfg)
    if layout.zero_stage >= 1:
        ds["zero_optimization"]["overlap_comm"] = cuda
    return ds


def collectives(mcfg: ModelConfig, layout: PlanLayout, world: int, seq_len: int, precision: str, *,
                ds_config: dict | None = None, gpus_per_node: int | None = None) -> list[Collective]:
    """The collectives of one optimizer step of ``layout`` on ``world`` ranks (module docstring).

    ``precision``: fp32, bf16, fp16 or fp8 (resolved: not "auto"). ``ds_config``: the run's DeepSpeed JSON
    (default: ``plan_ds_config``, the trainer's for a CUDA cluster). ``gpus_per_node``: for each collective's
    scope (default: all ranks on one node)."""
    if precision not in _BYTES:
        raise ValueError(f"precision {precision!r}: expected one of {sorted(_BYTES)} (resolve 'auto' first)")
    tp, sp, ep, zs = layout.tp, layout.sp, layout.ep, layout.zero_stage
    if world % (tp * sp):
        raise ValueError(f"world {world} is not divisible by tp {tp} × sp {sp}")
    ds = ds_config if ds_config is not None else plan_ds_config(mcfg, layout, world, precision)
    zero = {**DS_ZERO_DEFAULTS, **ds.get("zero_optimization", {})}
    gpn = gpus_per_node or world
    ga, B = layout.grad_accum, layout.micro_batch
    pb = _BYTES[precision]  # parameters (bit16 copies in half precision) and activations
    half = precision != "fp32"
    comm_fp32 = ds.get("communication_data_type") == "fp32"
    gb = 4 if comm_fp32 or not half else pb  # gradients as ZeRO reduces them
    d, L = mcfg.hidden_size, mcfg.num_hidden_layers

    zn = layout.dp(world) * sp  # ZeRO's group: data- × sequence-parallel ranks
    zstride = tp
    ep_size = ep if ep > 1 else 1
    en = max(1, zn // ep_size)  # expert-data-parallel group
    params, styles = _local_params(mcfg, tp, ep)
    root = _module_tree(mcfg, params)
    _, trace, first_backward = _trace(root)
    dense = [p for p in params if not p.expert]
    experts = [p for p in params if p.expert]
    out: list[Collective] = []

    def add(kind, what, nbytes, count, group, stride=1, **kw):
        if count > 0:
            out.append(Collective(kind, what, int(nbytes), int(count), group, group_scope(group, stride, gpn),
                                  stride=stride, **kw))

    # ---- data parallelism: gradients and parameters
    bucket = int(zero["reduce_bucket_size"])
    last = {p.name: i for i, p in enumerate(p for m in trace[first_backward:] for p in m.params)}
    backward = sorted({p.name: p for p in params}.values(), key=lambda p: last[p.name])  # as gradients come
    threshold = int(zero["stage3_param_persistence_threshold"])
    subsets = [(s_, n, stride, tag) for s_, n, stride, tag in
               ((dense, zn, zstride, ""), (experts, en, zstride * ep_size, " (experts)")) if s_]
    # optimizer param groups (engine.param_groups: decay >= 2-D, no decay 1-D; AutoEP's experts their own,
    # its routers, created after the groups were formed, last in the decay group (ZeRO-1/2) or their own (ZeRO-3))
    routers = [p for p in dense if p.router]
    decay = [p for p in dense if p.ndim >= 2 and not p.router]
    opt_groups = [g for g in ([*decay, *routers], [p for p in dense if p.ndim < 2], experts) if g] if zs < 3 else \
        [g for g in (decay, routers, [p for p in dense if p.ndim < 2], experts) if g]
    reduce_calls: dict[bool, list[int]] = {False: [], True: []}  # expert? -> elements of each call
    if zs in (1, 2):
        # One gradient bucket for all; each bucket is all-reduced per process group in pieces
        # (allreduce_and_scatter), the pieces split at the partition boundaries of each param group.
        slices = {**_zero12_slices([g for g in opt_groups if g is not experts], zn),
                  **(_zero12_slices([experts], en) if experts else {})}
        order = [p for g in opt_groups for p in g] if zs == 1 and not zero["overlap_comm"] else backward
        for flush in _flushes(order, bucket):
            for expert in (False, True):
                reduce_calls[expert] += _zero12_calls([[p for p in flush if p.expert == expert]], slices, bucket)
    elif zs == 3:
        # a bucket is reduced when full or when the next gradient belongs to another process group
        for flush in _flushes(backward, bucket, group=lambda p: (p.expert, p.router)):
            n = en if flush[0].expert else zn
            reduce_calls[flush[0].expert].append(sum(math.ceil(p.numel / n) * n for p in flush))
    z3_calls = _zero3_gathers(root, {p.name for p in params if p.numel > threshold}, zero) \
        if zs == 3 and zn > 1 else []
    for subset, n, stride, tag in subsets:
        names = {p.name for p in subset}
        calls = reduce_calls[subset is experts]
        if zs == 0:
            calls, numel = [], 0
            for p in subset:
                numel += p.numel
                if numel > ZERO0_BUCKET:
                    calls.append(numel)
                    numel = 0
            calls += [numel] if numel else []
            add("all_reduce", f"ZeRO-0 gradient all-reduce{tag}", sum(calls) * gb, len(calls), n, stride)
        elif zs in (1, 2):
            cb = 4 if sp > 1 else gb
            reductions = ga if zs == 2 else 1
            kind = "all_reduce" if zero["use_multi_rank_bucket_allreduce"] else "reduce"
            add(kind, f"ZeRO-{zs} gradient reduction{tag}", sum(calls) * cb * reductions, len(calls) * reductions,
                n, stride, phase="backward", overlap="bucketed", passes=reductions)
            if n > 1:
                parts = [math.ceil(sum(p.numel for p in g) / (ZERO12_ALIGNMENT * n)) * ZERO12_ALIGNMENT
                         for g in opt_groups if (g is experts) == (subset is experts)]
                add("all_gather_into_tensor", f"ZeRO-{zs} parameter all-gather after the step{tag}",
                    sum(parts) * pb, len(parts), n, stride)
        else:  # ZeRO-3
            persistent = [p for p in subset if p.numel <= threshold]
            add("reduce_scatter_tensor", f"ZeRO-3 gradient reduce-scatter{tag}", sum(calls) * gb * ga,
                len(calls) * ga, n, stride, phase="backward", overlap="bucketed", passes=ga)
            if n > 1:
                mine = [(phase, [p for p in ps if p.name in names]) for phase, ps in z3_calls]
                fwd = [ps for phase, ps in mine if ps and phase == "forward"]
                bwd = [ps for phase, ps in mine if ps and phase == "backward"]

                def shards(calls: list[list[_Param]], k: int) -> int:
                    return sum(math.ceil(p.numel / k) for ps in calls for p in ps) * pb

                h = layout.hpz if layout.hpz > 1 else 0
                if h:  # hpZ: a parameter's first gather of the step from the primary partitions, the rest from
                    # the secondary copy over h ranks (a call mixing both is split in two, as DeepSpeed does)
                    seen: set[str] = set()
                    primary, secondary = [], {"forward": [], "backward": []}
                    for _ in range(ga):
                        for phase, ps in mine:
                            first = [p for p in ps if p.name not in seen]
                            again = [p for p in ps if p.name in seen]
                            seen.update(p.name for p in first)
                            primary += [first] if first else []
                            secondary[phase] += [again] if again else []
                    add("all_gather_into_tensor", f"ZeRO-3 parameter all-gather, first use in the step{tag}",
                        shards(primary, n), len(primary), n, stride, phase="forward", overlap="prefetched")
                    for phase, calls in secondary.items():
                        add("all_gather_into_tensor", f"ZeRO-3 hpZ secondary all-gather, {phase}{tag}",
                            shards(calls, h), len(calls), h, 1, phase=phase, overlap="prefetched", passes=ga)
                else:
                    add("all_gather_into_tensor", f"ZeRO-3 parameter all-gather, forward{tag}", shards(fwd, n) * ga,
                        len(fwd) * ga, n, stride, phase="forward", overlap="prefetched", passes=ga)
                    add("all_gather_into_tensor", f"ZeRO-3 parameter all-gather, backward{tag}", shards(bwd, n) * ga,
                        len(bwd) * ga, n, stride, phase="backward", overlap="prefetched", passes=ga)
                add("all_gather_into_tensor", f"ZeRO-3 persistent-parameter refresh after the step{tag}",
                    sum(math.ceil(p.numel / n) for p in persistent) * pb, len(persistent), n, stride)

    # ---- scalars (latency only)
    mp = tp if tp > 1 else 0  # ZeRO's model-parallel group is the TP group; Ulysses' reduces none at ZeRO 1-3
    if zs == 0:
        if precision in ("bf16", "fp8"):  # DeepSpeed's BF16_Optimizer: overflow flag and gradient norm
            add("all_reduce", "overflow flag", 1, 1, zn, zstride)
        if float(ds.get("gradient_clipping", 0) or 0) > 0 or precision in ("bf16", "fp8"):
            add("all_reduce", "gradient-norm scalar", 4, 1, zn, zstride)
            if tp > 1 or sp > 1:
                add("all_reduce", "gradient-norm scalar (model-parallel group)", 4, 1, tp * sp)
    else:  # one norm per optimizer group (ZeRO-3: fp64), over the group's ZeRO ranks
        nb = 8 if zs == 3 else 4
        n_dense = sum(1 for g in opt_groups if g is not experts)
        add("all_reduce", "gradient-norm scalars", nb * n_dense, n_dense, zn, zstride)
        if experts:
            add("all_reduce", "gradient-norm scalar (experts)", nb, 1, en, zstride * ep_size)
            if zs < 3:  # _average_expert_grad_norms
                add("all_reduce", "expert gradient-norm average", 4, 1, en, zstride * ep_size)
            elif ep_size > 1:  # and over the expert-parallel group
                add("all_reduce", "gradient-norm scalar (expert-parallel group)", 8, 1, ep_size)
        if mp:
            add("all_reduce", "gradient-norm scalars (TP group)", nb * len(opt_groups), len(opt_groups), tp)
        if precision == "fp16" or (zs in (1, 2) and half):
            add("all_reduce", "overflow flag", 1, 1, zn, zstride)
            if mp:
                add("all_reduce", "overflow flag (TP group)", 1, 1, tp)

    # ---- tensor parallelism (AutoTP)
    recomputed = len(range(0, L, layout.activation_checkpointing)) if layout.activation_checkpointing else 0
    if tp > 1:
        act = B * seq_len * d * pb
        rows = sum(1 for m, s in styles.items() if s == "row" and _LAYER.match(m))
        cols = [m for m, s in styles.items() if s == "column" and _LAYER.match(m)]
        col_in = sum(B * seq_len * d * pb for _ in cols)  # every column-parallel linear reads the hidden state
        add("all_reduce", "TP all-reduce of row-parallel outputs (o_proj, down_proj), forward",
            act * rows * ga, rows * ga, tp, phase="forward")
        if recomputed:  # torch's checkpoint stops recomputing after the last saved tensor: before down_proj's
            per_layer = rows // L - 1
            add("all_reduce", "TP all-reduce of row-parallel outputs (o_proj), recomputed in backward",
                act * per_layer * recomputed * ga, per_layer * recomputed * ga, tp, phase="backward")
        add("all_reduce", "TP all-reduce of column-parallel input gradients (q, k, v, gate, up), backward",
            col_in * ga, len(cols) * ga, tp, phase="backward")
        synced = [p for p in params if styles.get(p.name.rsplit(".", 1)[0]) == "replicated_with_grad_allreduce"]
        add("all_reduce", "TP gradient all-reduce of replicated weights on sharded activations (q/k norms)",
            sum(p.numel for p in synced) * pb * ga, len(synced) * ga, tp, phase="backward")

    # ---- Ulysses sequence parallelism
    if sp > 1:
        H, K = mcfg.num_attention_heads, mcfg.num_key_value_heads
        hd = getattr(mcfg, "head_dim", None) or d // H
        kv = K if K % sp == 0 else H
        tok = B * (seq_len // sp) * hd * pb
        per_layer = (2 * H + 2 * kv) * tok  # q, k, v in and the attention output back
        add("all_to_all_single", "Ulysses all-to-all (q, k, v, output), forward", per_layer * L * ga, 4 * L * ga, sp,
            phase="forward")
        add("all_to_all_single", "Ulysses all-to-all (q, k, v, output), backward", per_layer * L * ga, 4 * L * ga, sp,
            phase="backward")
        if recomputed:
            add("all_to_all_single", "Ulysses all-to-all, recomputed in backward", per_layer * recomputed * ga,
                4 * recomputed * ga, sp, phase="backward")

    # ---- expert parallelism (AutoEP)
    if ep > 1 and getattr(mcfg, "num_experts", 0):
        first_dense = set(getattr(mcfg, "mlp_only_layers", ()) or ())
        step = getattr(mcfg, "decoder_sparse_step", 1) or 1
        moe_layers = sum(1 for i in range(L) if i not in first_dense and (i + 1) % step == 0)
        rows = B * seq_len // sp * mcfg.num_experts_per_tok * d * pb
        counts = 4 * mcfg.num_experts
        add("all_to_all_single", "expert token counts", counts * moe_layers * ga, moe_layers * ga, ep, phase="forward")
        add("all_to_all_single", "expert dispatch and combine, forward", 2 * rows * moe_layers * ga,
            2 * moe_layers * ga, ep, phase="forward")
        add("all_to_all_single", "expert dispatch and combine, backward", 2 * rows * moe_layers * ga,
            2 * moe_layers * ga, ep, phase="backward")
        if recomputed:
            add("all_to_all_single", "expert all-to-alls recomputed in backward",
                (2 * rows + counts) * min(recomputed, moe_layers) * ga, 3 * min(recomputed, moe_layers) * ga, ep,
                phase="backward")
    return out


def by_kind(cols: list[Collective]) -> dict[str, dict[str, int]]:
    """{kind: {"bytes": ..., "count": ...}} summed per logger op name: what tests compare with the logger."""
    out: dict[str, dict[str, int]] = {}
    for c in cols:
        e = out.setdefault(c.kind, {"bytes": 0, "count": 0})
        e["bytes"] += c.bytes
        e["count"] += c.count
    return out


# --------------------------------------------------------------------------------------------------
# Time


def collective_seconds(c: Collective, cluster: Cluster) -> float:
    """Seconds per optimizer step of one collective on ``cluster`` (bus-bandwidth model, module docstring)."""
    if c.group <= 1:
        return 0.0
    scope = group_scope(c.group, c.stride, cluster.gpus_per_node)
    intra = scope == "intra"
    gbps = cluster.gpu.intra_gbps if intra else cluster.gpu.inter_gbps
    return c.bus_bytes() / (gbps * 1e9) + c.count * (LATENCY_INTRA_S if intra else LATENCY_INTER_S)


def comm_time(cols: list[Collective], cluster: Cluster) -> dict:
    """Seconds per optimizer step: ``{"collectives": [{what, kind, scope, bytes, bus_bytes, count, seconds}],
    "total_s": ..., "intra_s": ..., "inter_s": ...}`` (all communication, before overlap: ``exposed``)."""
    rows, totals = [], {"intra": 0.0, "inter": 0.0}
    for c in cols:
        s = collective_seconds(c, cluster)
        scope = group_scope(c.group, c.stride, cluster.gpus_per_node)
        totals["intra" if scope == "intra" else "inter"] += s
        rows.append({"what": c.what, "kind": c.kind, "scope": scope, "group": c.group, "bytes": c.bytes,
                     "bus_bytes": c.bus_bytes(), "count": c.count, "seconds": s})
    return {"collectives": rows, "total_s": totals["intra"] + totals["inter"], "intra_s": totals["intra"],
            "inter_s": totals["inter"]}


def exposed(cols: list[Collective], cluster: Cluster, *, overlap_comm: bool = True,
            forward_s: float | None = None, backward_s: float | None = None) -> dict:
    """The communication seconds per optimizer step that compute does not hide (module docstring, "Overlap").

    ``overlap_comm``: DeepSpeed's side-stream reductions and prefetch (the trainer's CUDA default).
    ``forward_s`` / ``backward_s``: compute seconds per optimizer step of each pass (all micro-batches); when
    given, hidden communication beyond them is exposed as well. Returns ``{"collectives": [{what, seconds,
    exposed_s}], "exposed_s": ..., "hidden_s": ...}``."""
    rows = []
    hideable = {"forward": 0.0, "backward": 0.0}
    fixed = 0.0
    for c in cols:
        s = collective_seconds(c, cluster)
        if overlap_comm and c.overlap in ("bucketed", "prefetched") and c.count > 0:
            # one call per pass stays on the critical path: the last bucket / the first gather
            unhidden = min(s, s / c.count * c.passes)
        else:
            unhidden = s
        rows.append({"what": c.what, "kind": c.kind, "seconds": s, "exposed_s": unhidden})
        fixed += unhidden
        if s > unhidden:
            hideable[c.phase if c.phase in hideable else "backward"] += s - unhidden
    spill = 0.0
    for phase, compute in (("forward", forward_s), ("backward", backward_s)):
        if compute is not None:
            spill += max(0.0, hideable[phase] - compute)
    total_hidden = hideable["forward"] + hideable["backward"] - spill
    return {"collectives": rows, "exposed_s": fixed + spill, "hidden_s": total_hidden}

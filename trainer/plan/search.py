"""The plan of a run config on a cluster: its own layout judged (fits or not, by how much and in what; step
time, tokens/s, MFU), and the layouts that fit, best first.

A layout (``PlanLayout``) is ZeRO stage × tensor parallel × sequence parallel (Ulysses) × expert parallel (a
Mixture of Experts) × activation checkpointing × offload × ZeRO++ hpZ × micro-batch, with the gradient
accumulation that keeps the run's global batch (sequences per optimizer step). The search keeps, for every
other choice, the largest micro-batch that fits (fewer, larger micro-batches: fewer ZeRO-3 gathers, same
FLOPs), then orders what fits by predicted step time (ties: more free memory first). Layouts the trainer
would refuse (``trainer/parallel/layout.py``, ``experts.py``, ``config.validate``) are not proposed:
tensor parallelism must divide the key/value heads and the MLP width, sequence parallelism the query heads
and the sequence, not both at once, neither for a Mixture of Experts; expert parallelism must divide the
experts and the world, and takes no offload; offload needs ZeRO >= 1 (parameters: ZeRO-3). Tensor and
sequence parallel groups stay within a node, as do expert-parallel groups.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.model import ModelConfig, build_config, config_from_dict, hf_family, num_params

from ..config import ConfigError, RunConfig
from ..parallel.ds_config import build_ds_config, communication_defaults
from . import activations, memory, timing
from .layout import Cluster, GpuSpec, PlanLayout

GIB = memory.GIB
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Context:
    """What every layout of one plan shares."""

    cfg: RunConfig
    mcfg: ModelConfig
    precision: str
    cluster: Cluster | None
    world: int
    gpus_per_node: int
    seq_len: int
    compiled: bool
    global_batch: int  # sequences per optimizer step
    notes: list[str]


def resolve_precision(precision: str, gpu: GpuSpec | None) -> str:
    """``train.precision`` as the run would resolve it on the planned machines: auto is bf16 on the GPUs
    lmforge plans for (all have native bf16), fp32 on CPU (``ds_config.resolve_precision``)."""
    if precision == "auto":
        return "bf16" if gpu is not None else "fp32"
    return precision


def model_config(cfg: RunConfig, notes: list[str]) -> ModelConfig:
    """The model the run would build (``trainer.build.resolve_model``): the preset and overrides, with the
    vocabulary of the tokenizer when it can be read here; else the family's default vocabulary (said in
    ``notes``). ``model.init_from_hf``: the shape from the directory's config.json."""
    m = cfg.model
    if m.init_from_hf:
        d = json.loads((Path(m.init_from_hf) / "config.json").read_text())
        if "family" in d and "architectures" not in d:
            return config_from_dict(d)
        fam = hf_family(d, m.init_from_hf)
        return fam.hf.from_hf_config(d, m.init_from_hf)
    shape = dict(m.overrides)
    if "vocab_size" not in shape:
        vocab = None
        if cfg.tokenizer and Path(cfg.tokenizer).exists():
            try:
                from lmforge.data_pipeline.tokenizer import tokenizer_info

                vocab = tokenizer_info(cfg.tokenizer)["vocab_size"]
            except Exception as e:  # noqa: BLE001 - an unreadable tokenizer only costs the exact vocab
                notes.append(f"tokenizer {cfg.tokenizer} not read ({e}); vocabulary from the preset")
        else:
            notes.append(f"tokenizer {cfg.tokenizer or '(none)'} not found here: vocabulary from the preset / family "
                         "default (set model.vocab_size to plan another)")
        if vocab is not None:
            shape["vocab_size"] = vocab
    try:
        return build_config(m.family, m.preset, **shape)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def own_layout(cfg: RunConfig) -> PlanLayout:
    p, t = cfg.parallel, cfg.train
    return PlanLayout(zero_stage=p.zero_stage, tp=p.tensor_parallel, sp=p.sequence_parallel, ep=p.expert_parallel,
                      activation_checkpointing=p.activation_checkpointing, offload=p.offload,
                      micro_batch=t.micro_batch_size, grad_accum=t.grad_accum, hpz=p.zero_hpz_partition_size)


def problems(ctx: Context, layout: PlanLayout) -> list[str]:
    """Why the trainer would refuse ``layout`` for this model on this cluster (empty: it would not)."""
    m, L, world = ctx.mcfg, layout, ctx.world
    out = []
    if world % (L.tp * L.sp):
        out.append(f"world {world} is not divisible by tensor_parallel {L.tp} × sequence_parallel {L.sp}")
    if L.tp > 1 and (m.num_key_value_heads % L.tp or m.intermediate_size % L.tp):
        out.append(f"tensor_parallel {L.tp} must divide num_key_value_heads {m.num_key_value_heads} and "
                   f"intermediate_size {m.intermediate_size}")
    if L.sp > 1 and (m.num_attention_heads % L.sp or ctx.seq_len % L.sp):
        out.append(f"sequence_parallel {L.sp} must divide num_attention_heads {m.num_attention_heads} and "
                   f"data.seq_len {ctx.seq_len}")
    if L.tp > 1 and L.sp > 1:
        out.append("tensor_parallel and sequence_parallel cannot be combined")
    moe = bool(getattr(m, "num_experts", 0))
    if moe and (L.tp > 1 or L.sp > 1):
        out.append("a Mixture of Experts trains with tensor_parallel = sequence_parallel = 1")
    if L.ep:
        if not moe:
            out.append("expert_parallel needs a Mixture-of-Experts model")
        elif world % L.ep or m.num_experts % L.ep:
            out.append(f"expert_parallel {L.ep} must divide the world {world} and num_experts {m.num_experts}")
        if L.offload != "none":
            out.append("expert_parallel takes no offload")
    if L.offload != "none" and L.zero_stage == 0:
        out.append("offload needs zero_stage >= 1")
    if L.offload == "optimizer+params" and L.zero_stage != 3:
        out.append("offload optimizer+params needs zero_stage 3")
    if L.hpz > 1 and (L.zero_stage != 3 or world % L.hpz):
        out.append(f"zero_hpz_partition_size {L.hpz} needs zero_stage 3 and must divide the world {world}")
    return out


def ds_config(ctx: Context, layout: PlanLayout) -> dict:
    """The DeepSpeed JSON the trainer would build for ``layout`` on CUDA (``build_ds_config`` from the run
    config with the layout's values; ``overlap_comm`` as on CUDA unless the template sets it)."""
    cfg = copy.deepcopy(ctx.cfg)
    t, p = cfg.train, cfg.parallel
    t.micro_batch_size, t.grad_accum, t.global_batch_size = layout.micro_batch, layout.grad_accum, None
    p.zero_stage, p.tensor_parallel, p.sequence_parallel = layout.zero_stage, layout.tp, layout.sp
    p.expert_parallel, p.activation_checkpointing, p.offload = layout.ep, layout.activation_checkpointing, \
        layout.offload
    p.zero_hpz_partition_size = layout.hpz
    p.zero_quantized_weights = p.zero_quantized_gradients = False  # CUDA-only; not modelled
    ds = build_ds_config(cfg, layout.dp(ctx.world), ctx.precision, ctx.mcfg)
    template_zero = {}
    if p.ds_config:
        from ..parallel.ds_config import load_template

        template_zero = load_template(p.ds_config).get("zero_optimization", {})
    if layout.zero_stage >= 1 and "overlap_comm" not in template_zero and ctx.cluster is not None:
        _, defaults = communication_defaults(layout.zero_stage, ctx.mcfg.hidden_size, ctx.precision, True)
        ds["zero_optimization"]["overlap_comm"] = defaults["overlap_comm"]
    return ds


def evaluate(ctx: Context, layout: PlanLayout, *, exact: bool = False, with_time: bool = True) -> dict:
    """Memory (and, on a GPU cluster, time) of one layout: {"layout", "memory", "time", "fits", "free_gib"}."""
    ds = ds_config(ctx, layout)
    zero = ds.get("zero_optimization", {})
    comm_fp32 = ds.get("communication_data_type") == "fp32"
    zero_group = layout.dp(ctx.world) * layout.sp
    threshold = int({**memory.DS_ZERO_DEFAULTS, **zero}["stage3_param_persistence_threshold"]) \
        if layout.zero_stage == 3 else 0
    params = memory.rank_params(ctx.mcfg, layout.tp, layout.ep, zero_group, threshold)
    acts = activations.measure(ctx.mcfg, ctx.precision, layout.micro_batch, ctx.seq_len, tp=layout.tp,
                               sp=layout.sp, loss_chunk_tokens=ctx.cfg.parallel.loss_chunk_tokens, exact=exact)
    mem = memory.breakdown(params, acts, ctx.precision, layout, zero, comm_fp32, zero_group)
    out = {"layout": layout, "memory": mem, "params": params, "ds_zero": zero, "comm_fp32": comm_fp32}
    gpu = ctx.cluster.gpu if ctx.cluster else None
    if gpu is not None:
        cap = gpu.memory_gib * GIB
        out["fits"] = mem["total"] <= cap
        out["free_gib"] = (cap - mem["total"]) / GIB
    if with_time and ctx.cluster is not None:
        compiled = ctx.compiled and not (layout.ep and ctx.precision not in ("bf16", "fp8"))
        out["time"] = timing.step_time(ctx.mcfg, layout, ctx.cluster, ctx.seq_len, ctx.precision, compiled,
                                       params.partition, ds)
    out["host_gib_per_node"] = memory.host_bytes(params, ctx.precision, layout, ctx.gpus_per_node) / GIB
    return out


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def candidates(ctx: Context) -> list[list[PlanLayout]]:
    """Every layout the trainer would take at the run's global batch, grouped: each group differs only in
    the micro-batch (largest first)."""
    m, world, gpn = ctx.mcfg, ctx.world, ctx.gpus_per_node
    moe = bool(getattr(m, "num_experts", 0))
    node = min(gpn, world)
    grids = [(1, 1)] if moe else [(tp, 1) for tp in _divisors(node, 8)] + [(1, sp) for sp in _divisors(node, 8)
                                                                          if sp > 1]
    eps = [e for e in _divisors(node, node) if m.num_experts % e == 0] if moe else [0]
    every = sorted({0, 1, ctx.cfg.parallel.activation_checkpointing})
    nodes = max(1, world // gpn)
    groups = []
    for zero in (0, 1, 2, 3):
        offloads = ["none"] + (["optimizer"] if zero >= 1 else []) + (["optimizer+params"] if zero == 3 else [])
        hpzs = [1] + ([gpn] if zero == 3 and nodes > 1 and world % gpn == 0 else [])
        for tp, sp in grids:
            dp = world // (tp * sp) if world % (tp * sp) == 0 else 0
            if not dp:
                continue
            mbs = [mb for mb in MICRO_BATCHES if ctx.global_batch % (mb * dp) == 0]
            for ep in eps:
                for ac in every:
                    for off in offloads:
                        for hpz in hpzs:
                            group = [PlanLayout(zero, tp, sp, ep, ac, off, mb, ctx.global_batch // (mb * dp), hpz)
                                     for mb in reversed(mbs)]
                            group = [g for g in group if not problems(ctx, g)]
                            if group:
                                groups.append(group)
    return groups


def search(ctx: Context, top: int = 10) -> list[dict]:
    """The layouts that fit, best first (module docstring); at most ``top``."""
    fitting = []
    for group in candidates(ctx):
        for layout in group:  # largest micro-batch first; memory grows with it
            r = evaluate(ctx, layout, with_time=False)
            if r["fits"]:
                fitting.append(layout)
                break
    rated = [evaluate(ctx, lay) for lay in fitting]
    rated.sort(key=lambda r: (round(r["time"]["step_s"], 6), -r["free_gib"]))
    return rated[:top]


def context(cfg: RunConfig, gpus: int, gpus_per_node: int, gpu: GpuSpec | None) -> Context:
    notes: list[str] = []
    precision = resolve_precision(cfg.train.precision, gpu)
    mcfg = model_config(cfg, notes)
    layout = own_layout(cfg)
    world = gpus
    dp = world // (layout.tp * layout.sp) if world % (layout.tp * layout.sp) == 0 else 0
    if not dp:
        raise ConfigError(f"--gpus {world} is not divisible by parallel.tensor_parallel {layout.tp} × "
                          f"parallel.sequence_parallel {layout.sp}")
    global_batch = layout.micro_batch * layout.grad_accum * dp
    if cfg.train.global_batch_size is not None and cfg.train.global_batch_size != global_batch:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} but micro_batch_size "
                          f"{layout.micro_batch} × grad_accum {layout.grad_accum} × data-parallel size {dp} on "
                          f"{world} GPUs = {global_batch}")
    cluster = Cluster(gpu, gpus, gpus_per_node) if gpu is not None else None
    return Context(cfg, mcfg, precision, cluster, world, gpus_per_node, cfg.data.seq_len, bool(cfg.train.compile),
                   global_batch, notes)


def layout_dict(layout: PlanLayout) -> dict:
    return dataclasses.asdict(layout)


def _result_dict(ctx: Context, r: dict) -> dict:
    mem = r["memory"]
    d = {"layout": layout_dict(r["layout"]),
         "overrides": overrides(r["layout"]),
         "memory_gib": {k: v / GIB for k, v in mem["lines"].items()},
         "peak_allocated_gib": mem["peak_allocated"] / GIB, "total_gib": mem["total"] / GIB,
         "peak_phase": mem["phase"], "host_gib_per_node": r["host_gib_per_node"]}
    if "fits" in r:
        d["fits"], d["free_gib"] = r["fits"], r["free_gib"]
    if "time" in r:
        t = r["time"]
        d["time"] = {k: t[k] for k in ("step_s", "compute_s", "comm_exposed_s", "comm_total_s", "offload_s",
                                       "tokens_per_s", "mfu", "tokens_per_step", "global_batch")}
        d["time"]["collectives"] = t["collectives"]
    return d


def overrides(layout: PlanLayout) -> str:
    """The ``section.key=value`` overrides that select ``layout``."""
    L = layout
    parts = [f"parallel.zero_stage={L.zero_stage}", f"parallel.tensor_parallel={L.tp}",
             f"parallel.sequence_parallel={L.sp}"]
    if L.ep:
        parts.append(f"parallel.expert_parallel={L.ep}")
    parts += [f"parallel.activation_checkpointing={L.activation_checkpointing}", f"parallel.offload={L.offload}"]
    if L.hpz > 1:
        parts.append(f"parallel.zero_hpz_partition_size={L.hpz}")
    parts += [f"train.micro_batch_size={L.micro_batch}", f"train.grad_accum={L.grad_accum}"]
    return " ".join(parts)


def verdict(ctx: Context, r: dict) -> str:
    """One sentence: fits with X GiB free, or does not fit by how much and in what."""
    if ctx.cluster is None:
        return f"needs {r['memory']['total'] / GIB:.1f} GiB per device (no GPU given: memory only)"
    cap = ctx.cluster.gpu.memory_gib
    mem = r["memory"]
    if r["fits"]:
        return (f"fits: {mem['total'] / GIB:.1f} of {cap:.1f} GiB per GPU ({r['free_gib']:.1f} GiB headroom; "
                f"peak at {mem['phase']})")
    parts = sorted(((v, k) for k, v in mem["lines"].items() if v > 0), reverse=True)
    what = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for v, k in parts[:3])
    return (f"DOES NOT FIT: needs {mem['total'] / GIB:.1f} of {cap:.1f} GiB per GPU, over by "
            f"{-r['free_gib']:.1f} GiB (peak at {mem['phase']}; largest: {what} GiB)")


def plan(cfg: RunConfig, gpus: int, gpus_per_node: int, gpu: GpuSpec | None, top: int = 10,
         search_layouts: bool = True) -> dict:
    """The whole plan as a JSON-able dict: the run's own layout and the layouts that fit (module docstring)."""
    ctx = context(cfg, gpus, gpus_per_node, gpu)
    own = own_layout(cfg)
    run: dict = {"layout": layout_dict(own), "problems": problems(ctx, own)}
    if not run["problems"]:
        r = evaluate(ctx, own, with_time=gpu is not None)
        run.update(_result_dict(ctx, r))
        run["verdict"] = verdict(ctx, r)
    else:
        run["verdict"] = "the trainer would refuse this layout: " + "; ".join(run["problems"])
    m = ctx.mcfg
    out = {"model": {"family": m.family, "preset": cfg.model.preset, "params": num_params(m),
                     "active_params": num_params(m, active=True), "layers": m.num_hidden_layers,
                     "hidden_size": m.hidden_size, "vocab_size": m.vocab_size},
           "cluster": {"gpus": gpus, "gpus_per_node": gpus_per_node,
                       "gpu": dataclasses.asdict(gpu) if gpu is not None else None},
           "precision": ctx.precision, "seq_len": ctx.seq_len, "global_batch": ctx.global_batch,
           "compiled": ctx.compiled, "run": run, "notes": ctx.notes,
           "assumptions": {"efficiency": timing.efficiency(ctx.compiled),
                           "reserve": f"{memory.RESERVE_FRACTION:.0%} of the allocated peak + "
                                      f"{memory.RESERVE_FIXED_GIB} GiB",
                           "activations": "measured on fake tensors (trainer/plan/activations.py)"}}
    if search_layouts and gpu is not None:
        out["layouts"] = [_result_dict(ctx, r) for r in search(ctx, top)]
    return out


def predict(cfg: RunConfig, world: int, gpus_per_node: int, gpu: GpuSpec | None) -> dict:
    """The run's own layout: {"peak_memory_gib" (allocated, what ``max_memory_allocated`` measures),
    "total_memory_gib" (with the allocator reserve), "step_time_s" (None without a GPU), "tokens_per_s",
    "mfu", "fits", "verdict"}: what the trainer prints at start-up."""
    ctx = context(cfg, world, gpus_per_node, gpu)
    own = own_layout(cfg)
    bad = problems(ctx, own)
    if bad:
        raise ConfigError("; ".join(bad))
    r = evaluate(ctx, own, with_time=gpu is not None)
    t = r.get("time")
    return {"peak_memory_gib": r["memory"]["peak_allocated"] / GIB, "total_memory_gib": r["memory"]["total"] / GIB,
            "peak_phase": r["memory"]["phase"], "step_time_s": t["step_s"] if t else None,
            "tokens_per_s": t["tokens_per_s"] if t else None, "mfu": t["mfu"] if t else None,
            "fits": r.get("fits"), "verdict": verdict(ctx, r),
            "memory_gib": {k: v / GIB for k, v in r["memory"]["lines"].items()}}

"""The communication model of ``lmforge plan`` (``trainer/plan/comms.py``) against DeepSpeed's own comms logger
on real engines: 2 and 4 CPU ranks over gloo.

Each case builds its engine with the trainer's own code (``trainer.parallel``: ``init_layout``'s groups,
``build_model`` with ``zero.Init`` at ZeRO-3, ``transforms.parallelize`` with Ulysses, activation
checkpointing and the trainer's chunked loss, ``build_ds_config``'s DeepSpeed JSON, ``engine.initialize``
with AutoTP and the ``deepspeed_compat`` patches), switches on DeepSpeed's comms logger (``"comms_logger":
{"enabled": true, "verbose": false, "prof_all": true}`` in that JSON), trains ``WARM`` optimizer steps, clears
the log (``deepspeed.comm.reset_log``), trains ``STEPS`` more and reads the logger's per-op totals
(``comms_logger.get_raw_data()``: op name -> message size -> [calls, latencies, ...]). The model is given the
same DeepSpeed JSON. Per op name the logged bytes must equal ``comms.collectives(...)`` × ``STEPS`` within 2%
(the issue's bound) and the calls must be equal; every case matches exactly (under expert parallelism the
all-to-alls as the ranks' mean: ``check``).

What the window excludes: start-up (DeepSpeed's broadcast of the initial weights, ``zero.Init``'s gathers)
and ZeRO-3's first two steps, in which it records its module trace (every parameter is released after each
use, so the backward re-gathers everything, and it broadcasts checks of the trace across ranks): ``WARM`` = 2
skips them. The trainer's own per-step metric all-reduce (``StepSums``) goes through ``torch.distributed``,
not ``deepspeed.comm``, so no logger sees it (and these cases do not run the step loop).

Sizes: the ``debug`` preset at vocab 1000 (d = 64, 2 layers, 156,480 parameters, tied head), sized so that
the code paths of a real model run: the trainer's reduce bucket is d² = 4,096 elements, so the embedding
(64,000) and the MLP matrices (11,264) are reduced alone as oversized gradients, the attention matrices
(4,096 / 2,048) and the norms share buckets, and at 4 ranks a ZeRO-1/2 partition boundary cuts the embedding
into two all-reduces; ZeRO-3's persistence threshold 10·d = 640 partitions all 15 matrices (gathered,
reduce-scattered) and keeps the 5 norms persistent (refreshed after each step). DeepSpeed's ZeRO-3 reuse
distance and live-parameter limit (1e9 elements) are far above this model, so by default each micro-batch
gathers every matrix once; two cases scale them down to the model (50,000 and 120,000 elements, where they
stand to a 1B-13B model) so that the backward re-gathers what is released and the prefetcher's look-ahead
keeps part of it: the model replays DeepSpeed's rules and matches both. Micro-batch 2 × 64 tokens. Gradient
accumulation 2 shows ZeRO-1 reducing once per optimizer step, ZeRO-2 in every micro-batch and ZeRO-3
gathering per micro-batch. Activation checkpointing in the TP and Ulysses cases shows the recomputation
repeating o_proj's all-reduce (not down_proj's: the recomputation stops early) and all four all-to-alls.
The bf16 cases check the dtypes (bf16 weights gathered, fp32 gradients reduced, the 1-byte overflow flag).
The expert-parallel cases use ``qwen3-moe-debug`` at vocab 1000: each rank's expert tensors (4 × 32 × 64 =
8,192 values) exceed the reduce bucket and ZeRO-3's persistence threshold, so they take the oversized and
partitioned paths, and the routers (8 × 64) are grouped as AutoEP leaves them.

Measured on the 2-core machine (shared with other work, load 3-6): the 2-rank tests 6-17 s each, the 4-rank
tests 9-26 s each, the hpZ test (two 4-rank starts) 38 s.
"""

from __future__ import annotations

import time

import pytest

from lmforge.model import get_preset
from lmforge.trainer.plan import comms
from lmforge.trainer.plan.layout import PlanLayout
from tests.helpers.distributed import run_distributed

WARM, STEPS = 2, 2
PRESET, VOCAB, SEQ = "debug", 1000, 64
REL = 0.02  # the bound; every case here matches exactly


def _layout(case: dict) -> PlanLayout:
    return PlanLayout(zero_stage=case["zero"], tp=case.get("tp", 1), sp=case.get("sp", 1),
                      activation_checkpointing=case.get("ac", 0), micro_batch=case.get("micro", 2),
                      grad_accum=case.get("ga", 1), ep=case.get("ep", 0), hpz=case.get("hpz", 1))


_LAYOUTS: dict = {}


def measure(case: dict) -> dict:
    """On this rank: the case's engine, WARM + STEPS optimizer steps, and the comms logger's per-op totals
    over the last STEPS; also the DeepSpeed JSON the engine was built from."""
    import deepspeed.comm as dcomm
    import torch

    from lmforge.trainer.batching import sequence_slice
    from lmforge.trainer.config import RunConfig
    from lmforge.trainer.parallel import engine, transforms
    from lmforge.trainer.parallel.ds_config import build_ds_config
    from lmforge.trainer.parallel.layout import init_layout

    start = time.perf_counter()
    lay = _layout(case)
    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum = lay.micro_batch, lay.grad_accum
    cfg.train.precision = case.get("precision", "fp32")
    cfg.parallel.zero_stage, cfg.parallel.activation_checkpointing = lay.zero_stage, lay.activation_checkpointing
    cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel = lay.tp, lay.sp
    cfg.parallel.expert_parallel, cfg.parallel.zero_hpz_partition_size = lay.ep, lay.hpz
    if (lay.tp, lay.sp) not in _LAYOUTS:  # DeepSpeed's groups are created once per process
        _LAYOUTS[(lay.tp, lay.sp)] = init_layout(lay.tp, lay.sp)
    layout = _LAYOUTS[(lay.tp, lay.sp)]
    mcfg = get_preset(case.get("preset", PRESET), vocab_size=VOCAB)
    ds = build_ds_config(cfg, layout.dp, cfg.train.precision, mcfg)
    ds["zero_optimization"].update(case.get("ds_zero", {}))
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    model = engine.build_model(mcfg, ds, lay.zero_stage, 1, layout)
    transforms.parallelize(model, activation_checkpointing=lay.activation_checkpointing,
                           loss_chunk_tokens=cfg.parallel.loss_chunk_tokens, sequence_parallel=layout.sp,
                           sp_group=layout.sp_group)
    eng = engine.initialize(model, cfg, ds, layout)
    gen = torch.Generator().manual_seed(layout.dp_rank)
    for step in range(WARM + STEPS):
        if step == WARM:
            dcomm.reset_log()
        for _ in range(lay.grad_accum):
            ids = torch.randint(0, VOCAB, (lay.micro_batch, SEQ + 1), generator=gen)
            batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
            if layout.sp > 1:
                batch = sequence_slice(batch, layout.sp, layout.sp_rank)
            eng.backward(eng(**batch))
            eng.step()
    seconds = time.perf_counter() - start
    logged = {op: {"bytes": sum(size * v[0] for size, v in sizes.items()), "count": sum(v[0] for v in sizes.values())}
              for op, sizes in dcomm.comms_logger.get_raw_data().items()}
    eng.destroy()
    return {"logged": logged, "ds_config": {k: v for k, v in ds.items() if k != "comms_logger"}, "seconds": seconds}


def measure_all(cases: list[dict]) -> list[dict]:
    return [measure(case) for case in cases]


def compare(case: dict, world: int, logged: dict, ds_config: dict) -> list[str]:
    """Per op name, ``logged`` (per rank) against predicted × STEPS: the problems found (empty: bytes within
    REL and the same number of calls)."""
    cols = comms.collectives(get_preset(case.get("preset", PRESET), vocab_size=VOCAB), _layout(case), world, SEQ,
                             case.get("precision", "fp32"), ds_config=ds_config)
    pred = comms.by_kind(cols)
    problems = []
    for kind in sorted(set(pred) | set(logged)):
        want = pred.get(kind, {"bytes": 0, "count": 0})
        have = logged.get(kind, {"bytes": 0, "count": 0})
        wb, wc = want["bytes"] * STEPS, want["count"] * STEPS
        row = f"{case['name']}: {kind}: logged {have['bytes']} B in {have['count']} calls, predicted {wb} B in {wc}"
        if abs(have["bytes"] - wb) > REL * max(have["bytes"], 1):
            problems.append(row + " (bytes)")
        elif have["count"] != wc:
            problems.append(row + " (calls)")
    return problems


def check(cases: list[dict], world: int) -> None:
    """Every case on ``world`` ranks against the model. Every rank logs the same totals, except that under
    expert parallelism a rank's combine (and the dispatch's backward) carries the tokens routed *to* it,
    which varies with the routing: there the ranks' mean is compared (each rank sends B·T·k rows, so the
    mean is exact), and each rank must stay within 5% of it."""
    per_rank = run_distributed(measure_all, world, (cases,), timeout=600)
    problems = []
    for i, case in enumerate(cases):
        logs = [rank[i]["logged"] for rank in per_rank]
        kinds = set().union(*logs)
        mean = {k: {f: sum(log.get(k, {}).get(f, 0) for log in logs) / world for f in ("bytes", "count")}
                for k in kinds}
        for k in kinds:
            spread = max(abs(log.get(k, {}).get("bytes", 0) - mean[k]["bytes"]) for log in logs)
            if spread > (0.05 if case.get("ep", 0) > 1 and k == "all_to_all_single" else 0) * mean[k]["bytes"]:
                problems.append(f"{case['name']}: {k}: ranks logged {[log.get(k) for log in logs]}")
        problems += compare(case, world, mean, per_rank[0][i]["ds_config"])
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_data_parallel_zero_0_1_2_3_bytes_match_deepspeeds_comms_logger():
    """2 ranks, data parallel: ZeRO-1 (gradient all-reduce, the all-gather of the updated partitions), and at
    grad_accum 2 with ``overlap_comm`` as the trainer sets it on CUDA (reduced once per optimizer step, in
    backward's order), ZeRO-2 at grad_accum 2 (the reduction in every micro-batch), ZeRO-3 at grad_accum 2
    (reduce-scatter and gathers per micro-batch, the persistent norms refreshed per step), ZeRO-0."""
    check([dict(name="zero1", zero=1),
           dict(name="zero1_overlap_ga2", zero=1, micro=1, ga=2, ds_zero={"overlap_comm": True}),
           dict(name="zero2_ga2", zero=2, micro=1, ga=2), dict(name="zero3_ga2", zero=3, micro=1, ga=2),
           dict(name="zero0", zero=0)], 2)


@pytest.mark.slow
def test_zero3_release_and_prefetch_and_bf16_match_deepspeeds_comms_logger():
    """2 ranks. ZeRO-3 with DeepSpeed's reuse distance and live-parameter limit (both 1e9 by default, far
    above this model) scaled down to the model, as they stand to a 1B-13B model: at 50,000 elements the
    backward re-gathers all but the last layer's matrices; at 120,000 the prefetcher's look-ahead keeps part
    of what the reuse distance alone would release. Then bf16 at ZeRO-2 and ZeRO-3 (bf16 weights gathered,
    fp32 gradients reduced, the 1-byte overflow flag)."""
    check([dict(name="zero3_reuse50k", zero=3,
                ds_zero={"stage3_max_reuse_distance": 50_000, "stage3_max_live_parameters": 50_000}),
           dict(name="zero3_reuse120k", zero=3,
                ds_zero={"stage3_max_reuse_distance": 120_000, "stage3_max_live_parameters": 120_000}),
           dict(name="zero2_bf16", zero=2, precision="bf16"), dict(name="zero3_bf16", zero=3, precision="bf16")], 2)


@pytest.mark.slow
def test_tensor_parallel_bytes_match_deepspeeds_comms_logger():
    """2 ranks, AutoTP 2 (its forward and backward all-reduces; ZeRO over a data-parallel group of one, which
    DeepSpeed still calls and logs): ZeRO-1 with every layer checkpointed (the recomputed forward repeats
    its all-reduces in backward), and ZeRO-3."""
    check([dict(name="tp2_zero1_ac1", zero=1, tp=2, ac=1), dict(name="tp2_zero3", zero=3, tp=2)], 2)


@pytest.mark.slow
def test_sequence_parallel_bytes_match_deepspeeds_comms_logger():
    """2 ranks, Ulysses 2 (the all-to-alls; ZeRO over both ranks): ZeRO-1, and ZeRO-3 with every layer
    checkpointed (the recomputed forward repeats its all-to-alls in backward)."""
    check([dict(name="sp2_zero1", zero=1, sp=2), dict(name="sp2_zero3_ac1", zero=3, sp=2, ac=1)], 2)


@pytest.mark.slow
def test_four_ranks_tensor_parallel_bytes_match_deepspeeds_comms_logger():
    """4 ranks, TP 2 × DP 2: ZeRO-3 (gathers over the strided data-parallel group) and ZeRO-1 (the embedding
    cut by the partition boundary: two all-reduces)."""
    check([dict(name="tp2dp2_zero3", zero=3, tp=2), dict(name="tp2dp2_zero1", zero=1, tp=2)], 4)


@pytest.mark.slow
def test_four_ranks_data_and_sequence_parallel_bytes_match_deepspeeds_comms_logger():
    """4 ranks: ZeRO-3 over 4, and Ulysses 2 × DP 2 with ZeRO-2 (ZeRO over all four ranks)."""
    check([dict(name="dp4_zero3", zero=3), dict(name="sp2dp2_zero2", zero=2, sp=2)], 4)


@pytest.mark.slow
def test_hpz_bytes_match_deepspeeds_comms_logger():
    """4 ranks, ZeRO-3 with ZeRO++ hpZ over 2 (each case in its own processes: DeepSpeed creates the hpZ
    groups once): at grad_accum 2 the second micro-batch gathers from the secondary copies; with the reuse
    distance scaled down the backward does, and so does the tied head's second use in forward."""
    check([dict(name="hpz2_zero3_ga2", zero=3, hpz=2, micro=1, ga=2)], 4)
    check([dict(name="hpz2_zero3_reuse50k", zero=3, hpz=2,
                ds_zero={"stage3_max_reuse_distance": 50_000, "stage3_max_live_parameters": 50_000})], 4)


@pytest.mark.slow
def test_expert_parallel_bytes_match_deepspeeds_comms_logger():
    """2 ranks, ``qwen3-moe-debug`` (8 experts of width 32, top 2) at expert parallel 2 under ZeRO 0-3 (the
    token-count, dispatch and combine all-to-alls; the expert gradients over their own group of one, AutoEP's
    routers grouped apart), at ZeRO-1 also with ``overlap_comm``, at ZeRO-2 also with every layer
    checkpointed (the recomputation repeats the counts, dispatch and combine), and the same model data
    parallel without AutoEP at ZeRO-2."""
    moe = dict(preset="qwen3-moe-debug", ep=2)
    check([dict(name="ep2_zero0", zero=0, **moe), dict(name="ep2_zero1", zero=1, **moe),
           dict(name="ep2_zero1_overlap", zero=1, ds_zero={"overlap_comm": True}, **moe),
           dict(name="ep2_zero2", zero=2, **moe), dict(name="ep2_zero2_ac1", zero=2, ac=1, **moe),
           dict(name="ep2_zero3", zero=3, **moe),
           dict(name="moe_zero2", zero=2, preset="qwen3-moe-debug")], 2)


# --------------------------------------------------------------------------------------------------
# The model on its own (no engines)


def test_deepspeed_defaults_the_model_assumes_are_the_installed_ones():
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig()
    names = {"reduce_bucket_size": "reduce_bucket_size", "stage3_prefetch_bucket_size": "prefetch_bucket_size",
             "stage3_param_persistence_threshold": "param_persistence_threshold",
             "stage3_max_reuse_distance": "max_reuse_distance", "stage3_max_live_parameters": "max_live_parameters",
             "use_multi_rank_bucket_allreduce": "use_multi_rank_bucket_allreduce", "overlap_comm": "overlap_comm"}
    assert {k: getattr(z, attr) for k, attr in names.items()} == comms.DS_ZERO_DEFAULTS
    assert comms.ZERO0_BUCKET == MEMORY_OPT_ALLREDUCE_SIZE


def test_ring_factors_scopes_and_time():
    from lmforge.trainer.plan.layout import Cluster, GpuSpec

    gpu = GpuSpec("test", 80, 1000, intra_gbps=100, inter_gbps=10)
    c = comms.Collective("all_reduce", "x", bytes=8 * 10**9, count=1, group=8, stride=1)
    assert c.bus_bytes() == pytest.approx(2 * 7 / 8 * 8e9)
    assert comms.Collective("all_gather_into_tensor", "x", 10**9, 1, 8).bus_bytes() == pytest.approx(7e9)
    assert comms.Collective("reduce_scatter_tensor", "x", 8 * 10**9, 1, 8).bus_bytes() == pytest.approx(7e9)
    assert comms.Collective("all_to_all_single", "x", 8 * 10**9, 1, 8).bus_bytes() == pytest.approx(7e9)
    assert comms.Collective("all_reduce", "x", 10**9, 1, 1).bus_bytes() == 0
    assert comms.group_scope(8, 1, 8) == "intra" and comms.group_scope(4, 8, 8) == "inter"
    assert comms.group_scope(16, 1, 8) == "mixed" and comms.group_scope(4, 2, 8) == "intra"
    one_node, two_nodes = Cluster(gpu, 8, 8), Cluster(gpu, 16, 8)
    assert comms.collective_seconds(c, one_node) == pytest.approx(14e9 / 100e9 + comms.LATENCY_INTRA_S)
    wide = comms.Collective("all_reduce", "x", 8 * 10**9, 1, group=16)
    assert comms.collective_seconds(wide, two_nodes) == pytest.approx(2 * 15 / 16 * 8e9 / 10e9
                                                                      + comms.LATENCY_INTER_S)
    t = comms.comm_time([c, wide], two_nodes)
    assert t["total_s"] == pytest.approx(t["intra_s"] + t["inter_s"]) and t["inter_s"] > t["intra_s"] > 0


def test_overlap_assumptions():
    from lmforge.trainer.plan.layout import Cluster, GpuSpec

    cluster = Cluster(GpuSpec("test", 80, 1000, 100, 10), 8, 8)
    reduce = comms.Collective("all_reduce", "grads", 10 * 10**9, 10, 8, phase="backward", overlap="bucketed")
    tp = comms.Collective("all_reduce", "tp", 10**9, 4, 8, phase="forward")
    full = {r["what"]: r["seconds"] for r in comms.comm_time([reduce, tp], cluster)["collectives"]}
    e = comms.exposed([reduce, tp], cluster)
    rows = {r["what"]: r["exposed_s"] for r in e["collectives"]}
    assert rows["tp"] == pytest.approx(full["tp"])  # on the critical path
    assert rows["grads"] == pytest.approx(full["grads"] / 10)  # the last of 10 buckets
    assert e["exposed_s"] + e["hidden_s"] == pytest.approx(sum(full.values()))
    assert comms.exposed([reduce, tp], cluster, overlap_comm=False)["exposed_s"] == pytest.approx(sum(full.values()))
    # backward compute shorter than the hideable part: the rest is exposed
    short = comms.exposed([reduce, tp], cluster, backward_s=0.1)
    assert short["exposed_s"] == pytest.approx(sum(full.values()) - 0.1)


def test_zero3_releases_what_is_not_reused_within_the_distance():
    """A 7B Llama on 64 ranks: ZeRO-3 re-gathers in backward what DeepSpeed's 1e9-element reuse distance
    releases: all but the last layers (two by the reuse distance; the prefetcher, which may run up to
    max_live_parameters = 1e9 elements ahead, keeps a few more); the small debug model keeps everything."""
    big = get_preset("7b")
    cols = {c.what: c for c in comms.collectives(big, PlanLayout(3, micro_batch=1), 64, 4096, "bf16",
                                                 gpus_per_node=8)}
    fwd = cols["ZeRO-3 parameter all-gather, forward"]
    bwd = cols["ZeRO-3 parameter all-gather, backward"]
    layer = 202_383_360 * 2 // 64  # bytes of one 7B decoder layer's shard
    assert fwd.bytes - 8 * layer < bwd.bytes < fwd.bytes - 2 * layer
    assert fwd.scope == "mixed" and fwd.group == 64
    small = {c.what: c for c in comms.collectives(get_preset(PRESET, vocab_size=VOCAB), PlanLayout(3), 2, SEQ,
                                                  "fp32")}
    assert "ZeRO-3 parameter all-gather, backward" not in small
    # reduce-scatter moves each gradient once per micro-batch, in fp32 (communication_data_type)
    from lmforge.model import num_params

    assert cols["ZeRO-3 gradient reduce-scatter"].bytes == pytest.approx(num_params(big) * 4, rel=1e-3)


"""Training-step throughput of the real DeepSpeed engine on synthetic tokens, optionally against transformers.

Builds the model of ``--preset`` (any family: ``lmforge.model.build_model``) under ``deepspeed.initialize``
with the DeepSpeed JSON the trainer derives (``trainer.parallel.ds_config.build_ds_config``: ZeRO stage,
precision, micro batch, accumulation, clipping, AdamW), feeds it random token samples through the trainer's data path
(``DistributedSampleIterator`` -> ``make_batch`` collate, optionally on the prefetch thread -> device copy)
and times warmup + N optimizer steps. Prints tokens/s, model TFLOP/s per device, MFU (when a peak is
known), peak memory and the data-wait fraction of the step. TFLOP/s and MFU come in two conventions
(trainer/metrics.py): ``tflops_per_device``/``mfu``, PaLM's (attention over whole rows, no causal half: the
figure published MFU compares with), and ``..._causal_doc``, attention as computed (each attention span's
causal triangle: the packed documents of the timed samples for a document-masked variant, whole rows
otherwise). MFU divides by the bf16 dense peak for fp8 (``mfu_peak``).

``--precision fp8`` (``--fp8-recipe tensorwise|rowwise``, ``--fp8-layers auto|all``) converts the model's decoder
linear layers to torchao ``Float8Linear`` with ``trainer.parallel.fp8`` exactly as the trainer does (after
building the model, before activation checkpointing, compilation and ``deepspeed.initialize``; a bf16 engine),
and prints the trainer's start-up line saying which layers converted. On CPU float8 is emulated (no speed-up).

``--profile-sync N`` runs N more steps of our model under ``torch.profiler`` after the timed ones and sums,
per step, the time the host thread spends blocked in CUDA synchronisation (``cudaStreamSynchronize``,
``cudaDeviceSynchronize``, ``cudaEventSynchronize``, ``cudaMemcpy``/``cudaMemcpyAsync``) by the phase it
happened in (DeepSpeed's forward, backward and optimizer step; the loop's own loss read), and the GPU idle
time that starts while the host is blocked there (the cost of a host read: the device runs dry until the
host has launched the next work). DeepSpeed's reads (ZeRO's ``has_overflow``, ``get_grad_norm_direct``, the
bf16 optimizer's ``is_invalid_grad_norm``: README, "Host syncs") land in the ``step`` phase.

``--compare-hf`` also builds the family's ``transformers`` class (``LlamaForCausalLM``, ``Qwen3ForCausalLM``)
of the same shape with the same weights
under the same DeepSpeed config, in the same process, and alternates timed rounds (ours, HF, HF, ours,
...) so that load from other processes hits both alike; the step-time ratio ours/HF is reported per round
and as the median. Both models get the same loss code (fp32 cross-entropy over the full logits), so the
ratio compares the model bodies. ``--compile-hf`` then compiles the HF twin's decoder layers the way
``train.compile`` compiles ours (``torch.compile`` per layer, fixed shapes) and times a second set of
alternating rounds (ours against the compiled twin): ``hf_compiled``, ``ratio_ours_over_hf_compiled``.

Models are built on the GPU when there is one (``--init-device``; a ``7b`` initialised on the host takes
minutes), as ``deepspeed.initialize`` would move them there anyway.

Single process (a 1-rank gloo/NCCL group is created here):
    .venv/bin/python benchmarks/train_throughput.py --preset tiny --seq-len 256 --micro-batch 4 --compare-hf
Several ranks:
    deepspeed --num_gpus 8 benchmarks/train_throughput.py --preset 1b --precision bf16 --zero-stage 2
One H100/H200, the MFU target (>= 50%), eager vs compiled layers, plain causal vs intra-document
attention (flex block mask, or per-span SDPA) on packed documents of ~500 tokens, one engine:
    python benchmarks/train_throughput.py --preset 1b --precision bf16 --seq-len 4096 --micro-batch 4 \\
        --zero-stage 1 --steps 10 --mean-doc-len 500 \\
        --variants eager:causal,eager:flex,eager:spans,compiled:causal,compiled:flex
Mixture-of-Experts presets (qwen3_moe): ``--expert-parallel 0`` times the model's reference experts (a loop over
the experts), ``--expert-parallel E`` >= 1 DeepSpeed AutoEP's grouped-GEMM experts over groups of E ranks
(parallel.expert_parallel: the ``expert_parallel`` DeepSpeed section, named param groups, router logits
captured as the trainer does). The loss is the model's own (LM loss + the router's auxiliary losses); FLOPs,
TFLOP/s and MFU count the active parameters (a token's k experts and the router). ``--num-layers N`` shrinks
a preset to fit one device, e.g. OLMoE-1B-7B's shape in 8 of its 16 layers on one H200:
    python benchmarks/train_throughput.py --preset qwen3-moe-olmoe-1b-7b --num-layers 8 --vocab-size 50304 \\
        --precision bf16 --seq-len 4096 --micro-batch 2 --zero-stage 1 --mean-doc-len 500 --expert-parallel 1
One H200, FP8 against bf16 (the trainer's fp8 path; MFU against the bf16 peak):
    python benchmarks/train_throughput.py --preset 1b --precision fp8 --fp8-recipe tensorwise --seq-len 4096 \
        --micro-batch 4 --zero-stage 1 --mean-doc-len 500 --variants compiled:flex
Model FLOPs exclude activation recomputation (MFU, not HFU): see trainer/metrics.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmforge.model import (  # noqa: E402
    IGNORE_INDEX,
    CausalLM,
    all_presets,
    build_model,
    causal_doc_flops,
    family_of,
    flops_per_token,
    get_preset,
    num_params,
)
from lmforge.trainer.batching import BatchTransform, DistributedSampleIterator, make_batch  # noqa: E402
from lmforge.trainer.config import ConfigError, RunConfig  # noqa: E402
from lmforge.trainer.metrics import attention_span_sq_sum, detect_peak_tflops, peak_precision  # noqa: E402
from lmforge.trainer.parallel import distributed, experts, fp8  # noqa: E402
from lmforge.trainer.parallel.ds_config import build_ds_config, resolve_precision  # noqa: E402
from lmforge.trainer.parallel.engine import param_groups  # noqa: E402
from lmforge.trainer.parallel.transforms import apply_activation_checkpointing, compile_layers  # noqa: E402

EOD = 2


class SyntheticTokens:
    """A dataset of random token samples (T+1 ids each), deterministic per index, never materialised."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int, mean_doc_len: int = 0):
        self.n, self.seq_len, self.vocab, self.seed = num_samples, seq_len, vocab_size, seed
        self.mean_doc_len = mean_doc_len  # > 0: EOD after documents of geometric length (packed documents)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, i))
        row = rng.integers(EOD + 1, self.vocab, self.seq_len + 1, dtype=np.int32)
        if self.mean_doc_len:
            ends = np.cumsum(rng.geometric(1.0 / self.mean_doc_len, size=self.seq_len + 1))
            row[ends[ends <= self.seq_len]] = EOD
        return row


class HFWithOurLoss(nn.Module):
    """transformers' model of the family (body + lm_head), with our loss (labels are already shifted)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, labels, position_ids=None):
        logits = self.hf(input_ids=input_ids, position_ids=position_ids).logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                               ignore_index=IGNORE_INDEX)


def build_hf_twin(ours: CausalLM, activation_checkpointing: int, device: torch.device | None = None) -> nn.Module:
    adapter = family_of(ours.config).hf
    with torch.device(device or "cpu"):
        hf = adapter.transformers_model_class()(adapter.transformers_config_class()(
            **adapter.to_hf_config(ours.config), attn_implementation="sdpa", use_cache=False))
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or not set(missing) <= {"lm_head.weight"}:  # tied lm_head: HF ties it itself
        raise RuntimeError(f"HF twin state dict mismatch: missing {missing}, unexpected {unexpected}")
    if activation_checkpointing:
        # HF recomputes every layer; ours every N-th (equal work only for N=1).
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return HFWithOurLoss(hf)


def run_config(a: argparse.Namespace) -> RunConfig:
    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum = a.micro_batch, a.grad_accum
    cfg.train.precision = a.precision
    cfg.parallel.fp8_recipe, cfg.parallel.fp8_layers = a.fp8_recipe, a.fp8_layers
    cfg.parallel.zero_stage, cfg.parallel.offload = a.zero_stage, a.offload
    cfg.parallel.activation_checkpointing = a.activation_checkpointing
    cfg.parallel.expert_parallel = a.expert_parallel
    return cfg


class Runner:
    """One engine with its own sample iterator; ``steps(n)`` returns per-step (total, data-wait) seconds and
    the step's first global sample index."""

    def __init__(self, name: str, engine, it: DistributedSampleIterator, transform: BatchTransform | None = None):
        self.name, self.engine, self.it = name, engine, it
        self.transform = transform or BatchTransform(False)
        self.device = engine.device
        self.cuda = self.device.type == "cuda"

    def steps(self, n: int, annotate: bool = False) -> list[tuple[float, float, int]]:
        """``annotate``: mark the phases for the profiler (``--profile-sync``; PHASES)."""
        def phase(name):
            return torch.profiler.record_function(PHASES[name]) if annotate else contextlib.nullcontext()

        out = []
        for _ in range(n):
            if self.cuda:
                with phase("sync"):
                    torch.cuda.synchronize()
            t0 = time.perf_counter()
            start = self.it.consumed_samples
            with phase("data"):
                micro = self.it.next_microbatches()  # collated on the prefetch thread when prefetching
                batches = [self.transform.on_device({k: v.to(self.device, non_blocking=True)
                                                     if isinstance(v, torch.Tensor) else v for k, v in b.items()})
                           for b in micro]
            t_data = time.perf_counter() - t0
            loss = None
            for b in batches:
                with phase("forward"):
                    loss = self.engine(**b)
                with phase("backward"):
                    self.engine.backward(loss)
                with phase("step"):
                    self.engine.step()
            with phase("loss_read"):
                loss.item()  # waits for the step (the trainer reads the loss every step too)
            if self.cuda:
                with phase("sync"):
                    torch.cuda.synchronize()
            out.append((time.perf_counter() - t0, t_data, start))
        return out

    def span_sq_sum(self, start: int) -> int:
        """Σ length² of the attention spans of the global batch starting at sample ``start`` (every rank's
        samples, read again: the dataset is deterministic): its documents under document masking, else rows."""
        n = self.it.global_batch_size
        samples = np.stack([self.it.dataset[i] for i in range(start, start + n)])
        intra_doc = self.transform.intra_doc_attention
        return attention_span_sq_sum(make_batch(samples, eod_id=EOD, intra_doc_attention=intra_doc))


def peak_memory_gb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


# --profile-sync: the profiler ranges a step is cut into, and what counts as the host waiting for the device.
PHASES = {"data": "tt.data", "forward": "tt.forward", "backward": "tt.backward", "step": "tt.step",
          "loss_read": "tt.loss_read", "sync": "tt.sync"}
# DeepSpeed's part of the step; the rest (the loop's loss read and its timing barriers, the batch copy) is ours.
DEEPSPEED_PHASES = ("forward", "backward", "step")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def analyse_sync_trace(events: list[dict], steps: int) -> dict:
    """A Chrome trace of ``steps`` annotated steps (``Runner.steps(annotate=True)`` under torch.profiler) ->
    per step and per phase: host time blocked in synchronising CUDA calls (``SYNC_CALLS``), their count, and
    the GPU idle time that begins while the host is blocked in one (the device ran out of work because the
    host waited: until the host launches the next kernel, the GPU idles). Pure: testable on a made-up trace."""
    xs = [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]
    names = {v: k for k, v in PHASES.items()}
    phases = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), names[e["name"]]) for e in xs
                    if e.get("name") in names and e.get("cat") in ("user_annotation", "cpu_op", None))
    syncs = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in xs
                   if e.get("name") in SYNC_CALLS and e.get("cat") in ("cuda_runtime", "cuda_driver"))
    busy = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in xs if e.get("cat") in DEVICE_CATS)

    def phase_of(t: float) -> str:
        inner = [(p0, p1, name) for p0, p1, name in phases if p0 <= t <= p1]
        return min(inner, key=lambda p: p[1] - p[0])[2] if inner else "other"

    per = {k: {"blocked_ms": 0.0, "calls": 0, "gpu_idle_after_ms": 0.0} for k in [*PHASES, "other"]}
    for s0, s1, _ in syncs:
        p = per[phase_of(s0)]
        p["blocked_ms"] += (s1 - s0) / 1e3
        p["calls"] += 1
    merged: list[list[float]] = []
    for b0, b1 in busy:
        if merged and b0 <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b1)
        else:
            merged.append([b0, b1])
    span = (min(p[0] for p in phases), max(p[1] for p in phases)) if phases else None
    idle_total = 0.0
    for (_, g0), (g1, _) in zip(merged, merged[1:]):  # the gaps between busy stretches of the device
        idle_total += g1 - g0
        for s0, s1, _ in syncs:
            if s0 <= g0 <= s1:  # the device ran dry while the host waited in this call
                per[phase_of(s0)]["gpu_idle_after_ms"] += (g1 - g0) / 1e3
                break
    wall = (span[1] - span[0]) if span else 0.0
    out = {k: {m: v / steps for m, v in d.items()} for k, d in per.items()}
    ds = {m: sum(out[k][m] for k in DEEPSPEED_PHASES) for m in ("blocked_ms", "calls", "gpu_idle_after_ms")}
    return {"steps": steps, "per_phase": out, "deepspeed": ds,
            "loop": {m: out["loss_read"][m] + out["sync"][m] for m in ("blocked_ms", "calls", "gpu_idle_after_ms")},
            "profiled_step_ms": wall / steps / 1e3, "gpu_busy_ms": sum(b1 - b0 for b0, b1 in merged) / steps / 1e3,
            "gpu_idle_ms": idle_total / steps / 1e3, "device_events": len(busy), "sync_calls": len(syncs)}


def sync_profile(runner: Runner, n: int) -> dict:
    """``n`` steps of ``runner`` under torch.profiler, analysed by ``analyse_sync_trace``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.cuda else [])
    with profile(activities=acts) as prof:
        t = runner.steps(n, annotate=True)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    r = analyse_sync_trace(events, n)
    r["runner"] = runner.name
    r["step_ms_median"] = 1e3 * statistics.median(x[0] for x in t)
    return r


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=list(all_presets()), help="model size preset (any family)")
    ap.add_argument("--vocab-size", type=int, default=32000, help="vocabulary (default 32000)")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="override the preset's num_hidden_layers (shrink a large preset to fit one device)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4, help="samples per rank per forward")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--offload", default="none", choices=["none", "optimizer", "optimizer+params"])
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp8"],
                    help="auto = bf16 on CUDA with bf16, fp32 on CPU (as the trainer); fp8 = a bf16 engine whose "
                         "decoder linear layers are torchao Float8Linear (train.precision fp8; emulated on CPU)")
    ap.add_argument("--fp8-recipe", default="tensorwise", choices=list(fp8.RECIPES),
                    help="parallel.fp8_recipe with --precision fp8 (default tensorwise)")
    ap.add_argument("--fp8-layers", default="auto", choices=list(fp8.LAYERS),
                    help="parallel.fp8_layers with --precision fp8: auto = the trainer's shape rule, all = every "
                         "decoder linear layer with dimensions multiples of 16")
    ap.add_argument("--loss-chunk-tokens", type=int, default=RunConfig().parallel.loss_chunk_tokens,
                    help="parallel.loss_chunk_tokens for our model (default: the run config's; 0 = whole logits)")
    ap.add_argument("--activation-checkpointing", type=int, default=0,
                    help="recompute every N-th layer (0 = off; HF twin: every layer when > 0)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds (default 1, or 4 with --compare-hf: ours/HF alternate)")
    ap.add_argument("--compare-hf", action="store_true",
                    help="also time transformers' model of the family (LlamaForCausalLM, Qwen3ForCausalLM)")
    ap.add_argument("--expert-parallel", type=int, default=0,
                    help="parallel.expert_parallel for Mixture-of-Experts presets: 0 = the model's reference experts "
                         "(a loop over experts), E >= 1 = DeepSpeed AutoEP grouped-GEMM experts over groups of E ranks")
    ap.add_argument("--compile", action="store_true",
                    help="compile our model's decoder layers (train.compile); the HF twin stays eager")
    ap.add_argument("--compile-hf", action="store_true",
                    help="with --compare-hf: after the eager rounds, compile the HF twin's decoder layers "
                         "(torch.compile per layer, as train.compile) and time rounds against it too")
    ap.add_argument("--profile-sync", type=int, default=0, metavar="N",
                    help="after timing, profile N steps of our model: host time blocked in CUDA synchronisation "
                         "per step by phase (DeepSpeed's forward/backward/step, the loop's loss read) and the GPU "
                         "idle time it causes")
    ap.add_argument("--init-device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where the models are built and initialised (auto: the GPU when there is one)")
    ap.add_argument("--mean-doc-len", type=int, default=0,
                    help="pack documents of geometric length with this mean (EOD-separated; 0 = one per row)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated MODE:ATTENTION runs of our model on one engine, MODE eager|compiled "
                         "(per-layer torch.compile, as train.compile), ATTENTION causal|spans|mask|flex "
                         "(intra-document kernels, parallel.attention_kernel); compiled variants run last. "
                         "Default: eager:causal")
    ap.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                    help="build batches on the training thread instead of the prefetch thread")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="per-device peak for MFU (default: auto-detected for known GPUs; none on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    a = ap.parse_args(argv)
    if a.rounds is None:
        a.rounds = 4 if a.compare_hf else 1
    if a.variants and (a.compare_hf or a.compile):
        ap.error("--variants does not combine with --compare-hf or --compile (use compiled:... variants)")
    if a.compile_hf and not a.compare_hf:
        ap.error("--compile-hf needs --compare-hf")
    if a.profile_sync < 0:
        ap.error("--profile-sync must be >= 0")
    a.variants = (a.variants or ("compiled:causal" if a.compile else "eager:causal")).split(",")
    for v in a.variants:
        mode, _, attn = v.partition(":")
        if mode not in ("eager", "compiled") or attn not in ("causal", "spans", "mask", "flex"):
            ap.error(f"--variants: {v!r} is not MODE:ATTENTION (eager|compiled : causal|spans|mask|flex)")
    a.variants.sort(key=lambda v: v.startswith("compiled"))  # compilation is applied in place, once
    for name in ("seq_len", "micro_batch", "grad_accum", "steps", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.num_layers is not None and a.num_layers < 1:
        ap.error("--num-layers must be >= 1")
    if a.expert_parallel < 0:
        ap.error("--expert-parallel must be >= 0 (0 = the reference experts, E >= 1 = DeepSpeed AutoEP)")
    overrides = {"vocab_size": a.vocab_size}
    if a.num_layers is not None:
        overrides["num_hidden_layers"] = a.num_layers
    try:
        a.model_config = get_preset(a.preset, **overrides)
    except ValueError as e:  # e.g. --num-layers below a preset's mlp_only_layers
        ap.error(f"--preset {a.preset} with {overrides}: {e}")
    if a.compare_hf and experts.is_moe(a.model_config):
        ap.error(f"--compare-hf: not supported for the Mixture-of-Experts preset {a.preset} (the HF twin would "
                 "train without the router's auxiliary losses, and AutoEP would replace its blocks too); "
                 "compare --expert-parallel 0 with --expert-parallel 1 instead")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    import deepspeed

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ and "PMI_RANK" not in os.environ \
            and "OMPI_COMM_WORLD_RANK" not in os.environ and "MASTER_PORT" not in os.environ:
        # Not launched: a 1-rank group on a free port (29500 may belong to a concurrent run).
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if a.threads:
        torch.set_num_threads(a.threads)
    distributed.init()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *x, **k: None)
    precision = resolve_precision(a.precision)
    cfg = run_config(a)
    mcfg = a.model_config
    moe = experts.is_moe(mcfg)
    try:  # the trainer's start-up refusals (a dense model, E not dividing the world or the experts, ...)
        experts.check(mcfg, cfg.parallel, world, any(v.startswith("compiled") for v in a.variants), precision)
        fp8.check(precision, a.fp8_recipe, a.fp8_layers, 1)  # Hopper-class GPU or CPU emulation, torchao
    except ConfigError as e:
        if rank == 0:
            print(f"train_throughput: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    ds_config = build_ds_config(cfg, world, precision, mcfg)
    tokens_per_step = a.micro_batch * a.grad_accum * world * a.seq_len
    fpt = flops_per_token(mcfg, a.seq_len)
    peak = a.peak_tflops or detect_peak_tflops(precision)  # fp8: the bf16 dense peak

    torch.manual_seed(a.seed)
    init_device = a.init_device if a.init_device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if init_device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_device = torch.device("cuda", torch.cuda.current_device())
    t_build = time.perf_counter()
    with torch.device(init_device):
        ours = build_model(mcfg)
    models = {"ours": ours}
    if a.compare_hf:  # copies ours' initial weights (before any fp8 conversion: the twin stays bf16)
        models["hf"] = build_hf_twin(ours, a.activation_checkpointing, torch.device(init_device))
    fp8_line = None
    fp8_counts = None
    if precision == "fp8":  # as trainer/build.py: before activation checkpointing and compilation wrap the layers
        converted, kept = fp8.convert(ours, a.fp8_recipe, a.fp8_layers)
        fp8_line = fp8.describe(converted, kept, a.fp8_recipe)
        fp8_counts = {"converted": len(converted), "kept": len(kept)}
    apply_activation_checkpointing(ours, a.activation_checkpointing)
    ours.loss_chunk_tokens = a.loss_chunk_tokens
    build_s = time.perf_counter() - t_build

    # Enough for every phase (compile step, warmups, rounds; again with --compile-hf; profiled steps); never
    # materialised.
    n_samples = (2 * (a.warmup + 1 + a.steps * a.rounds) + a.profile_sync + 2) * a.micro_batch * a.grad_accum * world
    runners = {}

    def iterator(intra_doc: bool, transform: BatchTransform):
        collate = functools.partial(make_batch, eod_id=EOD, reset_position_ids=intra_doc,
                                    intra_doc_attention=intra_doc)
        return DistributedSampleIterator(
            SyntheticTokens(n_samples, a.seq_len, mcfg.vocab_size, a.seed, a.mean_doc_len),
            a.micro_batch, a.grad_accum, rank, world, prefetch=a.prefetch,
            collate=lambda samples: transform(collate(samples)))

    for name, m in models.items():
        # Named groups under expert parallelism: DeepSpeed's MoE path splits the expert parameters off by name.
        groups = param_groups(m, 0.1, named=a.expert_parallel > 0)
        engine, _, _, _ = deepspeed.initialize(model=m, model_parameters=groups, config=ds_config)
        if name == "ours" and a.expert_parallel:  # AutoEP replaced the sparse blocks: the losses read their logits
            experts.capture_router_logits(engine.module, len(engine.module.moe_blocks()))
        if name == "hf":
            runners[name] = Runner(name, engine, iterator(False, BatchTransform(False)))
            continue
        for v in a.variants:
            attn = v.partition(":")[2]
            transform = BatchTransform(attn != "causal", attn if attn != "causal" else "spans")
            runners[v if len(a.variants) > 1 else "ours"] = Runner(
                v, engine, iterator(attn != "causal", transform), transform)

    dev = next(iter(runners.values())).device
    total, active = num_params(mcfg), num_params(mcfg, active=True)
    if moe:
        params = (f"{total / 1e6:.1f}M params total, {active / 1e6:.1f}M active: {mcfg.num_experts_per_tok} of "
                  f"{mcfg.num_experts} experts")
        ep = (f"expert parallel {a.expert_parallel} (DeepSpeed AutoEP, grouped GEMM)" if a.expert_parallel
              else "expert parallel 0 (reference experts, loop)")
        loss = "model's own (LM + router aux losses)"
    else:
        params, ep, loss = f"{total / 1e6:.1f}M params", "", "model's own (LM)"
    if a.compare_hf:
        loss = f"ours: {loss}; HF twin: fp32 LM cross-entropy over the full logits"
    compile_ours = a.compile or (len(a.variants) == 1 and a.variants[0].startswith("compiled"))
    prec = f"fp8 ({a.fp8_recipe}, layers {a.fp8_layers}; bf16 engine)" if precision == "fp8" else precision
    say(f"train_throughput: preset {a.preset} ({params}, {mcfg.num_hidden_layers} layers"
        f"{' (--num-layers)' if a.num_layers is not None else ''}, vocab {mcfg.vocab_size}) | "
        f"{ep + ' | ' if ep else ''}world {world} on {dev.type}"
        f"{' (' + torch.cuda.get_device_name() + ')' if dev.type == 'cuda' else ''} | {prec} | "
        f"ZeRO-{a.zero_stage} | micro batch {a.micro_batch} × accum {a.grad_accum} × seq {a.seq_len} = "
        f"{tokens_per_step} tokens/step | act. ckpt {a.activation_checkpointing} | loss chunk {a.loss_chunk_tokens} | "
        f"prefetch {'on' if a.prefetch else 'off'} | torch threads {torch.get_num_threads()}"
        f"{' | ours compiled' if compile_ours else ''}"
        f"{' | HF twin compiled after its eager rounds' if a.compile_hf else ''}"
        f" | loss: {loss} | FLOPs/token {fpt / 1e9:.3f} G{' (active parameters)' if moe else ''} | models built on "
        f"{init_device} in {build_s:.1f} s")
    if fp8_line:
        say(fp8_line)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    compile_s = hf_compile_s = None
    if len(a.variants) > 1:
        # Variants one after the other (compilation cannot be undone), each warmed up first.
        for name, r in runners.items():
            if name.startswith("compiled") and compile_s is None:
                t0 = time.perf_counter()
                compile_layers(ours)
                r.steps(1)
                compile_s = time.perf_counter() - t0
                say(f"compiled {mcfg.num_hidden_layers} layers: first step {compile_s:.1f} s (compilation included)")
            r.steps(a.warmup)
            for _ in range(a.rounds):
                t = r.steps(a.steps)
                times[name] += t
                per_round[name].append(statistics.median(x[0] for x in t))
            say(f"  {name}: {1e3 * statistics.median(x[0] for x in times[name]):.1f} ms/step")
    else:
        if compile_ours:
            t0 = time.perf_counter()
            compile_layers(ours)
            runners["ours"].steps(1)
            compile_s = time.perf_counter() - t0
            say(f"compiled {mcfg.num_hidden_layers} layers: first step {compile_s:.1f} s (compilation included)")
        for r in runners.values():
            r.steps(a.warmup)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        order = list(runners)
        for rnd in range(a.rounds):
            for name in order if rnd % 2 == 0 else order[::-1]:
                t = runners[name].steps(a.steps)
                times[name] += t
                per_round[name].append(statistics.median(x[0] for x in t))
        if a.compile_hf:  # the same HF engine, its layers compiled in place: rounds against ours again
            t0 = time.perf_counter()
            compile_layers(models["hf"].hf)
            hf = runners["hf_compiled"] = runners["hf"]
            hf.steps(1)
            hf_compile_s = time.perf_counter() - t0
            say(f"HF twin: compiled {mcfg.num_hidden_layers} layers: first step {hf_compile_s:.1f} s "
                "(compilation included)")
            hf.steps(a.warmup)
            times["hf_compiled"], per_round["hf_compiled"] = [], []
            order = ["ours", "hf_compiled"]
            for rnd in range(a.rounds):
                for name in order if rnd % 2 == 0 else order[::-1]:
                    t = runners[name].steps(a.steps)
                    times[name] += t
                    per_round[name].append(statistics.median(x[0] for x in t))
    mem, mem_kind = peak_memory_gb()
    reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
    device_total = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else None
    profile = None
    if a.profile_sync:  # after the timing and the peak memory: the profiler's own cost is not in either
        name = [n for n in runners if not n.startswith("hf")][-1]
        try:  # the profiler (CUPTI) is the one part a machine may refuse: the timing above is kept
            profile = sync_profile(runners[name], a.profile_sync)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            profile = {"error": f"{type(e).__name__}: {e}"}
            say(f"--profile-sync failed: {profile['error']}")

    results: dict = {"preset": a.preset, "num_layers": mcfg.num_hidden_layers, "vocab_size": mcfg.vocab_size,
                     "params_total": total, "params_active": active, "moe": moe,
                     "expert_parallel": a.expert_parallel, "loss": loss, "flops_per_token": fpt,
                     "activation_checkpointing": a.activation_checkpointing,
                     "precision": precision, "zero_stage": a.zero_stage, "world": world,
                     "device": dev.type, "tokens_per_step": tokens_per_step, "seq_len": a.seq_len,
                     "micro_batch": a.micro_batch, "grad_accum": a.grad_accum, "peak_tflops": peak,
                     "peak_memory_gb": mem, "peak_memory_kind": mem_kind,
                     "peak_memory_reserved_gb": reserved, "mean_doc_len": a.mean_doc_len,
                     "compile_s": compile_s, "variants": [v for v in runners if v != "hf_compiled"],
                     "runs": {k: ("compiled:causal" if k == "hf_compiled" else r.name) for k, r in runners.items()},
                     "compiled_ours": compile_ours, "hf_compile_s": hf_compile_s, "init_device": str(init_device),
                     "build_s": build_s, "device_memory_gb": device_total,
                     "fp8_recipe": a.fp8_recipe if precision == "fp8" else None,
                     "fp8_layers": a.fp8_layers if precision == "fp8" else None,
                     "fp8_layer_counts": fp8_counts, "fp8": fp8_line,
                     "mfu_peak": ("--peak-tflops" if a.peak_tflops else peak_precision(precision)) if peak else None,
                     "conventions": {
                         "tflops_per_device, mfu": "PaLM: 6N + 12·L·T·H·D per token (attention over whole rows, "
                                                   "no causal half)",
                         "tflops_per_device_causal_doc, mfu_causal_doc": "attention as computed: the causal "
                         "triangle (diagonal included) of each attention span (packed document when masked, else row)"}}
    for name, t in times.items():
        step = statistics.median(x[0] for x in t)
        mean = statistics.fmean(x[0] for x in t)
        wait = sum(x[1] for x in t) / sum(x[0] for x in t)
        tok_s = tokens_per_step / step
        tflops = fpt * tok_s / world / 1e12
        # Attention as computed: the timed steps' own samples (mean FLOPs per step) over the same median time.
        span_sq = statistics.fmean(runners[name].span_sq_sum(x[2]) for x in t)
        tflops_cd = causal_doc_flops(mcfg, span_sq, tokens_per_step) / step / world / 1e12
        r = {"step_time_median_s": step, "step_time_mean_s": mean, "tokens_per_s": tok_s,
             "tflops_per_device": tflops, "tflops_per_device_causal_doc": tflops_cd, "data_wait_frac": wait,
             "mfu": tflops / peak if peak else None, "mfu_causal_doc": tflops_cd / peak if peak else None,
             "round_medians_s": per_round[name]}
        results[name] = r
        mfu = (f"{100 * r['mfu']:.1f}% (causal_doc {100 * r['mfu_causal_doc']:.1f}%)" if peak
               else "n/a (no known peak; pass --peak-tflops)")
        say(f"[{name:>4}] step {1e3 * step:.1f} ms (median of {len(t)}; mean {1e3 * mean:.1f}) | "
            f"{tok_s:,.0f} tokens/s | {tflops:.3f} TFLOP/s/device (causal_doc {tflops_cd:.3f}) | MFU {mfu} | "
            f"data wait {100 * wait:.2f}%")
    against = ("" if not peak else "; MFU against --peak-tflops" if a.peak_tflops
               else f"; MFU against the {results['mfu_peak']} dense peak")
    say(f"TFLOP/s and MFU: PaLM convention (attention over whole rows, no causal half); causal_doc: attention as "
        f"computed (each document's or row's causal triangle){against}")
    say(f"peak memory ({mem_kind}, rank 0{', both models' if a.compare_hf and dev.type == 'cpu' else ''}): "
        f"{mem:.2f} GiB{f' (CUDA max reserved {reserved:.2f} GiB)' if reserved is not None else ''}")
    if a.compare_hf:
        ratios = [o / h for o, h in zip(per_round["ours"][:a.rounds], per_round["hf"])]
        results["ratio_ours_over_hf"] = statistics.median(ratios)
        results["ratio_per_round"] = ratios
        say(f"step-time ratio ours/HF: median {statistics.median(ratios):.3f} over {len(ratios)} rounds "
            f"({', '.join(f'{x:.3f}' for x in ratios)}); <= 1.0 means ours is no slower")
    if a.compile_hf:
        ratios = [o / h for o, h in zip(per_round["ours"][a.rounds:], per_round["hf_compiled"])]
        results["ratio_ours_over_hf_compiled"] = statistics.median(ratios)
        results["ratio_per_round_hf_compiled"] = ratios
        say(f"step-time ratio ours/HF compiled: median {statistics.median(ratios):.3f} over {len(ratios)} rounds "
            f"({', '.join(f'{x:.3f}' for x in ratios)})")
    if profile is not None:
        results["sync_profile"] = profile
    if profile is not None and "error" not in profile:
        ds, lp = profile["deepspeed"], profile["loop"]
        step = profile["profiled_step_ms"]
        say(f"host syncs ({profile['runner']}, {profile['steps']} profiled steps, {step:.1f} ms/step under the "
            f"profiler): DeepSpeed (forward/backward/step) {ds['calls']:.1f} calls, host blocked "
            f"{ds['blocked_ms']:.2f} ms/step, GPU idle after them {ds['gpu_idle_after_ms']:.2f} ms/step "
            f"({100 * ds['gpu_idle_after_ms'] / step if step else 0:.2f}% of the step); the loop's own loss read "
            f"and barriers: {lp['calls']:.1f} calls, GPU idle after them {lp['gpu_idle_after_ms']:.2f} ms/step; "
            f"GPU busy {profile['gpu_busy_ms']:.1f} ms/step ({profile['device_events']} device events)")
        if not profile["device_events"]:
            say("  (no device events: on CPU nothing blocks on a device; the phases were profiled only)")
        say("  per phase (calls, host blocked ms, GPU idle after ms, per step): " + "; ".join(
            f"{k} {v['calls']:.1f}, {v['blocked_ms']:.2f}, {v['gpu_idle_after_ms']:.2f}"
            for k, v in profile["per_phase"].items() if v["calls"]))
    if a.json and rank == 0:
        tmp = Path(a.json).with_name(f".{Path(a.json).name}.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, a.json)
    for r in runners.values():
        r.it.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pretraining entry point.

    deepspeed --num_gpus N --module trainer.train --config configs/demo.yaml [section.key=value ...]

One DeepSpeed engine per rank (gloo on CPU, NCCL on GPU). Writes RUN_DIR/metrics.jsonl,
RUN_DIR/tensorboard/, RUN_DIR/checkpoints/ and resumes from the latest complete checkpoint when
started again. SIGTERM/SIGINT/SIGUSR1 finish the current step, save, and exit 0.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.gpt_dataset import DatasetConfigError
from model import ModelConfig, flops_per_token, get_preset, num_params

from . import checkpoint as ckpt
from . import distributed, faults, resume
from .config import ConfigError, RunConfig, check_global_batch, dump_config, load_config
from .ds_config import build_ds_config, resolve_precision
from .engine import build_model, check_tensor_parallel, init_layout, keep_zero0_grad_norm, param_groups
from .metrics import MetricsLogger, detect_peak_tflops, format_eta, memory_stats


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="trainer.train",
        description="Train a Llama-family model with DeepSpeed. Launch with "
        "`deepspeed --num_gpus N --module trainer.train --config CFG [section.key=value ...]`.",
        epilog="Example: deepspeed --num_gpus 2 --module trainer.train --config configs/demo.yaml "
        "train.max_steps=50 parallel.zero_stage=3",
    )
    ap.add_argument("--config", required=True, help="run config YAML (see configs/ and README)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides (YAML values)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Build pieces


def build_model_config(cfg: RunConfig, vocab_size: int) -> tuple[ModelConfig, dict | None]:
    m = cfg.model
    shape = {k: getattr(m, k) for k in ModelConfig.__dataclass_fields__ if getattr(m, k, None) is not None}
    if m.init_from_hf:
        from .import_hf import load_hf_weights

        mcfg, state = load_hf_weights(m.init_from_hf)
        if shape:
            raise ConfigError("model: init_from_hf takes the shape from the checkpoint; drop the shape fields")
        if mcfg.vocab_size < vocab_size:
            raise ConfigError(
                f"model.init_from_hf vocab {mcfg.vocab_size} < tokenizer vocab {vocab_size}"
            )
        return mcfg, state
    shape.setdefault("vocab_size", vocab_size)
    if shape["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size {shape['vocab_size']} < tokenizer vocab {vocab_size}")
    if m.preset:
        return get_preset(m.preset, **shape), None
    return ModelConfig(**shape), None


def lr_lambda(cfg: RunConfig):
    """Multiplier of optim.lr after `step` optimizer steps (LambdaLR semantics)."""
    o, total = cfg.optim, cfg.train.max_steps
    floor = o.min_lr / o.lr if o.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "wsd":
            decay_start = int(total * (1 - o.decay_fraction))
            if step < decay_start:
                return 1.0
            frac = min(1.0, (step - decay_start) / max(1, total - decay_start))
            return 1.0 - (1.0 - floor) * frac
        frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.schedule == "linear":
            return 1.0 - (1.0 - floor) * frac
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# The run


class StopFlag:
    """Set by SIGTERM/SIGINT/SIGUSR1; the loop checks it at step boundaries (all ranks agree)."""

    def __init__(self):
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signal == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal = signal.Signals(signum).name


def all_agree(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=distributed.collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_across_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=distributed.collective_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def train(cfg: RunConfig) -> int:
    import deepspeed
    import sentencepiece as spm

    from data_pipeline.batching import DistributedSampleIterator, make_batch
    from data_pipeline.gpt_dataset import build_dataset

    stop = StopFlag()
    distributed.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    tp = cfg.parallel.tensor_parallel
    # Data-parallel rank/size from DeepSpeed's own groups, which the engine will use (trainer/engine.py).
    layout = init_layout(tp)
    dp, dp_rank = layout.dp, layout.dp_rank
    global_batch = check_global_batch(cfg, dp)
    precision = resolve_precision(cfg.train.precision)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    log = MetricsLogger(run_dir, enabled=rank == 0)
    t_start = time.time()

    # Tokenizer: its vocabulary sizes the model; its EOS is the end-of-document token in the shards.
    if not Path(cfg.tokenizer).is_file():
        raise ConfigError(f"tokenizer: {cfg.tokenizer} not found")
    sp = spm.SentencePieceProcessor(model_file=cfg.tokenizer)
    eod_id = sp.eos_id()
    tok_sha = file_sha256(cfg.tokenizer)

    mcfg, init_state = build_model_config(cfg, sp.get_piece_size())
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        if not (ckpt_dir / "tokenizer.model").is_file() or file_sha256(ckpt_dir / "tokenizer.model") != tok_sha:
            tmp = ckpt_dir / f".tokenizer.model.tmp.{os.getpid()}"
            shutil.copyfile(cfg.tokenizer, tmp)
            os.replace(tmp, ckpt_dir / "tokenizer.model")

    # Data: one global sample order; this rank's slice of each step is chosen by the iterator.
    seq_len = cfg.data.seq_len
    cache_dir = cfg.data.cache_dir or str(run_dir / "data_cache")
    sources = [(s.path, s.weight) for s in cfg.data.train]
    train_ds = build_dataset(sources, "train", seq_len, cfg.train.max_steps * global_batch,
                             cfg.train.seed, cache_dir=cache_dir)
    valid_ds = None
    if cfg.eval.interval > 0:
        if not cfg.data.valid and not (Path(sources[0][0]) / "manifest.json").is_file():
            raise ConfigError(
                "eval.interval > 0 but data.valid is not set and the first train source is not a preprocess "
                "output with a valid split; set data.valid (or eval.interval=0)"
            )
        vsrc = [(cfg.data.valid, 1.0)] if cfg.data.valid else [(sources[0][0], 1.0)]
        valid_ds = build_dataset(vsrc, "valid", seq_len,
                                 cfg.eval.steps * cfg.train.micro_batch_size * dp, cfg.train.seed + 1,
                                 cache_dir=cache_dir)
    # Index arrays are built once per node (local rank 0, atomic writes: safe on a shared filesystem)
    # and memory-mapped by every rank; no rank builds them at every start.
    if local_rank == 0:
        for ds in (train_ds, valid_ds):
            if ds is not None:
                ds.build_cache()
    dist.barrier()
    # The order's identity, independent of its length: extending max_steps resumes into the same order.
    data_fp = train_ds.order_fingerprint

    # What to resume from is decided before the engine exists: another parallel layout needs DeepSpeed's
    # universal loader, which is chosen in its config (trainer/resume.py).
    plan = resume.plan(cfg, ckpt_dir, dp=dp, tp=tp, tokenizer_sha=tok_sha, data_fingerprint=data_fp,
                       global_batch=global_batch)
    resume.prepare(plan, ckpt_dir, log=log.console)

    # Model: identical init on every rank from the seed (DeepSpeed also broadcasts rank 0's weights).
    np.random.seed(cfg.train.seed)
    check_tensor_parallel(mcfg, tp)
    ds_config = resume.ds_config_for(plan, build_ds_config(cfg, dp, precision))
    # ZeRO-3 builds under zero.Init with the same weights as an eager build (trainer/engine.py).
    model = build_model(mcfg, ds_config, cfg.parallel.zero_stage, cfg.train.seed, layout, init_state,
                        cfg.parallel.activation_checkpointing)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=ds_config,
        mpu=layout.mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    device = engine.device
    faults.install_nonfinite_guard(engine)
    keep_zero0_grad_norm(engine)  # grad_norm in the metrics at ZeRO-0 too
    if rank == 0:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))

    # Resume.
    step, consumed = 0, 0
    if plan is not None:
        step, consumed = resume.load(engine, plan, ckpt_dir, rank)
        how = f" ({'universal checkpoint, ' if plan.universal else ''}{plan.reason})" if plan.reason else ""
        log.console(f"resumed from {ckpt_dir / plan.tag}{how}: step {step}, {consumed} samples consumed")

    if rank == 0:
        n = num_params(mcfg)
        log.console(
            f"lmforge: {n / 1e6:.1f}M params | world {world} = dp {dp} × tp {tp} | ZeRO-{cfg.parallel.zero_stage}"
            f" | {precision} | global batch {global_batch} × {seq_len} = {global_batch * seq_len} tokens/step"
            f" | steps {step}->{cfg.train.max_steps}"
        )

    batch_kw = dict(mask_eod_loss=cfg.data.mask_eod_loss, reset_position_ids=cfg.data.reset_position_ids,
                    intra_doc_attention=cfg.data.intra_doc_attention)
    # Reading and batch assembly run on a prefetch thread, overlapping the previous step's compute.
    it = DistributedSampleIterator(train_ds, cfg.train.micro_batch_size, cfg.train.grad_accum, dp_rank, dp,
                                   consumed_samples=consumed, prefetch=cfg.data.prefetch,
                                   collate=functools.partial(make_batch, eod_id=eod_id, **batch_kw))
    fpt = flops_per_token(mcfg, seq_len)
    peak = cfg.log.peak_tflops or detect_peak_tflops(precision)
    tokens_per_step = global_batch * seq_len

    def save(step: int, consumed: int, last_loss: float | None, eval_loss: float | None) -> None:
        state = {
            "consumed_samples": consumed, "model_config": mcfg.to_dict(), "config": cfg.to_dict(),
            "tokenizer": {"file": "tokenizer.model", "sha256": tok_sha, "vocab_size": sp.get_piece_size(),
                          "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
                          "unk_id": sp.unk_id()},
            "data_fingerprint": data_fp, "precision": precision, "zero_stage": cfg.parallel.zero_stage,
            "tensor_parallel": tp, "data_parallel": dp, "world_size": world, "global_batch_size": global_batch,
            "train_loss": last_loss, "eval_loss": eval_loss,
        }
        t0 = time.time()
        tag = ckpt.save(engine, ckpt_dir, step, state)
        if rank == 0:
            ckpt.prune(ckpt_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
            log.console(f"saved checkpoint {ckpt_dir / tag} in {time.time() - t0:.1f}s")

    def evaluate() -> float:
        engine.eval()
        total = 0.0
        with torch.no_grad():
            vit = DistributedSampleIterator(valid_ds, cfg.train.micro_batch_size, cfg.eval.steps, dp_rank, dp)
            for mb in vit.next_microbatches():
                b = {k: v.to(device) for k, v in make_batch(mb, eod_id, **batch_kw).items()}
                total += engine(**b).item()
        engine.train()
        return mean_across_ranks(total / cfg.eval.steps)

    last_loss, eval_loss = None, None
    window_t0, window_data, window_steps = time.time(), 0.0, 0
    exit_reason = None
    nonfinite = faults.NonFiniteTracker(cfg.train.max_nonfinite_steps, precision)
    nan_steps = faults.injected_nan_steps()
    if nan_steps:
        log.console(f"{faults.INJECT_ENV}: rank 0's loss is multiplied by NaN at steps {sorted(nan_steps)}")
    while step < cfg.train.max_steps:
        t_data0 = time.time()
        batches = [{k: v.to(device) for k, v in mb.items()} for mb in it.next_microbatches()]
        window_data += time.time() - t_data0
        loss_sum = 0.0
        skipped_before = engine.skipped_steps
        for b in batches:
            loss = engine(**b)
            if rank == 0 and step + 1 in nan_steps:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
        step += 1
        consumed += global_batch
        window_steps += 1
        last_loss = mean_across_ranks(loss_sum / len(batches))
        # DeepSpeed (or faults' ZeRO-0 guard) skipped the update if any gradient was non-finite.
        if nonfinite.observe(step, last_loss, engine.skipped_steps > skipped_before,
                             lambda: str(ckpt_dir / t) if (t := ckpt.latest_tag(ckpt_dir)) else None):
            log.console(f"step {step}: non-finite loss or gradient (loss {last_loss}), update skipped "
                        f"({nonfinite.streak} in a row, {nonfinite.total} in this run)")

        if step % cfg.log.interval == 0 or step == cfg.train.max_steps:
            dt = time.time() - window_t0
            step_time = dt / window_steps
            tok_s = tokens_per_step * window_steps / dt
            tflops = fpt * tok_s / world / 1e12
            m = {
                "loss": last_loss, "lr": engine.get_lr()[0], "grad_norm": _grad_norm(engine),
                "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / world,
                "tflops_per_device": tflops, "step_time_s": step_time,
                "data_wait_frac": window_data / dt, "consumed_samples": consumed,
                "skipped_steps": int(getattr(engine, "skipped_steps", 0)), "nonfinite_steps": nonfinite.total,
                **memory_stats(),
            }
            if peak:
                m["mfu"] = tflops / peak
            if precision == "fp16":
                m["loss_scale"] = float(engine.optimizer.cur_scale)
            log.log(step, m)
            eta = (cfg.train.max_steps - step) * step_time
            log.console(
                f"step {step}/{cfg.train.max_steps} | loss {last_loss:.4f} | lr {m['lr']:.2e} | "
                f"{tok_s / 1e3:.1f}k tok/s | {tflops:.2f} TFLOP/s/dev | {step_time * 1e3:.0f} ms/step | "
                f"data {100 * m['data_wait_frac']:.1f}% | eta {format_eta(eta)}"
            )
            window_t0, window_data, window_steps = time.time(), 0.0, 0

        if valid_ds is not None and (step % cfg.eval.interval == 0 or step == cfg.train.max_steps):
            eval_loss = evaluate()
            log.log(step, {"loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50))}, prefix="eval")
            log.console(f"eval step {step} | loss {eval_loss:.4f} | ppl {math.exp(min(eval_loss, 50)):.2f}")

        timed_out = cfg.train.exit_after_minutes > 0 and (time.time() - t_start) / 60 > cfg.train.exit_after_minutes
        if all_agree(stop.signal is not None or timed_out):
            exit_reason = stop.signal or ("exit_after_minutes" if timed_out else "a stop request on another rank")
            break
        # No periodic save inside a non-finite streak: keep_last must not rotate out the good checkpoints.
        if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < cfg.train.max_steps
                and nonfinite.streak == 0):
            save(step, consumed, last_loss, eval_loss)

    if ckpt.latest_tag(ckpt_dir) != ckpt.tag_for(step):
        save(step, consumed, last_loss, eval_loss)
    if exit_reason:
        log.console(f"stopping on {exit_reason} at step {step}: checkpoint saved, exiting cleanly")
    it.close()
    log.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _grad_norm(engine) -> float:
    g = engine.get_global_grad_norm()
    if g is None:
        return float("nan")
    return float(g.item() if torch.is_tensor(g) else g)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return train(cfg)
    except (ConfigError, DatasetConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except faults.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

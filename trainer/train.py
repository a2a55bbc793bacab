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
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.atomic import atomic_write_bytes, atomic_write_text
from data_pipeline.batching import DistributedSampleIterator, make_batch
from data_pipeline.gpt_dataset import DatasetConfigError, build_dataset
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


class Trainer:
    """One rank's run: set-up in ``__init__`` (process group, data, model, engine, resume), then ``run()``.

    Each method owns one concern: ``_build_data`` the sample order, ``_build_engine`` the model and
    DeepSpeed, ``train_step`` one optimizer step, ``evaluate`` validation, ``save`` checkpoints,
    ``_log`` metrics. All collectives are called by every rank in the same order.
    """

    def __init__(self, cfg: RunConfig):
        import sentencepiece as spm

        self.cfg = cfg
        self.stop = StopFlag()
        distributed.init()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.tp = cfg.parallel.tensor_parallel
        # Data-parallel rank/size from DeepSpeed's own groups, which the engine will use (trainer/engine.py).
        self.layout = init_layout(self.tp)
        self.dp, self.dp_rank = self.layout.dp, self.layout.dp_rank
        self.global_batch = check_global_batch(cfg, self.dp)
        self.precision = resolve_precision(cfg.train.precision)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log = MetricsLogger(self.run_dir, enabled=self.rank == 0)
        self.t_start = time.time()

        # Tokenizer: its vocabulary sizes the model; its EOS is the end-of-document token in the shards.
        if not Path(cfg.tokenizer).is_file():
            raise ConfigError(f"tokenizer: {cfg.tokenizer} not found")
        self.sp = spm.SentencePieceProcessor(model_file=cfg.tokenizer)
        self.eod_id = self.sp.eos_id()
        self.tok_sha = file_sha256(cfg.tokenizer)
        self.mcfg, init_state = build_model_config(cfg, self.sp.get_piece_size())
        if self.rank == 0:
            self._write_run_files()

        self._build_data()
        # What to resume from is decided before the engine exists: another parallel layout needs
        # DeepSpeed's universal loader, which is chosen in its config (trainer/resume.py).
        self.plan = resume.plan(cfg, self.ckpt_dir, dp=self.dp, tp=self.tp, tokenizer_sha=self.tok_sha,
                                data_fingerprint=self.data_fp, global_batch=self.global_batch)
        resume.prepare(self.plan, self.ckpt_dir, log=self.log.console)
        self._build_engine(init_state)

        self.step, self.consumed = 0, 0
        if self.plan is not None:
            self.step, self.consumed = resume.load(self.engine, self.plan, self.ckpt_dir, self.rank)
            p = self.plan
            how = f" ({'universal checkpoint, ' if p.universal else ''}{p.reason})" if p.reason else ""
            self.log.console(f"resumed from {self.ckpt_dir / p.tag}{how}: step {self.step}, "
                             f"{self.consumed} samples consumed")
        self.log.console(
            f"lmforge: {num_params(self.mcfg) / 1e6:.1f}M params | world {self.world} = dp {self.dp} × tp {self.tp}"
            f" | ZeRO-{cfg.parallel.zero_stage} | {self.precision} | global batch {self.global_batch} × "
            f"{cfg.data.seq_len} = {self.global_batch * cfg.data.seq_len} tokens/step"
            f" | steps {self.step}->{cfg.train.max_steps}"
        )
        # Reading and batch assembly run on a prefetch thread, overlapping the previous step's compute.
        self.it = DistributedSampleIterator(
            self.train_ds, cfg.train.micro_batch_size, cfg.train.grad_accum, self.dp_rank, self.dp,
            consumed_samples=self.consumed, prefetch=cfg.data.prefetch,
            collate=functools.partial(make_batch, eod_id=self.eod_id, **self.batch_kw))
        self.nonfinite = faults.NonFiniteTracker(cfg.train.max_nonfinite_steps, self.precision)
        self.nan_steps = faults.injected_nan_steps()
        if self.nan_steps:
            self.log.console(f"{faults.INJECT_ENV}: rank 0's loss is multiplied by NaN at steps "
                             f"{sorted(self.nan_steps)}")

    # -- set-up ----------------------------------------------------------------------------------

    def _write_run_files(self) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
        # The checkpoint folder carries its tokenizer, so export needs nothing from the run config.
        dst = self.ckpt_dir / "tokenizer.model"
        if not dst.is_file() or file_sha256(dst) != self.tok_sha:
            atomic_write_bytes(dst, Path(self.cfg.tokenizer).read_bytes())

    def _build_data(self) -> None:
        """One global sample order; this rank's slice of each step is chosen by the iterator."""
        cfg = self.cfg
        seq_len = cfg.data.seq_len
        cache_dir = cfg.data.cache_dir or str(self.run_dir / "data_cache")
        sources = [(s.path, s.weight) for s in cfg.data.train]
        self.train_ds = build_dataset(sources, "train", seq_len, cfg.train.max_steps * self.global_batch,
                                      cfg.train.seed, cache_dir=cache_dir)
        self.valid_ds = None
        if cfg.eval.interval > 0:
            if not cfg.data.valid and not (Path(sources[0][0]) / "manifest.json").is_file():
                raise ConfigError(
                    "eval.interval > 0 but data.valid is not set and the first train source is not a "
                    "preprocess output with a valid split; set data.valid (or eval.interval=0)"
                )
            vsrc = [(cfg.data.valid, 1.0)] if cfg.data.valid else [(sources[0][0], 1.0)]
            self.valid_ds = build_dataset(vsrc, "valid", seq_len,
                                          cfg.eval.steps * cfg.train.micro_batch_size * self.dp,
                                          cfg.train.seed + 1, cache_dir=cache_dir)
        # Index arrays are built once per node (local rank 0, atomic writes: safe on a shared filesystem)
        # and memory-mapped by every rank; no rank builds them at every start.
        if self.local_rank == 0:
            for ds in (self.train_ds, self.valid_ds):
                if ds is not None:
                    ds.build_cache()
        dist.barrier()
        # The order's identity, independent of its length: extending max_steps resumes into the same order.
        self.data_fp = self.train_ds.order_fingerprint
        self.batch_kw = dict(mask_eod_loss=cfg.data.mask_eod_loss,
                             reset_position_ids=cfg.data.reset_position_ids,
                             intra_doc_attention=cfg.data.intra_doc_attention)

    def _build_engine(self, init_state: dict | None) -> None:
        import deepspeed

        cfg = self.cfg
        # Model: identical init on every rank from the seed (DeepSpeed also broadcasts rank 0's weights).
        np.random.seed(cfg.train.seed)
        check_tensor_parallel(self.mcfg, self.tp)
        self.ds_config = resume.ds_config_for(self.plan, build_ds_config(cfg, self.dp, self.precision))
        # ZeRO-3 builds under zero.Init with the same weights as an eager build (trainer/engine.py).
        model = build_model(self.mcfg, self.ds_config, cfg.parallel.zero_stage, cfg.train.seed, self.layout,
                            init_state, cfg.parallel.activation_checkpointing)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=self.ds_config,
            mpu=self.layout.mpu,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        )
        self.device = self.engine.device
        faults.install_nonfinite_guard(self.engine)
        keep_zero0_grad_norm(self.engine)  # grad_norm in the metrics at ZeRO-0 too
        if self.rank == 0:
            atomic_write_text(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=1))

    # -- the loop --------------------------------------------------------------------------------

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors to the engine's device, except segment_ids: the model reads document spans from them on
        the host, and a copy there and back would make every forward wait for the GPU."""
        return {k: v if k == "segment_ids" else v.to(self.device) for k, v in batch.items()}

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss across ranks, data wait s)."""
        t0 = time.time()
        batches = [self._to_device(mb) for mb in self.it.next_microbatches()]
        data_wait = time.time() - t0
        loss_sum = 0.0
        skipped_before = self.engine.skipped_steps
        for b in batches:
            loss = self.engine(**b)
            if self.rank == 0 and self.step + 1 in self.nan_steps:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            loss_sum += loss.item()
        self.step += 1
        self.consumed += self.global_batch
        loss = mean_across_ranks(loss_sum / len(batches))
        # DeepSpeed (or faults' ZeRO-0 guard) skipped the update if any gradient was non-finite.
        if self.nonfinite.observe(self.step, loss, self.engine.skipped_steps > skipped_before,
                                  lambda: str(self.ckpt_dir / t) if (t := ckpt.latest_tag(self.ckpt_dir)) else None):
            self.log.console(f"step {self.step}: non-finite loss or gradient (loss {loss}), update skipped "
                             f"({self.nonfinite.streak} in a row, {self.nonfinite.total} in this run)")
        return loss, data_wait

    def evaluate(self) -> float:
        """Mean loss over the first eval.steps × micro_batch × dp samples of the validation order."""
        cfg = self.cfg
        self.engine.eval()
        total = 0.0
        with torch.no_grad():
            vit = DistributedSampleIterator(self.valid_ds, cfg.train.micro_batch_size, cfg.eval.steps,
                                            self.dp_rank, self.dp)
            for mb in vit.next_microbatches():
                b = self._to_device(make_batch(mb, self.eod_id, **self.batch_kw))
                total += self.engine(**b).item()
        self.engine.train()
        return mean_across_ranks(total / cfg.eval.steps)

    def save(self, last_loss: float | None, eval_loss: float | None) -> None:
        """Collective: every rank writes its DeepSpeed shards; rank 0 then marks the tag complete."""
        sp = self.sp
        state = {
            "consumed_samples": self.consumed, "model_config": self.mcfg.to_dict(), "config": self.cfg.to_dict(),
            "tokenizer": {"file": "tokenizer.model", "sha256": self.tok_sha, "vocab_size": sp.get_piece_size(),
                          "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
                          "unk_id": sp.unk_id()},
            "data_fingerprint": self.data_fp, "precision": self.precision,
            "zero_stage": self.cfg.parallel.zero_stage, "tensor_parallel": self.tp, "data_parallel": self.dp,
            "world_size": self.world, "global_batch_size": self.global_batch,
            "train_loss": last_loss, "eval_loss": eval_loss,
        }
        t0 = time.time()
        tag = ckpt.save(self.engine, self.ckpt_dir, self.step, state)
        if self.rank == 0:
            ckpt.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
            self.log.console(f"saved checkpoint {self.ckpt_dir / tag} in {time.time() - t0:.1f}s")

    def _log(self, loss: float, window: dict) -> None:
        cfg = self.cfg
        dt = time.time() - window["t0"]
        step_time = dt / window["steps"]
        tok_s = self.global_batch * cfg.data.seq_len * window["steps"] / dt
        tflops = flops_per_token(self.mcfg, cfg.data.seq_len) * tok_s / self.world / 1e12
        m = {
            "loss": loss, "lr": self.engine.get_lr()[0], "grad_norm": _grad_norm(self.engine),
            "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / self.world,
            "tflops_per_device": tflops, "step_time_s": step_time,
            "data_wait_frac": window["data"] / dt, "consumed_samples": self.consumed,
            "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
            "nonfinite_steps": self.nonfinite.total, **memory_stats(),
        }
        peak = cfg.log.peak_tflops or detect_peak_tflops(self.precision)
        if peak:
            m["mfu"] = tflops / peak
        if self.precision == "fp16":
            m["loss_scale"] = float(self.engine.optimizer.cur_scale)
        self.log.log(self.step, m)
        eta = (cfg.train.max_steps - self.step) * step_time
        self.log.console(
            f"step {self.step}/{cfg.train.max_steps} | loss {loss:.4f} | lr {m['lr']:.2e} | "
            f"{tok_s / 1e3:.1f}k tok/s | {tflops:.2f} TFLOP/s/dev | {step_time * 1e3:.0f} ms/step | "
            f"data {100 * m['data_wait_frac']:.1f}% | eta {format_eta(eta)}"
        )

    def run(self) -> int:
        cfg = self.cfg
        last_loss, eval_loss = None, None
        window = {"t0": time.time(), "data": 0.0, "steps": 0}
        exit_reason = None
        while self.step < cfg.train.max_steps:
            last_loss, data_wait = self.train_step()
            window["data"] += data_wait
            window["steps"] += 1
            if self.step % cfg.log.interval == 0 or self.step == cfg.train.max_steps:
                self._log(last_loss, window)
                window = {"t0": time.time(), "data": 0.0, "steps": 0}

            if self.valid_ds is not None and (self.step % cfg.eval.interval == 0 or self.step == cfg.train.max_steps):
                eval_loss = self.evaluate()
                ppl = math.exp(min(eval_loss, 50))
                self.log.log(self.step, {"loss": eval_loss, "perplexity": ppl}, prefix="eval")
                self.log.console(f"eval step {self.step} | loss {eval_loss:.4f} | ppl {ppl:.2f}")

            elapsed_min = (time.time() - self.t_start) / 60
            timed_out = cfg.train.exit_after_minutes > 0 and elapsed_min > cfg.train.exit_after_minutes
            if all_agree(self.stop.signal is not None or timed_out):
                exit_reason = self.stop.signal or ("exit_after_minutes" if timed_out
                                                   else "a stop request on another rank")
                break
            # No periodic save inside a non-finite streak: keep_last must not rotate out the good checkpoints.
            if (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0
                    and self.step < cfg.train.max_steps and self.nonfinite.streak == 0):
                self.save(last_loss, eval_loss)

        if ckpt.latest_tag(self.ckpt_dir) != ckpt.tag_for(self.step):
            self.save(last_loss, eval_loss)
        if exit_reason:
            self.log.console(f"stopping on {exit_reason} at step {self.step}: checkpoint saved, exiting cleanly")
        self.it.close()
        self.log.close()
        dist.barrier()
        dist.destroy_process_group()
        return 0


def train(cfg: RunConfig) -> int:
    return Trainer(cfg).run()


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

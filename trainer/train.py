"""Pretraining entry point and the step loop.

    deepspeed --num_gpus N --module lmforge.trainer.train --config configs/demo.yaml [section.key=value ...]

One DeepSpeed engine per rank (gloo on CPU, NCCL on GPU), built by ``trainer/build.py``. Writes
RUN_DIR/metrics.jsonl, RUN_DIR/tensorboard/, RUN_DIR/checkpoints/ and resumes from the latest complete
checkpoint when started again. SIGTERM/SIGINT/SIGUSR1 (and RUN_DIR/STOP, a launcher gone,
train.exit_after_minutes) finish the current step, save, and exit with train.stopped_exit_status (0 by
default). A run that reaches train.max_steps writes RUN_DIR/DONE and exits 0.
Exit status: 0 finished (or stopped cleanly, by default), train.stopped_exit_status stopped before
max_steps with its checkpoint saved (e.g. 75 for a retry loop), 2 bad config or data, 3 aborted on
non-finite steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from lmforge.common.errors import run_cli
from lmforge.common.files import atomic_write_text
from lmforge.model import causal_doc_flops, flops_per_token, num_params

from . import checkpoint, faults
from .batching import DistributedSampleIterator, make_batch
from .build import Run, build_run
from .config import RunConfig, load_config
from .metrics import (
    MetricsLogger,
    attention_span_sq_sum,
    detect_peak_tflops,
    format_eta,
    memory_stats,
    peak_precision,
)
from .parallel.distributed import StepSums, mean_across_ranks
from .parallel.engine import hpz_group_size
from .signals import StopFlag


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="lmforge.trainer.train",
        description="Train a model of any lmforge family (Llama, Qwen3) with DeepSpeed. Launch with "
        "`deepspeed --num_gpus N --module lmforge.trainer.train --config CFG [section.key=value ...]`. "
        "Exit status: 0 finished (train.max_steps reached, RUN_DIR/DONE written); a run stopped before it "
        "(signal, RUN_DIR/STOP, train.exit_after_minutes) saves and exits with train.stopped_exit_status "
        "(default 0; 75 for a retry loop); 2 bad config or data, "
        "3 aborted after train.max_nonfinite_steps non-finite steps.",
        epilog="Example: deepspeed --num_gpus 2 --module lmforge.trainer.train --config configs/demo.yaml "
        "train.max_steps=50 parallel.zero_stage=3",
    )
    ap.add_argument("--config", required=True, help="run config YAML (see configs/ and README)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides (YAML values)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return ap.parse_args(argv)


class Trainer:
    """One rank's step loop over a built ``Run``: ``train_step`` one optimizer step, ``evaluate``
    validation, ``save`` checkpoints, ``_log`` metrics. All collectives are called by every rank in the
    same order."""

    def __init__(self, cfg: RunConfig):
        # Before anything slow: a signal during start-up is honoured at step 1.
        self.stop = StopFlag(cfg.run_dir)
        self.t_start = time.time()
        self.run: Run = build_run(cfg, log=_console)
        r, self.cfg = self.run, cfg
        self.engine, self.rank = r.engine, r.layout.rank
        self.log = MetricsLogger(r.run_dir, enabled=self.rank == 0)
        if r.resumed_from is not None:
            p = r.resumed_from
            how = f" ({'universal checkpoint, ' if p.universal else ''}{p.reason})" if p.reason else ""
            self.log.console(f"resumed from {r.ckpt_dir / p.tag}{how}: step {r.step}, "
                             f"{r.consumed_samples} samples consumed")
        self.log.console(
            f"lmforge: {num_params(r.model_config) / 1e6:.1f}M params"
            + (f" ({num_params(r.model_config, active=True) / 1e6:.1f}M active per token)"
               if num_params(r.model_config, active=True) != num_params(r.model_config) else "")
            + f" | world {r.layout.world} = dp {r.layout.dp}"
            f" × tp {r.layout.tp}{f' × sp {r.layout.sp}' if r.layout.sp > 1 else ''}"
            + (f" | experts over groups of {cfg.parallel.expert_parallel} ranks (DeepSpeed AutoEP)"
               if cfg.parallel.expert_parallel else "")
            + f" | ZeRO-{cfg.parallel.zero_stage} | {r.precision} | global batch "
            f"{r.global_batch} × {cfg.data.seq_len} = {r.global_batch * cfg.data.seq_len} tokens/step"
            f" | steps {r.step}->{cfg.train.max_steps}"
        )
        if cfg.parallel.zero_hpz_partition_size > 1:
            self.log.console(f"ZeRO++ hpZ: secondary weight partitions over groups of "
                             f"{hpz_group_size(self.engine.module)} ranks")
        # The planner's prediction for this very run (lmforge plan), checked against what the first logged
        # window measures (kind "plan" in metrics.jsonl, plan/ in TensorBoard): every run checks the planner.
        self.plan = planned(cfg, r.layout.world, int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or r.layout.world,
                            self.log.console) if self.rank == 0 else None
        # Reading, batch assembly and the attention policy run on a prefetch thread, overlapping the
        # previous step's compute.
        d = cfg.data
        self._batch = functools.partial(make_batch, eod_id=r.tokenizer.eod_id, mask_eod_loss=d.mask_eod_loss,
                                        reset_position_ids=d.reset_position_ids,
                                        intra_doc_attention=d.intra_doc_attention)
        self._pin = self.engine.device.type == "cuda"  # pinned: the copy to the GPU need not wait for it
        self.it = DistributedSampleIterator(
            r.train_ds, cfg.train.micro_batch_size, cfg.train.grad_accum, r.layout.dp_rank, r.layout.dp,
            consumed_samples=r.consumed_samples, prefetch=cfg.data.prefetch, collate=self._collate_counted)
        self.nonfinite = faults.NonFiniteTracker(cfg.train.max_nonfinite_steps, r.precision)
        # A Mixture of Experts also sums its loss's parts and each sparse layer's expert load (moe_metrics).
        module = self.engine.module
        self.moe = module.moe_blocks() if hasattr(module, "moe_blocks") else []
        moe_names = ("lm_loss", "aux_loss", "z_loss", "expert_load") if self.moe else ()
        # attn_span_sq: Σ length² of the attention spans of the step's samples (the causal_doc MFU, _log).
        self.sums = StepSums(("loss", "stop", "timeout", "attn_span_sq", *moe_names),
                             {"expert_load": len(self.moe) * r.model_config.num_experts} if self.moe else None)
        self.last_moe: tuple[int, dict] | None = None  # (step, summed MoE values) of the newest record read
        self.skipped: dict[int, bool] = {}  # step -> DeepSpeed skipped its update, until observed
        self.last_loss: tuple[int, float] | None = None  # (step, mean loss across ranks) of the newest record read
        self.window_span_sq = 0.0  # Σ attn_span_sq over the global batches of the steps read since the last log
        self.stop_at: int | None = None  # the step every rank stops after (a stop request or the timer)
        self.exit_reason: str | None = None
        self._compiled = False  # train.compile: the first (compiling) step has run
        self.pending_save: checkpoint.PendingSave | None = None  # checkpoint.async_save in progress
        self.nan_steps = faults.injected_nan_steps()
        if self.nan_steps:
            self.log.console(f"{faults.INJECT_ENV}: rank 0's loss is multiplied by NaN at steps "
                             f"{sorted(self.nan_steps)}")

    def _collate(self, samples) -> dict:
        """Samples (B, T+1) -> the model's inputs, with the attention policy applied (prefetch thread)."""
        return self._prepare(self._batch(samples))

    def _collate_counted(self, samples) -> tuple[dict, int]:
        """A training micro-batch (``_collate``) with the Σ length² of its attention spans: each packed
        document with ``data.intra_doc_attention``, else each row (``attention_span_sq_sum``)."""
        raw = self._batch(samples)
        return self._prepare(raw), attention_span_sq_sum(raw)

    def _prepare(self, batch: dict) -> dict:
        batch = self.run.batch_transform(batch)
        return {k: v.pin_memory() if self._pin and isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _to_device(self, batch: dict) -> dict:
        """Tensors to the engine's device (asynchronously from the pinned batch: a copy from pageable memory
        would make the host wait for the GPU); document spans (tuples of ints) stay on the host."""
        device = self.engine.device
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return self.run.batch_transform.on_device(batch)

    def train_step(self, timed_out: bool) -> float:
        """One optimizer step over grad_accum micro-batches; returns the seconds spent waiting for data.

        Nothing here reads a tensor on the host: the micro-batch losses are summed on the device, and
        the step's mean loss, whether a stop was requested and whether the run timed out are pushed to
        ``self.sums`` (one asynchronous all-reduce), which ``run_loop`` reads with a lag (StepSums)."""
        r = self.run
        t0 = time.time()
        micro = self.it.next_microbatches()
        batches = [self._to_device(mb) for mb, _ in micro]
        data_wait = time.time() - t0
        loss_sum = torch.zeros((), device=self.engine.device)
        moe = [torch.zeros((), device=self.engine.device) for _ in range(3)] + [0] if self.moe else []
        skipped_before = self.engine.skipped_steps
        for b in batches:
            loss = self.engine(**b)
            if self.moe:  # the parts of this micro-batch's loss and its expert load (the model's stats)
                st = self.engine.module.stats
                moe = [moe[0] + st["lm_loss"], moe[1] + st["aux_loss"], moe[2] + st["z_loss"],
                       moe[3] + st["expert_load"].reshape(-1).double()]
            if self.rank == 0 and r.step + 1 in self.nan_steps:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            loss_sum += loss.detach()
        r.step += 1
        r.consumed_samples += r.global_batch
        # DeepSpeed (or deepspeed_compat's ZeRO-0 guard) skipped the update if any gradient was non-finite;
        # skipped_steps is a host counter DeepSpeed keeps (its own overflow check read the device).
        self.skipped[r.step] = self.engine.skipped_steps > skipped_before
        self.sums.push(r.step, [loss_sum / len(batches), self.stop.poll(), timed_out, sum(sq for _, sq in micro),
                                *[v / len(batches) for v in moe[:3]], *moe[3:]])
        return data_wait

    def _read(self, wait_through: int) -> None:
        for step, sums in self.sums.ready(wait_through):
            self._observe(step, sums)

    def _observe(self, step: int, sums: dict[str, float]) -> None:
        """A step's values summed over ranks, now on the host: its loss, non-finite accounting, stops."""
        # TP ranks hold equal losses; the S sequence-parallel ranks of a group hold parts that add up to
        # its loss: the sum over the world / (dp × tp) is the data-parallel mean.
        loss = sums["loss"] / (self.run.layout.world // self.run.layout.sp)
        self.last_loss = (step, loss)
        # The tp × sp ranks of a data-parallel group read the same samples (and see whole rows).
        self.window_span_sq += sums["attn_span_sq"] / (self.run.layout.world // self.run.layout.dp)
        if self.moe:
            self.last_moe = (step, sums)
        if self.nonfinite.observe(step, loss, self.skipped.pop(step), self._last_good):
            self.log.console(f"step {step}: non-finite loss or gradient (loss {loss}), update skipped "
                             f"({self.nonfinite.streak} in a row, {self.nonfinite.total} in this run)")
        if (sums["stop"] or sums["timeout"]) and self.stop_at is None:
            # Every rank reads this record by the same step (StepSums): stop there, all together.
            self.stop_at = min(step + StepSums.LAG, self._next_sync_step(step))
            self.exit_reason = self.stop.signal or ("exit_after_minutes" if sums["timeout"]
                                                    else "a stop request on another rank")

    def _loss_of(self, step: int) -> float | None:
        """The mean loss of ``step`` (read by now at every sync step and after the loop; None for a step
        this start did not train, e.g. a resume at max_steps)."""
        return self.last_loss[1] if self.last_loss is not None and self.last_loss[0] == step else None

    def _is_sync_step(self, step: int) -> bool:
        """Steps at which every rank reads the values of every step so far: log, eval, save and last."""
        cfg = self.cfg
        return (step % cfg.log.interval == 0 or step == cfg.train.max_steps
                or (self.run.valid_ds is not None and step % cfg.eval.interval == 0)
                or (cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0))

    def _next_sync_step(self, step: int) -> int:
        while not self._is_sync_step(step):
            step += 1
        return step

    def _last_good(self) -> str | None:
        tag = checkpoint.latest_tag(self.run.ckpt_dir)
        return str(self.run.ckpt_dir / tag) if tag else None

    def evaluate(self) -> float:
        """Mean loss over the first eval.steps × micro_batch × dp samples of the validation order."""
        r, cfg = self.run, self.cfg
        self.engine.eval()
        total = 0.0
        with torch.no_grad():
            vit = DistributedSampleIterator(r.valid_ds, cfg.train.micro_batch_size, cfg.eval.steps,
                                            r.layout.dp_rank, r.layout.dp)
            for mb in vit.next_microbatches():
                total += self.engine(**self._to_device(self._collate(mb))).item()
        self.engine.train()
        return mean_across_ranks(total / cfg.eval.steps) * r.layout.sp  # SP ranks hold parts of a loss

    def save(self, last_loss: float | None, eval_loss: float | None, final: bool = True) -> None:
        """Collective: every rank writes its DeepSpeed shards; rank 0 then marks the tag complete. With
        checkpoint.async_save a periodic (not ``final``) save returns once the state is in host memory
        and ``_finish_save`` completes it later."""
        self._finish_save(wait=True)
        r = self.run
        state = checkpoint.CheckpointState(
            step=r.step, consumed_samples=r.consumed_samples, model_config=r.model_config.to_dict(),
            config=self.cfg.to_dict(), tokenizer=r.tokenizer.record(), data_fingerprint=r.data_fingerprint,
            precision=r.precision, zero_stage=self.cfg.parallel.zero_stage, tensor_parallel=r.layout.tp,
            data_parallel=r.layout.dp, world_size=r.layout.world, global_batch_size=r.global_batch,
            sequence_parallel=r.layout.sp,
            expert_parallel=r.cfg.parallel.expert_parallel,
            train_loss=last_loss, eval_loss=eval_loss)
        t0 = time.time()
        if self.cfg.checkpoint.async_save and not final:
            self.pending_save = checkpoint.save(self.engine, r.ckpt_dir, state, background=True)
            self.log.console(f"checkpoint {r.ckpt_dir / self.pending_save.tag}: state copied in "
                             f"{time.time() - t0:.1f}s, being written in the background")
            return
        tag = checkpoint.save(self.engine, r.ckpt_dir, state)
        if self.rank == 0:
            checkpoint.prune(r.ckpt_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
            self.log.console(f"saved checkpoint {r.ckpt_dir / tag} in {time.time() - t0:.1f}s")

    def _finish_save(self, wait: bool) -> None:
        """Collective: complete a background save once every rank's writer is done (``wait``: block)."""
        p = self.pending_save
        if p is None or (not wait and mean_across_ranks(float(p.writer.done())) < 1.0):
            return
        t0 = time.time()
        tag = checkpoint.finish(p)
        self.pending_save = None
        if self.rank == 0:
            checkpoint.prune(self.run.ckpt_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
            self.log.console(f"saved checkpoint {self.run.ckpt_dir / tag} in the background "
                             f"({time.time() - p.started:.1f}s after the save began; "
                             f"{time.time() - t0:.1f}s to complete it here)")

    def _log(self, loss: float, window: dict) -> None:
        """Rank 0 logs the window's metrics (trainer/metrics.py: FLOPs, MFU and their two conventions)."""
        r, cfg = self.run, self.cfg
        dt = time.time() - window["t0"]
        step_time = dt / window["steps"]
        T = cfg.data.seq_len
        tokens = r.global_batch * T * window["steps"]
        tok_s = tokens / dt
        # PaLM convention: attention over whole rows, no causal half (the published-comparison figure).
        tflops = flops_per_token(r.model_config, T) * tok_s / r.layout.world / 1e12
        # causal_doc convention: attention as computed, each attention span's causal triangle.
        tflops_cd = causal_doc_flops(r.model_config, self.window_span_sq, tokens) / dt / r.layout.world / 1e12
        self.window_span_sq = 0.0
        m = {
            "loss": loss, "lr": self.engine.get_lr()[0], "grad_norm": _grad_norm(self.engine),
            "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / r.layout.world,
            "tflops_per_device": tflops, "tflops_per_device_causal_doc": tflops_cd, "step_time_s": step_time,
            "data_wait_frac": window["data"] / dt, "consumed_samples": r.consumed_samples,
            "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
            "nonfinite_steps": self.nonfinite.total, **memory_stats(),
        }
        peak = cfg.log.peak_tflops or detect_peak_tflops(r.precision)  # fp8: the bf16 dense peak
        if peak:
            m["mfu"] = tflops / peak
            m["mfu_causal_doc"] = tflops_cd / peak
            m["peak_tflops"] = peak
            m["mfu_peak"] = "log.peak_tflops" if cfg.log.peak_tflops else peak_precision(r.precision)
        if r.precision == "fp16":
            m["loss_scale"] = float(self.engine.optimizer.cur_scale)
        self.log.log(r.step, m)
        if self.plan is not None:  # first logged window: the prediction beside what was measured
            measured = {"measured_step_time_s": step_time}
            if torch.cuda.is_available():
                measured["measured_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.log.log(r.step, {**{k: v for k, v in self.plan.items() if v is not None}, **measured}, prefix="plan")
            self.plan = None
        if self.last_moe is not None and self.last_moe[0] == r.step:
            self.log.log(r.step, moe_metrics(self.last_moe[1], len(self.moe), r.layout.world // r.layout.sp),
                         prefix="moe")
        eta = (cfg.train.max_steps - r.step) * step_time
        self.log.console(
            f"step {r.step}/{cfg.train.max_steps} | loss {loss:.4f} | lr {m['lr']:.2e} | "
            f"{tok_s / 1e3:.1f}k tok/s | {tflops:.2f} TFLOP/s/dev ({tflops_cd:.2f} causal_doc) | "
            f"{step_time * 1e3:.0f} ms/step | "
            f"data {100 * m['data_wait_frac']:.1f}% | eta {format_eta(eta)}"
        )

    def run_loop(self) -> int:
        r, cfg = self.run, self.cfg
        if self.rank == 0 and r.step < cfg.train.max_steps:
            remove_done(r.run_dir)  # a DONE of a lower max_steps, or a stale one: this start trains on
        eval_loss = None
        window = {"t0": time.time(), "data": 0.0, "steps": 0}
        while r.step < cfg.train.max_steps and r.step != self.stop_at:
            elapsed_min = (time.time() - self.t_start) / 60
            t_step = time.time()
            window["data"] += self.train_step(cfg.train.exit_after_minutes > 0
                                              and elapsed_min > cfg.train.exit_after_minutes)
            window["steps"] += 1
            if cfg.train.compile and not self._compiled:
                # torch.compile compiles on the first call: the first step's host time is the compilation
                # (plus the one step's work it queued); the first log window's throughput includes it.
                self._compiled = True
                self.log.console(f"train.compile: {r.model_config.num_hidden_layers} decoder layers compiled; "
                                 f"first step took {time.time() - t_step:.1f}s (compilation included)")
            self._read(wait_through=r.step if self._is_sync_step(r.step) else r.step - StepSums.LAG)
            stopping = r.step == self.stop_at
            if stopping:
                self._read(wait_through=r.step)  # the stop step is logged and saved like a sync step
            if r.step % cfg.log.interval == 0 or r.step == cfg.train.max_steps or stopping:
                self._log(self._loss_of(r.step), window)
                window = {"t0": time.time(), "data": 0.0, "steps": 0}
                self._finish_save(wait=False)

            if r.valid_ds is not None and (r.step % cfg.eval.interval == 0 or r.step == cfg.train.max_steps):
                eval_loss = self.evaluate()
                ppl = math.exp(min(eval_loss, 50))
                self.log.log(r.step, {"loss": eval_loss, "perplexity": ppl}, prefix="eval")
                self.log.console(f"eval step {r.step} | loss {eval_loss:.4f} | ppl {ppl:.2f}")
            if stopping:
                break
            # No periodic save inside a non-finite streak: keep_last must not rotate out the good checkpoints.
            if (cfg.checkpoint.interval and r.step % cfg.checkpoint.interval == 0
                    and r.step < cfg.train.max_steps and self.nonfinite.streak == 0):
                self.save(self._loss_of(r.step), eval_loss, final=False)

        self._read(wait_through=r.step)
        self._finish_save(wait=True)
        if checkpoint.latest_tag(r.ckpt_dir) != checkpoint.tag_for(r.step):
            self.save(self._loss_of(r.step), eval_loss)
        # Only a stop ends the loop before max_steps; its status is the config's (0 = like a finished run).
        finished = r.step >= cfg.train.max_steps
        status = 0 if finished else cfg.train.stopped_exit_status
        if finished and self.rank == 0:  # the final checkpoint is complete (saved above or resumed from)
            write_done(r.run_dir, r.step, cfg.train.max_steps, checkpoint.latest_tag(r.ckpt_dir))
        if self.exit_reason and r.step == self.stop_at:
            self.log.console(f"stopping on {self.exit_reason} at step {r.step}: checkpoint saved, " + (
                f"exiting with status {status} (train.stopped_exit_status: stopped before train.max_steps="
                f"{cfg.train.max_steps})" if status else "exiting cleanly"))
        self.stop.consume_stop_file()
        self.it.close()
        self.log.close()
        dist.barrier()  # every rank's checkpoint files are written before any rank exits (a non-zero
        dist.destroy_process_group()  # status makes DeepSpeed's launcher terminate the others)
        global clean_exit_status
        clean_exit_status = status
        return status


def train(cfg: RunConfig) -> int:
    return Trainer(cfg).run_loop()


def _console(line: str) -> None:
    """Start-up messages (resume, universal conversion) from global rank 0 only."""
    if dist.get_rank() == 0:
        print(line, flush=True)


def _grad_norm(engine) -> float:
    g = engine.get_global_grad_norm()
    if g is None:
        return float("nan")
    return float(g.item() if torch.is_tensor(g) else g)


def moe_metrics(sums: dict, layers: int, ranks: int) -> dict[str, float]:
    """A Mixture of Experts' step record (summed over ranks) -> metrics: the loss's parts (data-parallel
    means: ``lm_loss``, the load-balancing ``aux_loss``, the router ``z_loss``, before their coefficients)
    and, per sparse layer i and over all of them, the expert load of the step: ``layer{i}/max_over_mean``
    (the busiest expert's assignments over the mean: 1 is perfect balance, E means one expert takes all)
    and ``layer{i}/busiest_share`` (its share of the layer's assignments), from every rank's tokens."""
    m = {k: sums[k] / ranks for k in ("lm_loss", "aux_loss", "z_loss")}
    load = torch.tensor(sums["expert_load"]).reshape(layers, -1)
    ratios = load.max(dim=1).values / load.mean(dim=1).clamp_min(1e-9)
    shares = load.max(dim=1).values / load.sum(dim=1).clamp_min(1e-9)
    for i, (ratio, share) in enumerate(zip(ratios.tolist(), shares.tolist())):
        m[f"layer{i}/max_over_mean"], m[f"layer{i}/busiest_share"] = ratio, share
    m["max_over_mean"] = float(ratios.max())
    return m


def planned(cfg, world: int, gpus_per_node: int, console) -> dict | None:
    """The planner's predicted peak memory (allocated, per device) and, on a GPU it knows, step time for this
    run, printed; None if it cannot plan this run (never a reason not to train: one line says why)."""
    try:
        from .plan import GPUS, predict

        gpu = None
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name().upper()
            gpu = next((spec for key, spec in GPUS.items() if key.upper() in name), None)
        p = predict(cfg, world, max(1, min(gpus_per_node, world)), gpu)
    except Exception as e:  # noqa: BLE001 - the planner must never stop a run
        console(f"plan: no prediction for this run ({type(e).__name__}: {e})")
        return None
    step = f", step {p['step_time_s']:.3f} s ({gpu.name}, lmforge plan)" if p["step_time_s"] else \
        " (no step time: not a GPU the planner knows)"
    console(f"plan: predicted peak memory {p['peak_memory_gib']:.2f} GiB allocated per device "
            f"({p['total_memory_gib']:.2f} with the allocator reserve){step}; measured at the first log step")
    return {"predicted_peak_memory_gib": p["peak_memory_gib"], "predicted_total_memory_gib": p["total_memory_gib"],
            "predicted_step_time_s": p["step_time_s"]}


DONE_FILE = "DONE"


def write_done(run_dir, step: int, max_steps: int, tag: str | None) -> None:
    """RUN_DIR/DONE: the run reached train.max_steps and ``tag`` is its final complete checkpoint (one JSON
    line: step, max_steps, checkpoint, time), written atomically. A DONE that already says this step and
    checkpoint (a start at max_steps) is kept as it is, with the time the run finished."""
    path = os.path.join(run_dir, DONE_FILE)
    try:
        with open(path) as f:
            old = json.loads(f.read())
        if old.get("step") == step and old.get("checkpoint") == tag:
            return
    except (OSError, ValueError, AttributeError):
        pass
    record = {"step": step, "max_steps": max_steps, "checkpoint": tag,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(path, json.dumps(record) + "\n")


def remove_done(run_dir) -> None:
    """Remove RUN_DIR/DONE before a start that trains: DONE means the max_steps of the start that wrote it
    was reached, and a run stopped before its own never leaves one behind."""
    try:
        os.remove(os.path.join(run_dir, DONE_FILE))
    except FileNotFoundError:
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: train(load_config(args.config, args.overrides)), prog="lmforge.trainer.train")


# The status run_loop returned after ending cleanly (0, or train.stopped_exit_status after a stop); None
# until then: a run that ended cleanly leaves through exit_skipping_teardown, whatever its status.
clean_exit_status: int | None = None


def exit_skipping_teardown(rc: int, finalize_mpi: bool = True) -> None:
    """Leave the process without the interpreter's teardown, after a run that ended cleanly (metrics and
    TensorBoard closed, checkpoints written and fsynced, process group destroyed). The teardown destroys
    C++ objects of torch, gloo and DeepSpeed whose threads can still be joinable: now and then a rank
    that had finished everything aborted there ("terminate called without an active exception", signal
    6; seen in the suite's 2-rank deepspeed and mpirun runs, about 1 run in 50-100), and its launcher
    reported the finished run as failed. A run that failed (its error already said) leaves the same way, so
    that its status is its error's (2, 3, 1), not the abort's: without ``finalize_mpi``, as MPI_Finalize may
    wait for ranks that will never get there."""
    import logging

    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun: finalize, or MPICH leaves its /dev/shm segment
    if finalize_mpi and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    code = main()
    # Finished, or stopped with its checkpoint saved (any status): everything is written; or failed, its error
    # reported (run_cli): either way the interpreter's teardown can only turn the status into an abort's.
    exit_skipping_teardown(code, finalize_mpi=code == clean_exit_status)

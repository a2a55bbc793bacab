"""Resume: choose the checkpoint, check that it fits this run, and load it — on the same or another
parallel layout.

Same layout (data-parallel size, tensor-parallel size and ZeRO stage as saved): a plain DeepSpeed load.
Another layout: ZeRO-partitioned optimizer states (and AutoTP weight shards) are laid out for the old
ranks, so the checkpoint is converted to DeepSpeed's *universal* format (one file per parameter and
state: fp32 weight, exp_avg, exp_avg_sq) and loaded with ``"checkpoint": {"load_universal": true}``.
The conversion runs automatically, once per checkpoint: global rank 0 runs
``python -m deepspeed.checkpoint.ds_to_universal`` into a staging directory and renames it to
``<tag>_universal`` next to the tag (atomic; a later resume from the same tag reuses it), while the
other ranks wait for it on the filesystem. ZeRO-0 keeps whole optimizer states on every rank, so a
ZeRO-0 checkpoint loads plainly at any data-parallel size (another tensor-parallel size is refused).
``load`` corrects two DeepSpeed 0.19.8 ZeRO-3 universal-loader bugs afterwards (per-group weight decay,
a shared Adam step counter). tests/test_resume.py: data-parallel 2 -> 1 at ZeRO-2 and ZeRO-3 continue
bitwise; AutoTP 2 -> 1 at ZeRO-1 within one fp32 ulp of the loss (sharded matmuls round differently).

The sample order is global (``DistributedSampleIterator`` continues from ``consumed_samples`` whatever
the data-parallel size), so a resumed run reads exactly the samples an uninterrupted run would, as long
as the global batch (micro batch × grad accumulation × data-parallel size) stays the same: a run that
changes it (e.g. halves the ranks without doubling ``train.grad_accum``) is refused, naming the
grad_accum that keeps it, unless ``checkpoint.allow_batch_change`` is set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig

UNIVERSAL_MARKER = "lmforge_universal.json"
_FAILED_SUFFIX = ".failed"


@dataclass
class ResumePlan:
    tag: str  # the lmforge checkpoint (its lmforge.json and RNG states)
    state: dict  # its lmforge.json
    universal: bool  # load through DeepSpeed's universal format
    reason: str  # why (for the log), "" for a same-layout load

    @property
    def load_tag(self) -> str:
        """The directory under checkpoints/ that engine.load_checkpoint reads."""
        return ckpt.universal_tag(self.tag) if self.universal else self.tag


def saved_global_batch(state: dict) -> int:
    t = state["config"]["train"]
    return state.get("global_batch_size") or t["micro_batch_size"] * t["grad_accum"] * state["data_parallel"]


def plan(cfg: RunConfig, ckpt_dir: Path, *, dp: int, tp: int, tokenizer_sha: str, data_fingerprint: str,
         global_batch: int) -> ResumePlan | None:
    """The checkpoint to resume from (None: start fresh), or a ConfigError saying why it cannot be used.
    Pure (no collective calls, no writes): every rank computes the same plan."""
    if not cfg.checkpoint.resume:
        return None
    tag = ckpt.latest_tag(ckpt_dir)
    if tag is None:
        return None
    where = ckpt_dir / tag
    state = ckpt.read_state(ckpt_dir, tag)

    changed = []
    if state["tokenizer"]["sha256"] != tokenizer_sha:
        changed.append("tokenizer")
    if state["data_fingerprint"] != data_fingerprint:
        changed.append("data (sources, seq_len, seed or number of samples)")
    if changed and not cfg.checkpoint.allow_data_change:
        raise ConfigError(
            f"{where}: refusing to resume, the {' and '.join(changed)} changed since this checkpoint; "
            "set checkpoint.allow_data_change=true to resume anyway, or use a new run_dir"
        )

    old_gb = saved_global_batch(state)
    if old_gb != global_batch and not cfg.checkpoint.allow_batch_change:
        per_step = cfg.train.micro_batch_size * dp
        hint = (f"set train.grad_accum={old_gb // per_step} to keep it" if old_gb % per_step == 0 else
                f"no grad_accum keeps it with micro_batch_size {cfg.train.micro_batch_size} × data-parallel "
                f"{dp}; change train.micro_batch_size")
        raise ConfigError(
            f"{where}: saved with global batch {old_gb}, this run has {global_batch} (micro_batch_size "
            f"{cfg.train.micro_batch_size} × grad_accum {cfg.train.grad_accum} × data-parallel {dp}); {hint}, "
            "or set checkpoint.allow_batch_change=true to continue the same sample sequence in steps of "
            f"{global_batch} (the LR schedule counts optimizer steps)"
        )

    old = (state["data_parallel"], state["tensor_parallel"], state["zero_stage"])
    new = (dp, tp, cfg.parallel.zero_stage)
    if old == new:
        return ResumePlan(tag, state, universal=False, reason="")
    reason = (f"saved with data-parallel {old[0]} × tensor-parallel {old[1]}, ZeRO-{old[2]}; "
              f"now {new[0]} × {new[1]}, ZeRO-{new[2]}")
    if old[2] == 0 and new[2] == 0 and old[1] == new[1]:
        # ZeRO-0: every rank holds the whole optimizer state in mp_rank_*_model_states.pt.
        return ResumePlan(tag, state, universal=False, reason=reason)
    if old[2] == 0 or new[2] == 0:
        raise ConfigError(
            f"{where}: {reason}. DeepSpeed's universal checkpoints (needed to change the layout) exist for "
            "ZeRO stages 1-3 only; resume with parallel.zero_stage=0 and the saved tensor-parallel size, "
            "or start the new layout from exported weights (model.init_from_hf)"
        )
    return ResumePlan(tag, state, universal=True, reason=reason)


def ds_config_for(plan: ResumePlan | None, ds_config: dict) -> dict:
    """DeepSpeed reads ``load_universal`` at engine construction, so it goes into the JSON."""
    if plan is not None and plan.universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config


def prepare(plan: ResumePlan | None, ckpt_dir: Path, log=print, poll_s: float = 2.0) -> None:
    """Collective. Make ``plan.load_tag`` exist: global rank 0 converts, the others wait for the result.

    The wait polls the filesystem rather than sitting in a barrier: a large model's conversion can take
    longer than the process group's collective timeout.
    """
    if plan is None or not plan.universal:
        return
    out = ckpt_dir / plan.load_tag
    failed = ckpt_dir / f".{plan.load_tag}{_FAILED_SUFFIX}"
    if dist.get_rank() == 0:
        if universal_complete(out, plan.tag):
            log(f"reusing universal checkpoint {out}")
        else:
            failed.unlink(missing_ok=True)
            try:
                convert_to_universal(ckpt_dir, plan.tag, log=log)
            except Exception as e:
                ckpt.atomic_write_text(failed, str(e))
                raise
    else:
        while not universal_complete(out, plan.tag):
            if failed.is_file():
                raise RuntimeError(f"universal conversion of {ckpt_dir / plan.tag} failed on rank 0: "
                                   f"{failed.read_text()}")
            time.sleep(poll_s)
    dist.barrier()


def universal_complete(out: Path, tag: str) -> bool:
    marker = out / UNIVERSAL_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("source_tag") == tag


def convert_to_universal(ckpt_dir: Path, tag: str, log=print, workers: int | None = None) -> Path:
    """Convert checkpoints/<tag> into checkpoints/<tag>_universal (atomically). Single process."""
    return ds_to_universal(ckpt_dir / tag, ckpt_dir / ckpt.universal_tag(tag), log=log, workers=workers)


def ds_to_universal(src: Path, out: Path, log=print, workers: int | None = None) -> Path:
    """Run DeepSpeed's converter on the checkpoint tag folder ``src``; ``out`` appears only when complete
    (with UNIVERSAL_MARKER naming the source tag). Single process."""
    # The converter also writes a `latest_universal` file next to its output folder: give it a private
    # parent so nothing lands beside `out` except the finished directory.
    for stale in out.parent.glob(f".{out.name}.staging.*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.staging.{os.getpid()}"
    staging.mkdir()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(staging / out.name), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2)),
           # Our model sets no UNIVERSAL_CHECKPOINT_INFO of its own (no Megatron-style vocab padding or
           # fused QKV to describe); AutoTP checkpoints carry DeepSpeed's, which this does not replace.
           "--inject_missing_state"]
    log(f"converting {src} to a DeepSpeed universal checkpoint ...")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (staging / "convert.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {src} (exit {proc.returncode}); log in "
                           f"{staging / 'convert.log'}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    shutil.move(str(staging / "convert.log"), staging / out.name / "convert.log")
    ckpt.atomic_write_text(staging / out.name / UNIVERSAL_MARKER,
                           json.dumps({"source_tag": src.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging / out.name, out)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"universal checkpoint {out} written in {time.time() - t0:.1f}s")
    return out


def load(engine, plan: ResumePlan, ckpt_dir: Path, rank: int) -> tuple[int, int]:
    """Load weights, optimizer, LR schedule and this rank's RNG states. Returns (step, consumed_samples)."""
    groups = _group_specific_hyperparams(engine.optimizer)
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=plan.load_tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / plan.load_tag}")
    if plan.universal:
        # DeepSpeed 0.19.8's ZeRO-3 universal loader copies param_groups[0]'s hyperparameters into every
        # group, which gives the no-decay group (norms) weight decay. Restore the values that differ
        # between our groups (weight_decay); the rest (lr, betas, ...) are the same in all groups.
        for group, specific in zip(engine.optimizer.param_groups, groups, strict=True):
            group.update(specific)
        # DeepSpeed 0.19.8's ZeRO-3 universal loader (stage3.load_hp_checkpoint_state_from_checkpoint_dir_
        # stage3) assigns one and the same `step` tensor to every flat fp32 partition's Adam state. ZeRO-3
        # calls optimizer.step() once per sub-group and torch's Adam increments `step` in place, so with
        # two param groups the shared counter advances twice per optimizer step: the second group's bias
        # correction runs ahead (measured on a 2->1 rank resume: losses off by 2.4e-7, then 9.4e-5
        # relative, growing). Give every state its own counter; the values loaded were right.
        _unshare_step_counters(engine.optimizer)
    # RNG states are per rank and follow the rank index; a rank the saving run did not have keeps its
    # seeded state (the sample order does not depend on it).
    ckpt.load_rng(ckpt_dir, plan.tag, rank)
    return plan.state["step"], plan.state["consumed_samples"]


def _unshare_step_counters(optimizer) -> int:
    """Give each optimizer state that shares its ``step`` tensor with another state a copy of its own.
    Returns how many were copied. ``optimizer`` is DeepSpeed's wrapper or the torch optimizer itself."""
    inner = getattr(optimizer, "optimizer", optimizer)
    seen: set[int] = set()
    copied = 0
    for state in inner.state.values():
        step = state.get("step")
        if not torch.is_tensor(step):
            continue  # an int counter (e.g. DeepSpeed's CPU Adam) is never shared in place
        if id(step) in seen:
            state["step"] = step.clone()
            copied += 1
        else:
            seen.add(id(step))
    return copied


def _group_specific_hyperparams(optimizer) -> list[dict]:
    """Per param group, the hyperparameters whose values differ between groups (as constructed)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    keys = {k for g in groups for k in g if any(g.get(k) != other.get(k) for other in groups)}
    return [{k: g[k] for k in keys if k in g} for g in groups]

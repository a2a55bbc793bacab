"""Resume: choose the checkpoint, check that it fits this run, and load it — on the same or another
parallel layout.

Same layout (data-parallel size, tensor-parallel size and ZeRO stage as saved): a plain DeepSpeed load.
Another layout: ZeRO-partitioned optimizer states (and AutoTP weight shards) are laid out for the old
ranks, so the checkpoint is converted to DeepSpeed's *universal* format (``universal.py``) and loaded
with ``"checkpoint": {"load_universal": true}``. ZeRO-0 keeps whole optimizer states on every rank, so
a ZeRO-0 checkpoint loads plainly at any data-parallel size (another tensor-parallel size is refused).
``load`` corrects DeepSpeed 0.19.8's ZeRO-3 universal-loader bugs afterwards
(``deepspeed_compat.fix_universal_load``). tests/test_resume.py: data-parallel 2 -> 1 at ZeRO-2 and
ZeRO-3 continue bitwise; AutoTP 2 -> 1 at ZeRO-1 within one fp32 ulp of the loss.

The sample order is global (``DistributedSampleIterator`` continues from ``consumed_samples`` whatever
the data-parallel size), so a resumed run reads exactly the samples an uninterrupted run would, as long
as the global batch (micro batch × grad accumulation × data-parallel size) stays the same: a run that
changes it (e.g. halves the ranks without doubling ``train.grad_accum``) is refused, naming the
grad_accum that keeps it, unless ``checkpoint.allow_batch_change`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, RunConfig
from ..parallel import deepspeed_compat
from .save import load_rng
from .state import CheckpointState, read_state
from .tags import latest_tag, universal_tag
from .universal import ensure_universal


@dataclass
class ResumePlan:
    tag: str  # the lmforge checkpoint (its lmforge.json and RNG states)
    state: CheckpointState
    universal: bool  # load through DeepSpeed's universal format
    reason: str  # why (for the log), "" for a same-layout load

    @property
    def load_tag(self) -> str:
        """The directory under checkpoints/ that engine.load_checkpoint reads."""
        return universal_tag(self.tag) if self.universal else self.tag


_LATEST = object()


def plan(cfg: RunConfig, ckpt_dir: Path, *, dp: int, tp: int, tokenizer_sha: str, data_fingerprint: str,
         global_batch: int, sp: int = 1, tag: str | None | object = _LATEST) -> ResumePlan | None:
    """The checkpoint to resume from (None: start fresh), or a ConfigError saying why it cannot be used.
    ``tag``: the one every rank agreed on (``integrity.newest_intact``, rank 0's choice; default: the
    latest complete tag as this process sees it). Pure (no collective calls, no writes)."""
    if not cfg.checkpoint.resume:
        return None
    if tag is _LATEST:
        tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    where = ckpt_dir / tag
    state = read_state(where)

    changed = []
    if state.tokenizer.sha256 != tokenizer_sha:
        changed.append("tokenizer")
    if state.data_fingerprint != data_fingerprint:
        changed.append("data (sources, seq_len, seed or number of samples)")
    if changed and not cfg.checkpoint.allow_data_change:
        raise ConfigError(
            f"{where}: refusing to resume, the {' and '.join(changed)} changed since this checkpoint; "
            "set checkpoint.allow_data_change=true to resume anyway, or use a new run_dir"
        )

    old_gb = state.saved_global_batch()
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

    old_ep, new_ep = state.expert_parallel, cfg.parallel.expert_parallel
    if bool(old_ep) != bool(new_ep):
        saved, now = (f"expert parallel {e} (DeepSpeed AutoEP)" if e else "the reference experts"
                      for e in (old_ep, new_ep))
        raise ConfigError(
            f"{where}: saved with {saved}, this run uses {now}: their parameters are laid out differently "
            f"(AutoEP's router.gate / experts.w1-w3 against gate / experts.gate_up_proj); resume with "
            f"parallel.expert_parallel={old_ep}, or export this checkpoint (python -m lmforge.trainer.export_hf) "
            "and start from it with model.init_from_hf"
        )
    old = (state.data_parallel, state.tensor_parallel, state.zero_stage, state.sequence_parallel, old_ep)
    new = (dp, tp, cfg.parallel.zero_stage, sp, new_ep)
    if old == new:
        return ResumePlan(tag, state, universal=False, reason="")
    reason = (f"saved with data-parallel {old[0]} × tensor-parallel {old[1]} × sequence-parallel {old[3]}, "
              f"ZeRO-{old[2]}; now {new[0]} × {new[1]} × {new[3]}, ZeRO-{new[2]}")
    if old_ep != new_ep:
        reason += f"; expert parallel {old_ep} -> {new_ep}"
    if old[2] == 0 and new[2] == 0 and old[1] == new[1] and old_ep == new_ep:
        # ZeRO-0: every rank holds the whole optimizer state in mp_rank_*_model_states.pt.
        return ResumePlan(tag, state, universal=False, reason=reason)
    if old[2] == 0 or new[2] == 0:
        raise ConfigError(
            f"{where}: {reason}. DeepSpeed's universal checkpoints (needed to change the layout) exist for "
            "ZeRO stages 1-3 only; resume with parallel.zero_stage=0 and the saved tensor-parallel and "
            "expert-parallel sizes, or start the new layout from exported weights (model.init_from_hf)"
        )
    return ResumePlan(tag, state, universal=True, reason=reason)


def ds_config_for(plan: ResumePlan | None, ds_config: dict) -> dict:
    """DeepSpeed reads ``load_universal`` at engine construction, so it goes into the JSON."""
    if plan is not None and plan.universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config


def prepare(plan: ResumePlan | None, ckpt_dir: Path, log=print) -> None:
    """Collective: make what ``plan`` loads exist (the universal conversion, made once per tag)."""
    if plan is not None and plan.universal:
        ensure_universal(ckpt_dir, plan.tag, log=log)


def load(engine, plan: ResumePlan, ckpt_dir: Path, rank: int) -> tuple[int, int]:
    """Load weights, optimizer, LR schedule and this rank's RNG states. Returns (step, consumed_samples)."""
    specific = deepspeed_compat.group_specific_hyperparams(engine.optimizer)
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=plan.load_tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / plan.load_tag}")
    if plan.universal:
        deepspeed_compat.fix_universal_load(engine.optimizer, specific)
    # RNG states are per rank and follow the rank index; a rank the saving run did not have keeps its
    # seeded state (the sample order does not depend on it).
    load_rng(ckpt_dir / plan.tag, rank)
    return plan.state.step, plan.state.consumed_samples

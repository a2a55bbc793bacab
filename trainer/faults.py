"""Non-finite steps: skip them, count them, abort after too many in a row.

A non-finite loss or gradient must not reach the weights. DeepSpeed already refuses such steps in most
layouts: its ZeRO-1/2/3 optimizers treat a non-finite global gradient norm as an overflow in fp32, bf16
(``bf16.check_grad_overflow``, default true) and fp16 alike, skip ``optimizer.step()``, drop the
gradients and count ``engine.skipped_steps`` (the LR schedule does not advance on a skipped step, as in
Megatron); fp16 without ZeRO uses its loss scaler's overflow check. The one layout without a check is
ZeRO-0 in fp32/bf16 (a plain torch optimizer), which ``deepspeed_compat.install_nonfinite_guard`` covers
the same way.

A non-finite loss always yields non-finite gradients (the loss is back-propagated and averaged across
ranks), so "skipped by DeepSpeed" is the one signal the loop needs. In fp16 the loss scaler also skips
steps that merely overflowed the scale (normal early in training): there only steps whose *loss* is
non-finite count toward ``train.max_nonfinite_steps``.

Testing hook: ``LMFORGE_INJECT_NAN_AT_STEP=3`` (or ``3,5-7``) multiplies global rank 0's loss by NaN in
those optimizer steps (1-based), before backward. It exists only so the tests can exercise this path in
a real run; it is read once at start-up and logged when set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from lmforge.common.errors import InputError, TrainingAborted

INJECT_ENV = "LMFORGE_INJECT_NAN_AT_STEP"


class NonFiniteError(TrainingAborted):
    """Too many consecutive non-finite steps (exit 3); the message names the last good checkpoint."""


def injected_nan_steps() -> frozenset[int]:
    raw = os.environ.get(INJECT_ENV, "").strip()
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in raw.split(","))):
        lo, _, hi = part.partition("-")
        try:
            steps.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise InputError(f"{INJECT_ENV}={raw!r}: expected step numbers like 3 or 3,5-7") from None
    return frozenset(steps)


class NonFiniteTracker:
    """Counts non-finite steps and raises NonFiniteError after ``max_consecutive`` in a row (0 = never)."""

    def __init__(self, max_consecutive: int, precision: str):
        self.max_consecutive = max_consecutive
        self.precision = precision
        self.total = 0
        self.streak = 0

    def observe(self, step: int, loss: float, skipped: bool, last_good: Callable[[], str | None]) -> bool:
        """Record optimizer step ``step``; returns True if it was non-finite (and therefore skipped).
        ``skipped``: DeepSpeed did not apply the update. ``last_good()``: the checkpoint a restart would
        resume from (called only for the error message)."""
        nonfinite = not math.isfinite(loss) or (skipped and self.precision != "fp16")
        if not nonfinite:
            self.streak = 0
            return False
        if not skipped:
            # Should be impossible (a non-finite loss gives non-finite gradients); never continue
            # silently from weights that may have been updated with garbage.
            raise NonFiniteError(f"step {step}: non-finite loss {loss} but the optimizer step was applied; "
                                 f"resume from the last good checkpoint ({last_good() or 'none yet'})")
        self.total += 1
        self.streak += 1
        if self.max_consecutive and self.streak >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: {self.streak} consecutive optimizer steps with a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={self.max_consecutive}); aborting without saving. The weights "
                f"were not updated by those steps; last good checkpoint: {last_good() or 'none yet'}. Check "
                "the data of these steps, lower optim.lr, or raise optim.warmup_steps before resuming"
            )
        return True

"""The learning-rate schedule: linear warmup, then cosine, linear, warmup-stable-decay or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

from .config import RunConfig


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    """Multiplier of ``optim.lr`` after ``step`` optimizer steps (``torch.optim.lr_scheduler.LambdaLR``
    semantics). A step DeepSpeed skips (non-finite gradients) does not advance it."""
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

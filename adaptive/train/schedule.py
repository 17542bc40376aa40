"""Learning-rate schedules as a multiplier of the peak rate, a pure function of the step."""

from __future__ import annotations

import math

from adaptive.train.config import TrainConfig


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based) of ``total``.

    All schedules warm up linearly over ``warmup_fraction`` of the steps (reaching 1 at the end of
    warmup), then: ``wsd`` holds 1 and decays linearly to ``min_lr_ratio`` over the last
    ``decay_fraction``; ``cosine`` follows a half cosine down to ``min_lr_ratio``; ``constant`` holds 1.
    """
    warmup = int(round(cfg.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total - warmup)
        t = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    decay = int(round(cfg.decay_fraction * total))
    decay_start = total - decay
    if step < decay_start or decay == 0:
        return 1.0
    t = min(1.0, (step - decay_start + 1) / (decay + 1))  # every decay step keeps a positive rate
    return 1.0 - (1.0 - floor) * t


def apply_lr(optimizer, step: int, total: int, cfg: TrainConfig) -> float:
    """Set every parameter group's rate for ``step``; the schedule's whole state is the step count."""
    lr = cfg.lr * lr_factor(step, total, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr

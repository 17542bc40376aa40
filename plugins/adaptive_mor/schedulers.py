"""Depth schedules for MoR: capacities as a function of training progress."""

from __future__ import annotations

import math

from pydantic import Field

from adaptive import ComponentConfig, DepthScheduler


class CapacityWarmupConfig(ComponentConfig):
    warmup_fraction: float = Field(default=0.1, gt=0, le=1,
                                   description="fraction of training over which capacities fall from 1.0 to the base")


class CapacityWarmup(DepthScheduler):
    """Cosine capacity warm-up: every step keeps all tokens at the start, the base capacities after warm-up.

    ``c(p) = c_base + (1 - c_base) * (1 + cos(pi * min(1, p / warmup_fraction))) / 2``; progress None
    (evaluation, inference) gives the base capacities. Monotone in ``c_base``, so non-increasing base
    capacities stay non-increasing at every point of the schedule.
    """

    name = "capacity_warmup"
    Config = CapacityWarmupConfig

    def capacities(self, base: list[float], progress: float | None) -> list[float]:
        if progress is None:
            return list(base)
        ratio = min(1.0, max(0.0, progress) / self.config.warmup_fraction)
        decay = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return [c + (1.0 - c) * decay for c in base]

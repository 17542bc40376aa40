"""Routing statistics over many forwards: depth histogram, per-step selected fraction, sampling accuracy.

``add_causal`` takes the stats of a forward under the causal inference rule (what evaluation and decoding
run): the depth each token ran and the share of real tokens each step kept. ``add_training_rule`` takes the
stats of the same tokens under the training rule, for routers whose training rule is not causal
(expert-choice top-k): their ``sampling_acc/step<r>`` metric is the share of the step's eligible tokens on
which the causal rule agrees with top-k membership (the paper's 99.2% figure); it is averaged here
weighted by the number of eligible tokens, i.e. the tokens top-k kept at the previous step.

Shapes: B batch rows, T positions.
"""

from __future__ import annotations

from typing import Any

import torch

from adaptive.interfaces import RoutingStats
from adaptive.model.transformer import AdaptiveLM
from adaptive.train.metrics import StepAccumulator, routing_summary

Tensor = torch.Tensor


class RoutingTally:
    def __init__(self, model: AdaptiveLM):
        plan = model.plan
        self.num_steps = plan.num_steps
        self.layers_per_step = len(plan.steps[0]) if plan.steps else 0
        self.fixed_layers = len(plan.prelude) + len(plan.coda)
        self.capacities = model.engine.scheduler.capacities(model.router.base_capacities(), None) if plan.steps else []
        self.hierarchical = model.router.hierarchical  # False: each step chooses among all tokens (MoD)
        self.depth = StepAccumulator()  # the trainer's depth histogram, reused
        self.selected_R = torch.zeros(self.num_steps, dtype=torch.float64)
        self.tokens = 0.0
        self.agree_R = torch.zeros(self.num_steps, dtype=torch.float64)
        self.eligible_R = torch.zeros(self.num_steps, dtype=torch.float64)
        self.has_sampling = False

    def add_causal(self, stats: RoutingStats) -> None:
        """Stats of a causal-rule forward on rows without padding."""
        if not self.num_steps:
            return
        self.depth.add_stats(stats)
        for r, selected_BT in enumerate(stats.selected_per_step):  # a step no token reached is absent: 0
            self.selected_R[r] += float(selected_BT.sum())
        self.tokens += float(stats.selected_per_step[0].numel())

    def add_training_rule(self, stats: RoutingStats) -> None:
        """Stats of a training-rule forward (top-k) on rows without padding."""
        for r in range(self.num_steps):
            acc = stats.metrics.get(f"sampling_acc/step{r}")
            if acc is None:
                continue
            nested = r and self.hierarchical  # the tokens step r chose among: those that ran step r-1, or all
            active_BT = stats.selected_per_step[r - 1] if nested else torch.ones_like(stats.selected_per_step[0])
            eligible = float(active_BT.sum())
            self.agree_R[r] += float(acc) * eligible
            self.eligible_R[r] += eligible
            self.has_sampling = True

    def summary(self) -> dict[str, Any]:
        """``num_steps``, ``capacities``, ``mean_depth``, ``depth_hist`` (share of tokens that ran 0..R steps),
        ``mean_layers`` (logical layers a token ran), ``selected_frac`` (per step), ``sampling_acc`` (per
        step, or None) and ``sampling_acc_routed`` (over the steps whose capacity is below 1)."""
        out: dict[str, Any] = {"num_steps": self.num_steps, "capacities": [round(c, 4) for c in self.capacities],
                               "mean_depth": None, "depth_hist": None, "mean_layers": float(self.fixed_layers),
                               "selected_frac": [], "sampling_acc": None, "sampling_acc_routed": None}
        if not self.num_steps or self.depth.depth_hist is None:
            return out
        out.update(routing_summary(self.depth.depth_hist.tolist()))
        out["mean_layers"] = self.fixed_layers + out["mean_depth"] * self.layers_per_step
        out["selected_frac"] = (self.selected_R / max(self.tokens, 1.0)).tolist()
        if self.has_sampling:
            per_step = self.agree_R / self.eligible_R.clamp(min=1.0)
            out["sampling_acc"] = [float(a) if e else None for a, e in zip(per_step, self.eligible_R)]
            routed = [r for r, c in enumerate(self.capacities) if c < 1.0 and self.eligible_R[r] > 0]
            if routed:
                out["sampling_acc_routed"] = float(self.agree_R[routed].sum() / self.eligible_R[routed].sum())
        return out

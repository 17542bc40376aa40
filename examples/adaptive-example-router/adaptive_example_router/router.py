"""A per-token linear threshold router, causal by construction.

At recursion step r a token continues iff ``sigmoid(w_r . h + b_r) > threshold``, and the step's update
is gated by ``alpha * sigmoid(w_r . h + b_r)``. The decision for a token looks only at that token's own
hidden state, so it never depends on later tokens: the same rule serves training, evaluation and cached
decoding. How many tokens continue is data-dependent (``num_selected=None``); the depth scheduler's
capacity is not used. Shapes: B batch, T tokens, D model width.

docs/plugins.md shows this file from its imports on, verbatim (tests/test_plugin_docs.py checks it).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from adaptive import ComponentConfig, RouteContext, RouteDecision, Router


class LinearThresholdConfig(ComponentConfig):
    alpha: float = Field(default=1.0, gt=0, description="gate scale: gate = alpha * sigmoid(score)")
    threshold: float = Field(default=0.5, gt=0, lt=1, description="a token continues iff sigmoid(score) > threshold")
    initial_keep: float = Field(default=0.9, gt=0, lt=1,
                                description="sigmoid(score) at initialisation (sets the bias), so training starts deep")


class LinearThresholdRouter(Router):
    """Per-token linear threshold: continue iff sigmoid(w.h) > threshold, gate alpha * sigmoid(w.h)."""

    name = "linear_threshold"
    Config = LinearThresholdConfig
    causal_in_training = True  # each token's decision looks only at its own hidden state
    uses_capacity = False  # a token continues on its own score; capacity schedules do not apply

    def __init__(self, config: LinearThresholdConfig, *, d_model: int, num_steps: int):
        super().__init__(config, d_model=d_model, num_steps=num_steps)
        self.scorers = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(num_steps))
        self.reset_parameters()  # a standalone router is initialised too

    def reset_parameters(self) -> None:
        """The init contract: AdaptiveLM.reset_parameters calls this after its generic init."""
        keep = self.config.initial_keep
        for scorer in self.scorers:
            nn.init.normal_(scorer.weight, std=0.02)
            nn.init.constant_(scorer.bias, math.log(keep / (1 - keep)))

    def base_capacities(self) -> list[float]:
        """What the accountant (`adaptive flops`) counts: at initialisation each step keeps about
        initial_keep of the tokens that reached it."""
        return [self.config.initial_keep ** (step + 1) for step in range(self.num_steps)]

    def route(self, hidden_BTD: torch.Tensor, ctx: RouteContext) -> RouteDecision:
        logits_BT = self.scorers[ctx.step](hidden_BTD).squeeze(-1)  # every (B, T) token; > 0 leans to continue
        probs_BT = torch.sigmoid(logits_BT.to(torch.promote_types(logits_BT.dtype, torch.float32)))  # never below fp32
        selected_BT = (probs_BT > self.config.threshold) & ctx.active_BT
        kept = selected_BT.sum() / ctx.active_BT.sum().clamp(min=1)
        return RouteDecision(
            selected_BT=selected_BT,
            gate_BT=self.config.alpha * probs_BT,
            num_selected=None,  # a data-dependent count
            logits_BT=logits_BT,
            metrics={"kept_fraction": kept.detach()},
        )

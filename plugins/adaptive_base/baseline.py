"""Baseline parts: the router that keeps every token, the full KV policy, the constant schedule."""

from __future__ import annotations

import torch

from adaptive import ComponentConfig, DepthScheduler, KVPolicy, RouteContext, RouteDecision, Router


class AllTokens(Router):
    """Every token runs every recursion step with gate 1 (the recursive baseline; no routing)."""

    name = "all"
    Config = ComponentConfig
    uses_capacity = False

    def route(self, hidden_BTD: torch.Tensor, ctx: RouteContext) -> RouteDecision:
        B, T, _ = hidden_BTD.shape
        return RouteDecision(selected_BT=ctx.active_BT, gate_BT=hidden_BTD.new_ones(B, T), num_selected=T)


class FullKV(KVPolicy):
    """Every token writes keys/values at every step, exited ones from their frozen state (vanilla)."""

    name = "full"
    Config = ComponentConfig

    def writes(self, step):
        return "all"

    def reads(self, step):
        return (step,)


class Constant(DepthScheduler):
    """The router's base capacities, unchanged over training."""

    name = "constant"
    Config = ComponentConfig

    def capacities(self, base, progress):
        return list(base)

"""Mixture-of-Depths routing (Raposo et al., 2024; SPEC §3): at each routed step (a layer, with the
``per_layer`` scheme) a linear router scores every token and the top-k (``capacity`` of the sequence) run
the step; the others skip it unchanged. A kept token's update is ``x + r * f(x)``, ``f(x)`` the step's
change to the hidden state (attention and FFN, residuals excluded) and ``r`` the router weight, so the
router is trained by the language-model loss through ``r``. Steps not routed run every token, ungated.

Each routed step chooses *independently* among all tokens (``hierarchical = False``): a token skipped at one
step may run the next, unlike MoR's hierarchical filtering.

Top-k over the sequence is not causal, so outside training a token runs a routed step iff its causal score
is positive (sigmoid > 0.5): the router logit itself, trained towards top-k membership by a BCE loss
(``causal_rule: bce``), or an auxiliary MLP predictor on detached hidden states trained by that BCE alone
(``aux_router``). Evaluation, full forwards without the training rule and cached decoding all use it.

Shape legend: B batch, T tokens, D model width, K tokens that ran the step.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from adaptive import ComponentConfig, RouteContext, RouteDecision, Router
from adaptive_mor.common import capacity_count, linear_flops, make_head, masked_mean, upcast
from adaptive_mor.topk import docs_bound, top_k_docs, top_k_rows

Tensor = torch.Tensor


class MoDConfig(ComponentConfig):
    capacity: float = Field(default=0.125, gt=0, le=1, description="fraction of the sequence each routed step "
                            "keeps in training (top-k, k = max(1, floor(T*capacity)))")
    routed_steps: Literal["every_other", "all"] | list[int] = Field(
        default="every_other", description="the steps that route: every_other (steps 1, 3, 5, ...: every other "
        "layer, the first one dense), all, or a list of 0-based steps; the other steps run every token")
    gate: Literal["sigmoid", "linear"] = Field(
        default="sigmoid", description="router weight r in x + r*f(x): sigmoid(logit), or the raw logit (the "
        "paper's form, unbounded)")
    causal_rule: Literal["bce", "aux_router"] = Field(
        default="bce", description="inference rule: bce (run iff sigmoid(logit) > 0.5, the router trained towards "
        "top-k membership) or aux_router (a separate MLP on detached hidden states predicts membership)")
    bce_coef: float = Field(default=0.01, ge=0, description="coefficient of the membership BCE loss (on the "
                            "router logits for bce, on the auxiliary predictor's for aux_router)")
    doc_quota: Literal["floor", "at_least_one"] = Field(
        default="floor", description="with packed documents each keeps floor(n*capacity) tokens (static bound, no "
        "host sync), or max(1, floor(n*capacity)) (one host sync per routed step)")

    @field_validator("routed_steps")
    @classmethod
    def _check_steps(cls, value):
        if isinstance(value, list):
            if not value or any(s < 0 for s in value) or len(set(value)) != len(value):
                raise ValueError(f"routed_steps: give distinct 0-based step indices (or every_other, all), got {value}")
        return value


class MoDRouter(Router):
    """Mixture-of-Depths router: per routed step, top-k of all tokens in training, a causal rule outside it.

    Every routed step chooses independently of the others (``hierarchical = False``)."""

    name = "mod"
    Config = MoDConfig
    causal_in_training = False
    hierarchical = False

    def __init__(self, config: MoDConfig, *, d_model: int, num_steps: int):
        super().__init__(config, d_model=d_model, num_steps=num_steps)
        self.routed = routed_steps(config.routed_steps, num_steps)
        if config.bce_coef == 0:
            warnings.warn(f"router mod: bce_coef=0, so the causal inference rule ({config.causal_rule}) is never "
                          "trained; evaluation and decoding will route with an untrained rule", stacklevel=2)
        self.head_of = {step: i for i, step in enumerate(self.routed)}
        self.heads = nn.ModuleList(make_head("linear", d_model, 1) for _ in self.routed)
        self.aux_heads = None
        if config.causal_rule == "aux_router":
            self.aux_heads = nn.ModuleList(make_head("mlp", d_model, 1) for _ in self.routed)

    def base_capacities(self) -> list[float]:
        return [self.config.capacity if step in self.head_of else 1.0 for step in range(self.num_steps)]

    def flops_per_token(self, step: int) -> int:
        """Every token is scored at a routed step (the auxiliary predictor too, when there is one)."""
        head = self.head_of.get(step)
        if head is None:
            return 0
        return linear_flops(self.heads[head]) + (linear_flops(self.aux_heads[head]) if self.aux_heads else 0)

    # ------------------------------------------------------------------ routing

    def route(self, hidden_BTD: Tensor, ctx: RouteContext) -> RouteDecision:
        B, T, _ = hidden_BTD.shape
        head = self.head_of.get(ctx.step)
        if head is None:  # a dense step: every token runs it, ungated
            return RouteDecision(ctx.active_BT, hidden_BTD.new_ones(B, T), num_selected=T)
        logit_BT = upcast(self.heads[head](hidden_BTD))[..., 0]
        gate_BT = torch.sigmoid(logit_BT) if self.config.gate == "sigmoid" else logit_BT
        causal_BT = logit_BT
        if self.aux_heads is not None:
            causal_BT = upcast(self.aux_heads[head](hidden_BTD.detach()))[..., 0]
        if ctx.training_rule:
            return self.route_top_k(logit_BT, gate_BT, causal_BT, ctx)
        # at full capacity the top-k keeps every token, so the causal rule does too
        selected_BT = ctx.active_BT if ctx.capacity >= 1.0 else ctx.active_BT & (causal_BT > 0)
        metrics = {"selected_frac": masked_mean(selected_BT.float(), ctx.valid_BT)}
        return RouteDecision(selected_BT, gate_BT, logits_BT=logit_BT, metrics=metrics)

    def route_top_k(self, logit_BT: Tensor, gate_BT: Tensor, causal_BT: Tensor, ctx: RouteContext) -> RouteDecision:
        T = logit_BT.shape[1]
        eligible_BT = ctx.active_BT & ctx.valid_BT
        num_selected = max_selected = None
        if ctx.doc_ids_BT is not None:
            at_least_one = self.config.doc_quota == "at_least_one"
            selected_BT = top_k_docs(logit_BT.detach(), eligible_BT, ctx.valid_BT, ctx.doc_ids_BT, ctx.capacity,
                                     at_least_one)
            max_selected = None if at_least_one else docs_bound(T, ctx.capacity)
        else:
            num_selected = capacity_count(T, ctx.capacity)
            selected_BT = top_k_rows(logit_BT.detach(), ctx.active_BT, ctx.valid_BT, num_selected)
        member_BT = selected_BT & eligible_BT
        aux = {}
        if self.config.bce_coef > 0:
            bce_BT = F.binary_cross_entropy_with_logits(causal_BT, member_BT.to(causal_BT.dtype), reduction="none")
            aux["router_bce"] = self.config.bce_coef * masked_mean(bce_BT, eligible_BT)
        agree_BT = ((causal_BT > 0) == member_BT).to(logit_BT.dtype)
        metrics = {"selected_frac": masked_mean(selected_BT.float(), ctx.valid_BT),
                   "sampling_acc": masked_mean(agree_BT, eligible_BT)}
        return RouteDecision(selected_BT, gate_BT, num_selected=num_selected, max_selected=max_selected,
                             logits_BT=logit_BT, aux_losses=aux, metrics=metrics)

    # ------------------------------------------------------------------ update

    def combine(self, hidden_KD: Tensor, block_out_KD: Tensor, gate_K: Tensor, first_KD: Tensor, step: int) -> Tensor:
        """Routed step: ``x + r * (f_out - x)`` (``f_out`` the step's output, so ``f_out - x`` is its change);
        dense step: the step's output itself, as in a vanilla layer."""
        if step not in self.head_of:
            return block_out_KD
        return super().combine(hidden_KD, block_out_KD, gate_K, first_KD, step)


def routed_steps(choice: str | list[int], num_steps: int) -> list[int]:
    """The 0-based steps ``routed_steps`` names, for a model with ``num_steps`` steps."""
    if choice == "every_other":
        steps = list(range(1, num_steps, 2))
        if not steps:
            warnings.warn(f"router mod: routed_steps=every_other routes steps 1, 3, ...; a model with {num_steps} "
                          "step routes none, so every token runs every step", stacklevel=3)
        return steps
    if choice == "all":
        return list(range(num_steps))
    beyond = [s for s in choice if s >= num_steps]
    if beyond:
        raise ValueError(f"router mod: routed_steps {beyond} do not exist in a model with {num_steps} steps "
                         f"(valid: 0..{num_steps - 1})")
    return sorted(choice)

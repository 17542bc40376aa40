"""Expert-choice routing (SPEC §2.2): at each recursion step that step's own router keeps the top-k of
the tokens still active (hierarchical filtering), and gates their update by ``alpha * G(logit)``.

Training uses the top-k, which is not causal (whether token t is kept depends on later tokens). Evaluation,
full forwards without the training rule and cached decoding use a causal per-token rule instead: a token
continues iff ``sigmoid(logit) > 0.5`` (``causal_rule: bce``, the router trained towards top-k membership
by a BCE loss) or iff an auxiliary router on detached hidden states says so (``aux_router``).

Shape legend: B batch, T tokens, D model width, K tokens that ran the step, C head outputs.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from adaptive import ComponentConfig, RouteContext, RouteDecision, Router
from adaptive_mor.common import HeadKind, capacity_count, linear_flops, make_head, masked_mean, upcast
from adaptive_mor.topk import docs_bound, top_k_docs, top_k_rows

Tensor = torch.Tensor


class ExpertChoiceConfig(ComponentConfig):
    score: Literal["sigmoid", "tanh", "softmax"] = Field(
        default="sigmoid", description="G in the gate alpha*G(logit): sigmoid (paper default), tanh, or softmax "
        "over a two-way (continue, stop) head, i.e. sigmoid of the logit difference; never over the sequence")
    head: HeadKind = Field(default="linear", description="router head: linear, or mlp (Linear(D,2D)-GELU-Linear)")
    alpha: float = Field(default=0.1, gt=0, description="gate scale: gate = alpha * G(logit)")
    capacities: list[float] | None = Field(
        default=None, description="fraction of the sequence each step keeps, one per step, non-increasing, each in "
        "(0, 1]; unset: (N_r - r + 1)/N_r for r = 1..N_r")
    gate_mode: Literal["block_output", "delta"] = Field(
        default="block_output", description="update of a kept token: block_output H + g*f(H) (paper and official "
        "code, i.e. (1+g)H + g*delta), or delta H + g*(f(H) - H); f(H) is the step's full block output")
    causal_rule: Literal["bce", "aux_router"] = Field(
        default="bce", description="inference rule: bce (continue iff sigmoid(logit) > 0.5) or aux_router (a "
        "separate MLP on detached hidden states, trained to predict top-k membership)")
    bce_coef: float = Field(default=0.001, ge=0, description="coefficient of the membership BCE loss (on the router "
                            "logits for bce, on the auxiliary router's for aux_router)")
    z_loss_coef: float = Field(default=0.0, ge=0, description="coefficient of the router z-loss (logsumexp of the "
                               "head outputs)^2; 0 = off")
    doc_quota: Literal["floor", "at_least_one"] = Field(
        default="floor", description="with packed documents each keeps floor(n*c) tokens (static bound "
        "floor(T*c), no host sync), or max(1, floor(n*c)) (data-dependent bound: one host sync per step)")

    @field_validator("capacities")
    @classmethod
    def _check_capacities(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if not value or any(not 0.0 < c <= 1.0 for c in value):
            raise ValueError(f"each capacity must be in (0, 1], got {value}")
        if any(b > a for a, b in zip(value, value[1:])):
            raise ValueError(f"capacities must be non-increasing (a token kept at step r+1 was kept at r), got {value}")
        return value


class ExpertChoiceRouter(Router):
    """Expert-choice MoR router: top-k per step in training, a causal per-token rule at inference."""

    name = "expert_choice"
    Config = ExpertChoiceConfig
    causal_in_training = False

    def __init__(self, config: ExpertChoiceConfig, *, d_model: int, num_steps: int):
        super().__init__(config, d_model=d_model, num_steps=num_steps)
        if config.capacities is not None and len(config.capacities) != num_steps:
            raise ValueError(f"capacities: {len(config.capacities)} values given for a model with {num_steps} "
                             f"recursion steps; give exactly one per step")
        if config.bce_coef == 0:
            warnings.warn(f"router expert_choice: bce_coef=0, so the causal inference rule ({config.causal_rule}) is "
                          "never trained; evaluation and decoding will route with an untrained rule", stacklevel=2)
        out = 2 if config.score == "softmax" else 1
        self.heads = nn.ModuleList(make_head(config.head, d_model, out) for _ in range(num_steps))
        self.aux_heads = None
        if config.causal_rule == "aux_router":
            self.aux_heads = nn.ModuleList(make_head("mlp", d_model, 1) for _ in range(num_steps))

    def base_capacities(self) -> list[float]:
        if self.config.capacities is not None:
            return list(self.config.capacities)
        n = self.num_steps
        return [(n - r) / n for r in range(n)]  # (N_r - r + 1) / N_r with r = 1..N_r

    def flops_per_token(self, step: int) -> int:
        """Every token of the sequence is scored at every step (inactive ones are masked afterwards)."""
        aux = linear_flops(self.aux_heads[step]) if self.aux_heads is not None else 0
        return linear_flops(self.heads[step]) + aux

    # ------------------------------------------------------------------ routing

    def route(self, hidden_BTD: Tensor, ctx: RouteContext) -> RouteDecision:
        raw_BTC = upcast(self.heads[ctx.step](hidden_BTD))
        logit_BT = raw_BTC[..., 0] - raw_BTC[..., 1] if raw_BTC.shape[-1] == 2 else raw_BTC[..., 0]
        gate_BT = self.config.alpha * self.activation(raw_BTC, logit_BT)
        causal_BT = logit_BT
        if self.aux_heads is not None:
            causal_BT = upcast(self.aux_heads[ctx.step](hidden_BTD.detach()))[..., 0]
        if not ctx.training_rule:
            # sigmoid(logit) > 0.5; at full capacity top-k keeps every active token, so the rule does too
            selected_BT = ctx.active_BT if ctx.capacity >= 1.0 else ctx.active_BT & (causal_BT > 0)
            metrics = {"selected_frac": masked_mean(selected_BT.float(), ctx.valid_BT)}
            return RouteDecision(selected_BT, gate_BT, logits_BT=logit_BT, metrics=metrics)
        return self.route_top_k(raw_BTC, logit_BT, gate_BT, causal_BT, ctx)

    def activation(self, raw_BTC: Tensor, logit_BT: Tensor) -> Tensor:
        if self.config.score == "tanh":
            return torch.tanh(logit_BT)
        if self.config.score == "softmax":
            return torch.softmax(raw_BTC, dim=-1)[..., 0]
        return torch.sigmoid(logit_BT)

    def route_top_k(self, raw_BTC: Tensor, logit_BT: Tensor, gate_BT: Tensor, causal_BT: Tensor,
                    ctx: RouteContext) -> RouteDecision:
        T = logit_BT.shape[1]
        score_BT = logit_BT.detach()
        eligible_BT = ctx.active_BT & ctx.valid_BT
        num_selected = max_selected = carry = None
        if ctx.doc_ids_BT is not None:
            at_least_one = self.config.doc_quota == "at_least_one"
            selected_BT = top_k_docs(score_BT, eligible_BT, ctx.valid_BT, ctx.doc_ids_BT, ctx.capacity, at_least_one)
            max_selected = None if at_least_one else docs_bound(T, ctx.capacity)
        else:
            # The previous step kept exactly k_prev tokens per row; never ask for more than are active.
            k = min(capacity_count(T, ctx.capacity), T if ctx.carry is None else ctx.carry)
            selected_BT = top_k_rows(score_BT, ctx.active_BT, ctx.valid_BT, k)
            num_selected = carry = k
        target_BT = (selected_BT & eligible_BT).to(logit_BT.dtype)
        aux = self.aux_losses(raw_BTC, causal_BT, target_BT, eligible_BT)
        agree_BT = ((causal_BT > 0) == (target_BT > 0)).to(logit_BT.dtype)
        metrics = {"selected_frac": masked_mean(selected_BT.float(), ctx.valid_BT),
                   "sampling_acc": masked_mean(agree_BT, eligible_BT)}
        return RouteDecision(selected_BT, gate_BT, num_selected=num_selected, max_selected=max_selected,
                             logits_BT=logit_BT, aux_losses=aux, metrics=metrics, carry=carry)

    def aux_losses(self, raw_BTC: Tensor, causal_BT: Tensor, target_BT: Tensor,
                   eligible_BT: Tensor) -> dict[str, Tensor]:
        """The membership BCE (and z-loss), means over the eligible tokens, already scaled by their coefs."""
        losses = {}
        if self.config.bce_coef > 0:
            bce_BT = F.binary_cross_entropy_with_logits(causal_BT, target_BT, reduction="none")
            losses["router_bce"] = self.config.bce_coef * masked_mean(bce_BT, eligible_BT)
        if self.config.z_loss_coef > 0:
            lse_BT = torch.logsumexp(raw_BTC, dim=-1)
            losses["router_z"] = self.config.z_loss_coef * masked_mean(lse_BT.square(), eligible_BT)
        return losses

    # ------------------------------------------------------------------ update

    def combine(self, hidden_KD: Tensor, block_out_KD: Tensor, gate_K: Tensor, first_KD: Tensor, step: int) -> Tensor:
        """``block_output``: H + g*f(H); ``delta``: H + g*(f(H) - H). f(H) is the step's block output."""
        g_K1 = gate_K.unsqueeze(-1).to(hidden_KD.dtype)
        if self.config.gate_mode == "block_output":
            return hidden_KD + g_K1 * block_out_KD
        return hidden_KD + g_K1 * (block_out_KD - hidden_KD)

"""Token-choice routing (SPEC §2.3): one router on the hidden state entering the recursion block gives each
token N_r scores; its top-1 assigns the token a depth i (0-based) and the token runs steps 0..i.

The decision looks only at the token's own H^1, so it is causal by construction and the same rule serves
training, evaluation and decoding. The cost is load imbalance, countered by a Switch-style balance loss or
a loss-free selection bias updated after each optimizer step.

Update rules, with f(H) the step's block output (the shared layers' output, their own residuals included)
and g = alpha * p_i the token's gate (p the unbiased router probabilities):
  code  (official code, default): H^{r+1} = f(H^r) for r < i;  H^{i+1} = H^1 + g * f(H^i)
  paper (eq. in the paper):       H^{r+1} = g * f(H^r) for r < i;  H^{i+1} = g * f(H^i) + H^1

Shape legend: B batch, T tokens, D model width, R recursion steps (depth choices), K tokens that ran.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field

from adaptive import ComponentConfig, Float32Buffers, RouteContext, RouteDecision, Router, RoutingStats
from adaptive_mor.common import HeadKind, linear_flops, make_head, masked_mean, upcast

Tensor = torch.Tensor
LOAD_METRIC = "depth_load"  # metric "depth_load{i}": fraction of real tokens assigned depth i (step 0)


class TokenChoiceConfig(ComponentConfig):
    score: Literal["softmax", "sigmoid"] = Field(default="softmax", description="router probabilities over depths")
    head: HeadKind = Field(default="linear", description="router head: linear, or mlp (Linear(D,2D)-GELU-Linear)")
    alpha: float = Field(default=1.0, gt=0, description="gate scale: g = alpha * p_i of the chosen depth i")
    update: Literal["code", "paper"] = Field(
        default="code", description="code: only the token's last step is gated and adds H^1; paper: every step "
        "is gated, the last adds H^1 (see the module docstring)")
    balancing: Literal["loss", "loss_free", "none"] = Field(
        default="loss", description="load balancing: Switch-style loss, loss-free selection bias, or none")
    balance_coef: float = Field(default=0.1, ge=0, description="coefficient of the balance loss N_r * sum_i f_i P_i")
    bias_rate: float = Field(default=0.001, gt=0,
                             description="loss-free bias step u: b_i += u*sign(mean_load - load_i)")
    balance_warmup_steps: int = Field(
        default=0, ge=0, description="ramp the balancing strength (loss coefficient or bias step) linearly from 0 "
        "over this many optimizer steps; 0 = off")
    z_loss_coef: float = Field(default=0.0, ge=0, description="coefficient of the z-loss (logsumexp logits)^2; 0 = off")
    static_shapes: bool = Field(
        default=False, description="True: steps after the first gather all T slots (no host sync, no compute "
        "saved); False: gather only the largest row count (one host sync per step)")


@dataclass
class TokenChoiceCarry:
    """What step 0 decided, for the later steps of the same forward."""

    depth_BT: Tensor  # 0-based last step of each token
    gate_BT: Tensor  # alpha * p of the chosen depth


class TokenChoiceRouter(Float32Buffers, Router):
    """Token-choice MoR router: top-1 depth per token from H^1, causal by construction."""

    name = "token_choice"
    Config = TokenChoiceConfig
    causal_in_training = True
    uses_capacity = False  # each token's depth comes from its own router scores

    def __init__(self, config: TokenChoiceConfig, *, d_model: int, num_steps: int):
        super().__init__(config, d_model=d_model, num_steps=num_steps)
        warn_ignored(config)
        self.head = make_head(config.head, d_model, num_steps)
        if config.balancing == "loss_free":
            self.register_buffer("balance_bias", torch.zeros(num_steps, dtype=torch.float32))
        if config.balance_warmup_steps > 0:
            self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ routing

    def flops_per_token(self, step: int) -> int:
        """The depth is chosen once, at the first step, from every token's first hidden state."""
        return linear_flops(self.head) if step == 0 else 0

    def route(self, hidden_BTD: Tensor, ctx: RouteContext) -> RouteDecision:
        if ctx.step == 0:
            return self.assign(ctx)
        carry: TokenChoiceCarry = ctx.carry
        assert carry is not None, "token_choice: steps after the first need step 0's carry"
        selected_BT = ctx.active_BT & ctx.valid_BT & (carry.depth_BT >= ctx.step)
        max_selected = selected_BT.shape[1] if self.config.static_shapes else None
        metrics = {"selected_frac": masked_mean(selected_BT.float(), ctx.valid_BT)}
        return RouteDecision(selected_BT, step_gate(carry, ctx.step), max_selected=max_selected, metrics=metrics,
                             carry=carry)

    def assign(self, ctx: RouteContext) -> RouteDecision:
        logits_BTR = upcast(self.head(ctx.first_hidden_BTD))
        probs_BTR = torch.softmax(logits_BTR, -1) if self.config.score == "softmax" else torch.sigmoid(logits_BTR)
        choice_BTR = probs_BTR + self.balance_bias if self.config.balancing == "loss_free" else probs_BTR
        depth_BT = choice_BTR.detach().argmax(-1)  # ties: the shallower depth
        gate_BT = self.config.alpha * probs_BTR.gather(-1, depth_BT[..., None])[..., 0]
        carry = TokenChoiceCarry(depth_BT, gate_BT)
        valid_BT1 = ctx.valid_BT[..., None].to(probs_BTR.dtype)
        n_real = valid_BT1.sum().clamp(min=1)
        depths_R = torch.arange(self.num_steps, device=depth_BT.device)
        chosen_BTR = (depth_BT[..., None] == depths_R).to(probs_BTR.dtype)  # not F.one_hot: it syncs on CUDA
        load_R = (chosen_BTR * valid_BT1).sum((0, 1)) / n_real
        metrics = {f"{LOAD_METRIC}{i}": load_R[i] for i in range(self.num_steps)}
        aux = {}
        if ctx.training_rule:
            prob_R = (probs_BTR * valid_BT1).sum((0, 1)) / n_real
            aux = self.aux_losses(logits_BTR, prob_R, load_R, ctx.valid_BT)
        T = depth_BT.shape[1]
        return RouteDecision(ctx.active_BT, step_gate(carry, 0), num_selected=T, aux_losses=aux, metrics=metrics,
                             carry=carry)

    def aux_losses(self, logits_BTR: Tensor, prob_R: Tensor, load_R: Tensor, valid_BT: Tensor) -> dict[str, Tensor]:
        """Balance loss ``N_r * sum_i f_i P_i`` (f_i: fraction of real tokens assigned depth i, P_i: their mean
        probability of depth i; 1 when balanced) and the z-loss, already scaled by their coefficients."""
        losses = {}
        if self.config.balancing == "loss" and self.config.balance_coef > 0:
            balance = self.num_steps * (load_R * prob_R).sum()
            losses["router_balance"] = self.config.balance_coef * self.warmup_ramp() * balance
        if self.config.z_loss_coef > 0:
            z_BT = torch.logsumexp(logits_BTR, dim=-1).square()
            losses["router_z"] = self.config.z_loss_coef * masked_mean(z_BT, valid_BT)
        return losses

    def warmup_ramp(self) -> Tensor | float:
        """0 -> 1 linearly over ``balance_warmup_steps`` optimizer steps (a tensor: no host sync)."""
        if self.config.balance_warmup_steps == 0:
            return 1.0
        return (self.optimizer_steps.float() / self.config.balance_warmup_steps).clamp(max=1.0)

    # ------------------------------------------------------------------ update

    def combine(self, hidden_KD: Tensor, block_out_KD: Tensor, gate_K2: Tensor, first_KD: Tensor, step: int) -> Tensor:
        """``gate_K2``: the token's gate and whether this step is its last (see ``step_gate``)."""
        g_K1 = gate_K2[..., :1].to(hidden_KD.dtype)
        last_K1 = gate_K2[..., 1:] > 0.5
        finished_KD = first_KD + g_K1 * block_out_KD
        going_on_KD = g_K1 * block_out_KD if self.config.update == "paper" else block_out_KD
        return torch.where(last_K1, finished_KD, going_on_KD)

    # ------------------------------------------------------------------ loss-free balancing

    @torch.no_grad()
    def after_optimizer_step(self, stats: RoutingStats) -> None:
        """Loss-free balancing: ``b_i += u * sign(mean_load - load_i)`` from the loads of the step's forwards
        (all-reduced over processes), then count the optimizer step for the balance warm-up."""
        if self.config.balancing == "loss_free":
            keys = [f"{LOAD_METRIC}{i}/step0" for i in range(self.num_steps)]
            if all(key in stats.metrics for key in keys):
                load_R = torch.stack([stats.metrics[key].float() for key in keys]).to(self.balance_bias.device)
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(load_R)
                    load_R = load_R / dist.get_world_size()
                step = self.config.bias_rate * self.warmup_ramp()
                self.balance_bias += step * torch.sign(load_R.mean() - load_R)
            else:
                warnings.warn("router token_choice: the routing stats carry no depth loads; balance bias not updated",
                              stacklevel=2)
        if self.config.balance_warmup_steps > 0:
            self.optimizer_steps += 1


def step_gate(carry: TokenChoiceCarry, step: int) -> Tensor:
    """The gate handed to ``combine`` at ``step``: (B, T, 2) = (g, 1 if ``step`` is the token's last else 0).
    The engine gathers trailing channels of ``gate_BT`` along with the tokens, so no state is parked."""
    last_BT = (carry.depth_BT == step).to(carry.gate_BT.dtype)
    return torch.stack([carry.gate_BT, last_BT], dim=-1)


def warn_ignored(config: TokenChoiceConfig) -> None:
    ignored = []
    if config.balancing != "loss" and "balance_coef" in config.model_fields_set:
        ignored.append("balance_coef")
    if config.balancing != "loss_free" and "bias_rate" in config.model_fields_set:
        ignored.append("bias_rate")
    if config.balancing == "none" and "balance_warmup_steps" in config.model_fields_set:
        ignored.append("balance_warmup_steps")
    if ignored:
        warnings.warn(f"router token_choice: {', '.join(ignored)} ignored with balancing={config.balancing!r}",
                      stacklevel=3)

"""The ``moe`` FFN: E SwiGLU experts, top-k per token, optional shared experts (SPEC §3).

Routing, per token t with router logits ``z_t = W_r x_t`` (E of them, computed in at least float32):

* scores ``s_t = softmax(z_t)`` or ``sigmoid(z_t)`` (``score``);
* selection: the top-k experts of ``s_t + b`` (b: the loss-free balancing bias); without a bias the
  logits are ranked instead (the same order, but no ties where the scores saturate). The bias changes
  which experts are chosen, never the gates;
* gates: the chosen scores, divided by their sum when ``renormalize`` (so they sum to 1);
* output ``Σ_k gate_k · expert_k(x_t) + shared(x_t)``. Every token gets its k experts: nothing is dropped.

Balance, all over the *real* tokens of one call (``valid_N``: padding and unused gathered slots excluded):

* Switch load-balancing loss ``balance_coef · E · Σ_i f_i P_i`` with ``f_i`` the fraction of the call's
  k·n assignments that went to expert i and ``P_i`` the mean over its n tokens of the normalised score
  ``s_ti / Σ_j s_tj``; 1.0 at perfect balance. One value per call (per layer and recursion step); the
  engine sums the calls, so a model with L MoE layer calls balances at ``L · balance_coef``.
* router z-loss ``z_loss_coef · mean_t (logsumexp z_t)²``.
* DeepSeek-V3 loss-free bias (``bias_rate`` u > 0): after each optimizer step
  ``b_i += u · sign(mean_j c_j − c_i)``, c_i the tokens expert i received over the step (every call of
  this module, every micro-batch, all-reduced over processes). A float32 buffer, in the state dict.

Shape legend: N tokens, D model width, E experts, K experts per token, F expert width.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from adaptive import FFN, ComponentConfig, FFNOutput, Float32Buffers
from adaptive_moe.dispatch import ExpertWeights, compute_dtype, expert_outputs, grouped_mm_supported

Tensor = torch.Tensor
LOAD_COUNT = "expert_tokens"  # FFNOutput.counts key: real tokens each expert received (E,)


class MoEConfig(ComponentConfig):
    num_experts: int = Field(default=8, ge=1, description="E, routed experts")
    top_k: int = Field(default=2, ge=1, description="experts per token (at most num_experts)")
    num_shared_experts: int = Field(default=0, ge=0, description="experts every token runs, besides its top-k")
    d_expert: int | None = Field(
        default=None, gt=0, description="inner width of each expert; default model.d_ffn // (top_k + "
        "num_shared_experts), so a token's active FFN width matches the dense d_ffn")
    score: Literal["softmax", "sigmoid"] = Field(default="softmax", description="router scores over experts")
    renormalize: bool = Field(default=True, description="divide the chosen top-k scores by their sum")
    balance_coef: float = Field(default=0.01, ge=0, description="coefficient of the Switch loss E·Σ f_i P_i; 0 = off")
    z_loss_coef: float = Field(default=0.001, ge=0, description="coefficient of the router z-loss; 0 = off")
    bias_rate: float = Field(default=0.0, ge=0, description="loss-free bias step u: b_i += u·sign(mean load − "
                             "load_i) after each optimizer step; 0 = off")
    dispatch: Literal["auto", "batched", "grouped_mm"] = Field(
        default="auto", description="grouped matmuls: auto = torch._grouped_mm on CUDA GPUs of capability "
        ">= 9.0 in bf16, else batched (block-padded bmm); grouped_mm forces it")

    @model_validator(mode="after")
    def _top_k_fits(self) -> "MoEConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        return self


class StackedLinear(nn.Linear):
    """E bias-free linear maps ``in -> out`` stored as one ``nn.Linear(in, E·out)``, so the model's normal
    init and weight decay apply as to any linear; ``weight_EOI`` views it per expert. Never called."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__(in_features, num_experts * out_features, bias=False)
        self.num_experts = num_experts

    def weight_EOI(self) -> Tensor:
        return self.weight.view(self.num_experts, -1, self.in_features)


class SwiGLUExperts(nn.Module):
    """``count`` always-on experts as one SwiGLU of width ``count·F`` (the sum of their outputs)."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * width, bias=False)
        self.down = nn.Linear(width, d_model, bias=False)

    def forward(self, x_ND: Tensor) -> Tensor:
        gate_NF, up_NF = self.gate_up(x_ND).chunk(2, dim=-1)
        return self.down(F.silu(gate_NF) * up_NF)


class MoE(Float32Buffers, FFN):
    """Mixture of SwiGLU experts: top-k token choice, Switch/z-loss/loss-free balancing, sorted dispatch."""

    name = "moe"
    Config = MoEConfig
    takes_valid_mask = True

    def __init__(self, config: MoEConfig, *, d_model: int, d_ffn: int):
        super().__init__(config, d_model=d_model, d_ffn=d_ffn)
        self.d_expert = config.d_expert or d_ffn // (config.top_k + config.num_shared_experts)
        if self.d_expert < 1:
            raise ValueError(f"ffn moe: d_ffn={d_ffn} is too small for top_k + num_shared_experts = "
                             f"{config.top_k + config.num_shared_experts} experts; set d_expert")
        E, F_ = config.num_experts, self.d_expert
        self.router = nn.Linear(d_model, E, bias=False)
        self.gate_up = StackedLinear(E, d_model, 2 * F_)
        self.down = StackedLinear(E, F_, d_model)
        self.shared = SwiGLUExperts(d_model, config.num_shared_experts * F_) if config.num_shared_experts else None
        if config.bias_rate > 0:
            self.register_buffer("balance_bias", torch.zeros(E, dtype=torch.float32))

    def experts(self) -> ExpertWeights:
        return ExpertWeights(self.gate_up.weight_EOI(), self.down.weight_EOI())

    # ------------------------------------------------------------------ forward

    def forward(self, x_ND: Tensor, valid_N: Tensor | None = None) -> FFNOutput:
        logits_NE, scores_NE = self.scores(x_ND)
        if self.config.bias_rate > 0:
            choice_NE = scores_NE.detach() + self.balance_bias
        else:  # the logits rank experts as the scores do, without ties where the scores saturate
            choice_NE = logits_NE.detach()
        expert_NK = torch.topk(choice_NE, self.config.top_k, dim=-1).indices
        gate_NK = scores_NE.gather(-1, expert_NK)
        if self.config.renormalize:
            gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True)
        weights = self.experts()
        y_NKD = expert_outputs(x_ND, expert_NK, weights, self.dispatch_method(x_ND, weights))
        out_ND = torch.einsum("nkd,nk->nd", y_NKD, gate_NK.to(y_NKD.dtype))
        if self.shared is not None:
            out_ND = out_ND + self.shared(x_ND)
        if not self.training:
            return FFNOutput(out_ND)
        return self.balance_terms(out_ND, logits_NE, scores_NE, expert_NK, valid_N)

    def scores(self, x_ND: Tensor) -> tuple[Tensor, Tensor]:
        """Router logits and scores in at least float32 (float64 stays float64), outside autocast."""
        dtype = torch.promote_types(x_ND.dtype, torch.float32)
        device = x_ND.device.type
        outside = torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext()
        with outside:
            logits_NE = F.linear(x_ND.to(dtype), self.router.weight.to(dtype))
        scores_NE = torch.softmax(logits_NE, -1) if self.config.score == "softmax" else torch.sigmoid(logits_NE)
        return logits_NE, scores_NE

    def dispatch_method(self, x_ND: Tensor, weights: ExpertWeights) -> str:
        if self.config.dispatch == "auto":
            return "grouped_mm" if grouped_mm_supported(x_ND, weights) else "batched"
        if self.config.dispatch == "grouped_mm" and (not hasattr(torch, "_grouped_mm") or compute_dtype(x_ND) not in
                                                     (torch.float32, torch.bfloat16, torch.float16)):
            raise ValueError(f"ffn moe: dispatch='grouped_mm' needs torch._grouped_mm and float32/bf16/fp16 matmuls "
                             f"(torch {torch.__version__}, {compute_dtype(x_ND)}); use dispatch='auto' or 'batched'")
        return self.config.dispatch

    def balance_terms(self, out_ND: Tensor, logits_NE: Tensor, scores_NE: Tensor, expert_NK: Tensor,
                      valid_N: Tensor | None) -> FFNOutput:
        """Training only: the balance and z losses over the real tokens, and each expert's token count."""
        N, E = scores_NE.shape
        real_N = torch.ones(N, dtype=scores_NE.dtype, device=scores_NE.device) if valid_N is None else valid_N.to(scores_NE.dtype)
        n_real = real_N.sum().clamp(min=1)
        chosen_NE = torch.zeros_like(scores_NE).scatter_(-1, expert_NK, 1.0)  # not F.one_hot: it syncs on CUDA
        load_E = (chosen_NE * real_N[:, None]).sum(0)
        losses = {}
        if self.config.balance_coef > 0:
            f_E = load_E / (self.config.top_k * n_real)
            p_E = ((scores_NE / scores_NE.sum(-1, keepdim=True)) * real_N[:, None]).sum(0) / n_real
            losses["moe_balance"] = self.config.balance_coef * E * (f_E * p_E).sum()
        if self.config.z_loss_coef > 0:
            z_N = torch.logsumexp(logits_NE, dim=-1).square()
            losses["moe_z"] = self.config.z_loss_coef * (z_N * real_N).sum() / n_real
        counts = {LOAD_COUNT: load_E.detach()} if self.config.bias_rate > 0 else {}
        return FFNOutput(out_ND, aux_losses=losses, counts=counts)

    # ------------------------------------------------------------------ accounting and balancing

    def flops_per_token(self) -> int:
        D, F_, c = self.d_model, self.d_expert, self.config
        return 2 * D * c.num_experts + (c.top_k + c.num_shared_experts) * 2 * 3 * D * F_

    def active_params_per_token(self) -> int:
        D, F_, c = self.d_model, self.d_expert, self.config
        return D * c.num_experts + (c.top_k + c.num_shared_experts) * 3 * D * F_

    @torch.no_grad()
    def after_optimizer_step(self, counts: dict[str, Tensor]) -> None:
        """Loss-free balancing: ``b_i += u · sign(mean load − load_i)`` from the step's token counts,
        summed over processes first, so every process applies the same update."""
        if self.config.bias_rate == 0:
            return
        if LOAD_COUNT not in counts:
            warnings.warn("ffn moe: no expert token counts reached after_optimizer_step; balance bias not updated",
                          stacklevel=2)
            return
        load_E = counts[LOAD_COUNT].to(self.balance_bias.device, torch.float32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load_E)
        self.balance_bias += self.config.bias_rate * torch.sign(load_E.mean() - load_E)

"""The SwiGLU feed-forward block of Llama."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptive import FFN, ComponentConfig, FFNOutput, fused_projections, fused_weight


class SwiGLU(FFN):
    """down(silu(gate(x)) * up(x)), no biases."""

    name = "swiglu"
    Config = ComponentConfig

    def __init__(self, config, *, d_model: int, d_ffn: int):
        super().__init__(config, d_model=d_model, d_ffn=d_ffn)
        self.gate = nn.Linear(d_model, d_ffn, bias=False)
        self.up = nn.Linear(d_model, d_ffn, bias=False)
        self.down = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x_ND):
        if not fused_projections():
            return FFNOutput(self.down(F.silu(self.gate(x_ND)) * self.up(x_ND)))
        # serving (inference mode): gate and up as one matmul over their weights concatenated once
        gate_NF, up_NF = F.linear(x_ND, fused_weight(self, (self.gate.weight, self.up.weight))).chunk(2, dim=-1)
        return FFNOutput(self.down(F.silu(gate_NF) * up_NF))

    def flops_per_token(self) -> int:
        return 2 * 3 * self.d_model * self.d_ffn

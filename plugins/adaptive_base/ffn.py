"""The SwiGLU feed-forward block of Llama."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from adaptive import FFN, ComponentConfig, FFNOutput


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
        return FFNOutput(self.down(F.silu(self.gate(x_ND)) * self.up(x_ND)))

    def flops_per_token(self) -> int:
        return 2 * 3 * self.d_model * self.d_ffn

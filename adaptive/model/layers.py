"""Small model parts: RMSNorm and rotary position embeddings that take explicit positions."""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (computed in float32, as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_ND: Tensor) -> Tensor:
        x32 = x_ND.float() if x_ND.dtype in (torch.float16, torch.bfloat16) else x_ND
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x_ND.dtype)


class Rotary(nn.Module):
    """RoPE evaluated at explicit positions, so a gathered subset keeps its original positions."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.head_dim = head_dim
        self.theta = theta

    def cos_sin(self, positions_BK: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions_BK.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # B K E/2
        emb = torch.cat([freqs, freqs], dim=-1)  # B K E
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # B 1 K E

    @staticmethod
    def apply(x_BHKE: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x_BHKE.shape[-1] // 2
        rotated = torch.cat([-x_BHKE[..., half:], x_BHKE[..., :half]], dim=-1)
        return (x_BHKE * cos + rotated * sin).to(x_BHKE.dtype)  # autocast: tables may be wider than x

    def _apply(self, fn, recurse=True):  # keep inv_freq in float32/float64 when the model is cast
        inv = self.inv_freq
        out = super()._apply(fn, recurse)
        if not self.inv_freq.is_floating_point() or self.inv_freq.dtype in (torch.float16, torch.bfloat16):
            self.inv_freq = inv.to(self.inv_freq.device)
        return out

"""Small model parts: RMSNorm and rotary position embeddings that take explicit positions."""

from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor


class Float32Buffers:
    """Mixin for a module whose ``balance_bias`` buffer stays float32 whatever the module is cast to (only its
    device follows), as balancing state updated outside autograd needs. List it before the nn.Module base."""

    float32_buffers: tuple[str, ...] = ("balance_bias",)

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.get(name) for name in self.float32_buffers}
        module = super()._apply(fn, recurse)
        for name, buffer in kept.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(device=self._buffers[name].device, dtype=torch.float32)
        return module


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

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling=None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        if scaling is not None:  # a config.RopeScaling
            inv_freq = llama3_scaled(inv_freq, scaling)
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


def llama3_scaled(inv_freq: Tensor, scaling) -> Tensor:
    """Llama 3 frequency scaling: long wavelengths divided by ``factor``, short ones kept, and a linear blend
    (in 1 / wavelength) over the band between ``context / high_freq_factor`` and ``context / low_freq_factor``."""
    context = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    blend = (context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * inv_freq / scaling.factor + blend * inv_freq
    long = wavelen > context / scaling.low_freq_factor
    short = wavelen < context / scaling.high_freq_factor
    return torch.where(long, inv_freq / scaling.factor, torch.where(short, inv_freq, blended))

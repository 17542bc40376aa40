"""Pieces both MoR routers use: router heads, masked means, capacity counts, lexicographic top-k order.

Shape legend: B batch, T tokens, D model width, C head outputs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Tensor = torch.Tensor
HeadKind = Literal["linear", "mlp"]

# Slack added before flooring T * capacity, so that e.g. 9 * (1/3) counts 3 tokens however the fraction
# rounded in floating point. Python floats and torch float64 round identically, so both sides agree.
COUNT_EPS = 1e-9


def make_head(kind: HeadKind, d_model: int, out: int) -> nn.Module:
    """A router head: ``Linear(D, C)``, or the paper's MLP ``Linear(D, 2D) - GELU - Linear(2D, C)``."""
    if kind == "linear":
        return nn.Linear(d_model, out)
    return nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, out))


def upcast(x: Tensor) -> Tensor:
    """Router arithmetic in at least float32 (float64 stays float64, so exact checks stay exact)."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def capacity_count(length: int, capacity: float) -> int:
    """Tokens kept out of ``length`` at ``capacity``: ``max(1, floor(length * capacity))``, never 0."""
    return max(1, math.floor(length * capacity + COUNT_EPS))


def masked_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (0 when there are none); no host sync."""
    mask = mask_BT.to(x_BT.dtype)
    return (x_BT * mask).sum() / mask.sum().clamp(min=1)


def lex_order(score_BT: Tensor, *keys_BT: Tensor) -> Tensor:
    """Column order of each row sorted by ``keys`` ascending (the last key most significant), then by
    ``score`` descending, then by column (lower column first): a chain of stable sorts, no loops."""
    order_BT = torch.sort(score_BT, dim=1, descending=True, stable=True).indices
    for key_BT in keys_BT:
        order_BT = order_BT.gather(1, torch.sort(key_BT.gather(1, order_BT), dim=1, stable=True).indices)
    return order_BT


def linear_flops(module: nn.Module) -> int:
    """Matmul FLOPs per token (2 per multiply-add) of every Linear inside ``module``."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

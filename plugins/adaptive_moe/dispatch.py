"""Expert dispatch: sort the token-expert assignments by expert, run each expert's SwiGLU on its rows with
grouped matmuls, and put the rows back in token order. No Python loop over experts or tokens and no host
sync: every shape follows from the input's shape alone.

Two ways to run the grouped matmuls over the sorted rows:

* ``grouped_mm``: ``torch._grouped_mm`` with the per-expert row offsets (CUDA GPUs of compute
  capability 9.0 or later, bf16; see ``grouped_mm_supported``).
* ``batched`` (everywhere else): each expert's rows are padded to a multiple of a block size ``b`` and the
  blocks run as one ``torch.bmm`` against the weights of each block's expert. The number of blocks is the
  static bound ``(A + E·(b-1)) // b`` for ``A`` assignments, so at most ``E·(b-1)`` padding rows (some in
  all-padding blocks past the last expert's) are computed on top of the ``A`` real ones.
  ``b = ceil(A / (4E))`` keeps that waste under about a quarter of the real rows and the gathered
  weights at about 5E expert copies.

``loop_expert_outputs`` is the naive per-expert loop, kept as the reference for tests and the benchmark
(it syncs with the host once per expert); the module never calls it.

Shape legend: N tokens, K experts per token (top-k), A = N·K assignments, E experts, D model width,
F expert width, P padded rows, Q blocks, b rows per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
BLOCKS_PER_EXPERT = 4  # batched path: about 4 blocks per expert at an even load


@dataclass
class ExpertWeights:
    """The routed experts' weights: ``gate_up_EOD`` (O = 2F: gate rows, then up rows) and ``down_EDF``."""

    gate_up_EOD: Tensor
    down_EDF: Tensor

    @property
    def num_experts(self) -> int:
        return self.gate_up_EOD.shape[0]


def grouped_mm_supported(x_ND: Tensor, weights: ExpertWeights) -> bool:
    """Whether ``torch._grouped_mm`` has a fast kernel here: a CUDA tensor on a GPU of compute capability
    >= 9.0 (Hopper or later), in bf16, with every width a multiple of 8 (16-byte aligned rows)."""
    if not (x_ND.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(x_ND.device) < (9, 0):
        return False
    widths = (weights.gate_up_EOD.shape[1], weights.gate_up_EOD.shape[2], weights.down_EDF.shape[2])
    return compute_dtype(x_ND) == torch.bfloat16 and all(w % 8 == 0 for w in widths)


def compute_dtype(x_ND: Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype inside an autocast region, else the input's."""
    device = x_ND.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x_ND.dtype


def expert_outputs(x_ND: Tensor, expert_NK: Tensor, weights: ExpertWeights, method: str) -> Tensor:
    """Each token's output from each of its K experts, ``y_NKD`` (before gating), in token order."""
    N, K = expert_NK.shape
    A, D, E = N * K, x_ND.shape[1], weights.num_experts
    expert_A = expert_NK.reshape(-1)
    sorted_A, order_A = torch.sort(expert_A, stable=True)  # by expert; token order within an expert
    counts_E = torch.zeros(E, dtype=torch.long, device=x_ND.device).scatter_add_(0, expert_A, torch.ones_like(expert_A))
    b = 1 if method == "grouped_mm" else block_size(A, E)
    padded_E = (counts_E + b - 1) // b * b  # each expert's rows, padded to whole blocks
    padded_end_E = padded_E.cumsum(0)
    rows = A if b == 1 else (A + E * (b - 1)) // b * b  # static bound on padded_end_E[-1]
    rank_A = torch.arange(A, device=x_ND.device) - (counts_E.cumsum(0) - counts_E)[sorted_A]
    row_sorted_A = (padded_end_E - padded_E)[sorted_A] + rank_A
    row_A = torch.empty_like(row_sorted_A).index_copy_(0, order_A, row_sorted_A)  # row of each (token, slot)
    x_AD = x_ND.unsqueeze(1).expand(N, K, D).reshape(A, D)
    x_PD = x_ND.new_zeros(rows, D).index_copy_(0, row_A, x_AD)
    if method == "grouped_mm":
        y_PD = grouped_swiglu(x_PD, padded_end_E, weights)
    else:
        y_PD = batched_swiglu(x_PD, padded_end_E, b, weights)
    return y_PD.index_select(0, row_A).view(N, K, D)


def grouped_swiglu(x_AD: Tensor, end_E: Tensor, weights: ExpertWeights) -> Tensor:
    """The experts' SwiGLU over rows sorted by expert (expert e: rows up to ``end_E[e]``), with
    ``torch._grouped_mm``."""
    dtype = compute_dtype(x_AD)
    offs_E = end_E.to(torch.int32)
    gate_up_EDO = weights.gate_up_EOD.to(dtype).transpose(1, 2)
    down_EFD = weights.down_EDF.to(dtype).transpose(1, 2)
    h_AO = torch._grouped_mm(x_AD.to(dtype), gate_up_EDO, offs=offs_E)
    gate_AF, up_AF = h_AO.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate_AF) * up_AF, down_EFD, offs=offs_E)


def block_size(assignments: int, num_experts: int) -> int:
    """Rows per block of the batched path: ``ceil(A / (4E))``, at least 1 (a Python int from shapes only)."""
    return max(1, math.ceil(assignments / (BLOCKS_PER_EXPERT * num_experts)))


def batched_swiglu(x_PD: Tensor, padded_end_E: Tensor, b: int, weights: ExpertWeights) -> Tensor:
    """The experts' SwiGLU over expert-aligned blocks of ``b`` rows, as one ``bmm`` per matrix against the
    weights of each block's expert (blocks past the last expert's rows are all padding)."""
    P, D = x_PD.shape
    E, blocks = weights.num_experts, P // b
    block_starts_Q = torch.arange(blocks, device=x_PD.device) * b
    expert_Q = torch.searchsorted(padded_end_E, block_starts_Q, right=True).clamp(max=E - 1)
    h_QbO = torch.bmm(x_PD.view(blocks, b, D), weights.gate_up_EOD.index_select(0, expert_Q).transpose(1, 2))
    gate_QbF, up_QbF = h_QbO.chunk(2, dim=-1)
    y_QbD = torch.bmm(F.silu(gate_QbF) * up_QbF, weights.down_EDF.index_select(0, expert_Q).transpose(1, 2))
    return y_QbD.reshape(P, D)


def loop_expert_outputs(x_ND: Tensor, expert_NK: Tensor, weights: ExpertWeights) -> Tensor:
    """Reference: a Python loop over experts, each on the tokens routed to it (host syncs; tests only)."""
    N, K = expert_NK.shape
    y_NKD = x_ND.new_zeros(N, K, weights.down_EDF.shape[1])
    for e in range(weights.num_experts):
        token_M, slot_M = (expert_NK == e).nonzero(as_tuple=True)
        if token_M.numel() == 0:
            continue
        gate_MF, up_MF = F.linear(x_ND[token_M], weights.gate_up_EOD[e]).chunk(2, dim=-1)
        y_NKD[token_M, slot_M] = F.linear(F.silu(gate_MF) * up_MF, weights.down_EDF[e])
    return y_NKD

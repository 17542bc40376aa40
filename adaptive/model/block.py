"""A physical decoder layer: grouped-query attention projections and a pluggable FFN.

The layer owns weights only. How its attention is wired (which tokens query, which keys they see) is
decided per logical layer by the engine, so the same weights serve every recursion step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from adaptive.interfaces import FFN
from adaptive.model.layers import RMSNorm, Rotary

Tensor = torch.Tensor


_IN_SERVING_GRAPH = False  # True while the serving engine's compiled decode graphs run (``serving_graphs``)


@contextmanager
def serving_graphs():
    """Marks the forwards inside as the serving engine's compiled decode graphs (``adaptive.serving.compiled``),
    whose fused weights an eager warm-up call made (``fused_weight``)."""
    global _IN_SERVING_GRAPH
    before, _IN_SERVING_GRAPH = _IN_SERVING_GRAPH, True
    try:
        yield
    finally:
        _IN_SERVING_GRAPH = before


def fused_projections() -> bool:
    """Whether projections run fused (``fused_weight``): in the serving engine's forwards, which run under
    ``torch.inference_mode``. A graph traced by ``torch.compile`` cannot read that mode: there they are fused
    inside the serving engine's compiled decode graphs only (``serving_graphs``)."""
    if torch.compiler.is_compiling():
        return _IN_SERVING_GRAPH
    return torch.is_inference_mode_enabled()


def fused_weight(module: nn.Module, weights: tuple[Tensor, ...]) -> Tensor:
    """``torch.cat(weights)``, kept on ``module`` until one of the weights changes (in place, or replaced
    by a cast or a move), for fused projections under ``torch.inference_mode`` (the serving engine; other
    forwards keep the separate matmuls and hold no copy). Not part of the state dict. A compiled decode
    graph (``serving_graphs``) uses the copy that its eager warm-up call made."""
    cached = module.__dict__.get("_fused")
    if torch.compiler.is_compiling():
        assert cached is not None, "a compiled decode graph's layers are first called eagerly"
        return cached[1]
    assert torch.is_inference_mode_enabled(), "fused weights are for inference mode only"
    key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
    if cached is None or cached[0] != key:
        cached = (key, torch.cat([w.detach() for w in weights]))
        module.__dict__["_fused"] = cached
    return cached[1]


class Attention(nn.Module):
    """Q/K/V/O projections (no biases, as Llama)."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, d_model, bias=False)

    def queries(self, x_BKD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q_BHKE = self.q_proj(x_BKD).unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)
        return Rotary.apply(q_BHKE, cos, sin)

    def keys_values(self, x_BKD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        k_BGKE = self.k_proj(x_BKD).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(-3, -2)
        v_BGKE = self.v_proj(x_BKD).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(-3, -2)
        return Rotary.apply(k_BGKE, cos, sin), v_BGKE

    def queries_keys_values(self, x_BKD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``queries`` and ``keys_values`` of one input. Under ``torch.inference_mode`` (the serving engine)
        the three projections run as one matmul over their weights concatenated once (``fused_weight``)."""
        if not fused_projections():
            return (self.queries(x_BKD, cos, sin), *self.keys_values(x_BKD, cos, sin))
        H, G, E = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x_BKD, fused_weight(self, (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)))
        qk = Rotary.apply(qkv[..., : (H + G) * E].unflatten(-1, (H + G, E)).transpose(-3, -2), cos, sin)
        v_BGKE = qkv[..., (H + G) * E:].unflatten(-1, (G, E)).transpose(-3, -2)
        return qk[..., :H, :, :], qk[..., H:, :, :], v_BGKE

    def output(self, attn_BHKE: Tensor) -> Tensor:
        return self.o_proj(attn_BHKE.transpose(-3, -2).flatten(-2))


class Norms(nn.Module):
    """The two RMSNorms of a layer, kept apart so recursion steps may own theirs (per_step_norms)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps)
        self.ffn_norm = RMSNorm(d_model, eps)


class Layer(nn.Module):
    """The weights of one physical layer."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, ffn: FFN):
        super().__init__()
        self.attn = Attention(d_model, num_heads, num_kv_heads)
        self.ffn = ffn

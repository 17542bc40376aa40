"""Attention backends: torch SDPA (default), FlexAttention (GPU), xformers (optional extra)."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from adaptive import AttentionBackend, ComponentConfig


class SDPA(AttentionBackend):
    """torch.nn.functional.scaled_dot_product_attention with a boolean mask or the causal flag."""

    name = "sdpa"
    Config = ComponentConfig

    def attend(self, q_BHQE, k_BHSE, v_BHSE, *, allowed_BQS, causal):
        if causal:
            assert q_BHQE.shape[2] == k_BHSE.shape[2], "causal=True needs equal query and key lengths"
            return F.scaled_dot_product_attention(q_BHQE, k_BHSE, v_BHSE, is_causal=True, enable_gqa=True)
        mask = None if allowed_BQS is None else allowed_BQS[:, None]
        return F.scaled_dot_product_attention(q_BHQE, k_BHSE, v_BHSE, attn_mask=mask, enable_gqa=True)


class Flex(AttentionBackend):
    """FlexAttention with a block mask built from the boolean mask (CUDA only: no CPU backward)."""

    name = "flex"
    Config = ComponentConfig

    def attend(self, q_BHQE, k_BHSE, v_BHSE, *, allowed_BQS, causal):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if q_BHQE.device.type != "cuda":
            raise ValueError("attention 'flex' needs a CUDA device (FlexAttention has no CPU backward); use 'sdpa'")
        B, _, Q, _ = q_BHQE.shape
        S = k_BHSE.shape[2]
        if causal:
            def mask_mod(b, h, q, k):
                return q >= k
        else:
            allowed = allowed_BQS

            def mask_mod(b, h, q, k):
                return allowed[b, q, k]
        block_mask = create_block_mask(mask_mod, B, None, Q, S, device=q_BHQE.device)
        groups = q_BHQE.shape[1] // k_BHSE.shape[1]
        return flex_attention(q_BHQE, k_BHSE, v_BHSE, block_mask=block_mask, enable_gqa=groups > 1)


class XFormers(AttentionBackend):
    """xformers memory-efficient attention (install the ``xformers`` extra; it pins its own torch)."""

    name = "xformers"
    Config = ComponentConfig

    def __init__(self, config):
        super().__init__(config)
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("attention 'xformers' needs the xformers package: pip install 'adaptive-lm[xformers]'")

    def attend(self, q_BHQE, k_BHSE, v_BHSE, *, allowed_BQS, causal):
        import xformers.ops as xops

        groups = q_BHQE.shape[1] // k_BHSE.shape[1]
        k = k_BHSE.repeat_interleave(groups, dim=1)
        v = v_BHSE.repeat_interleave(groups, dim=1)
        if causal:
            bias = xops.LowerTriangularMask()
        else:
            bias = torch.zeros(allowed_BQS.shape, dtype=q_BHQE.dtype, device=q_BHQE.device)
            bias = bias.masked_fill(~allowed_BQS, float("-inf"))[:, None].expand(-1, q_BHQE.shape[1], -1, -1)
        out = xops.memory_efficient_attention(q_BHQE.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)


BACKENDS = [SDPA, Flex, XFormers]

"""Memory sizing by arithmetic, before anything is allocated.

``validate`` and ``train`` refuse a recipe whose model or batch cannot fit in memory from these counts,
rather than dying in the allocator. The counts are lower bounds (the SwiGLU-shaped parameters of each
physical layer, fp32 weights, AdamW's two moments, one float32 hidden state per logical layer and one
float32 logit per token and vocabulary entry), so a refusal is certain, never a guess.
"""

from __future__ import annotations

import os

from adaptive.model.config import ModelConfig

GIB = 1 << 30
TRAIN_BYTES_PER_PARAM = 16  # float32 weight + gradient + AdamW's two moments


def param_count(model: ModelConfig, num_physical: int, vocab_size: int) -> int:
    """Parameters of the embedding, the head (untied) and ``num_physical`` attention + SwiGLU layers."""
    d, kv = model.d_model, model.num_kv_heads * model.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * model.d_ffn + 2 * d
    embeddings = vocab_size * d * (1 if model.tie_embeddings else 2)
    return embeddings + num_physical * per_layer + d


def activation_bytes(model: ModelConfig, vocab_size: int, micro_batch: int, seq_len: int) -> int:
    """A lower bound of one micro-batch's saved activations: a float32 hidden state per logical layer and
    the float32 logits."""
    tokens = micro_batch * seq_len
    return 4 * tokens * (model.num_layers * model.d_model + vocab_size)


def host_memory_bytes() -> int | None:
    """This machine's physical memory (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def parameter_problem(model: ModelConfig, num_physical: int, vocab_size: int) -> str | None:
    """The model is built in host memory first: refuse parameters that cannot fit there at all."""
    memory = host_memory_bytes()
    params = param_count(model, num_physical, vocab_size)
    if memory is None or 4 * params <= memory:
        return None
    return (f"model: {params:,} parameters need {gib(4 * params)} in float32, more than this machine's "
            f"{gib(memory)} of memory (d_model={model.d_model}, d_ffn={model.d_ffn}, {num_physical} unique "
            f"layers, vocabulary {vocab_size}); lower model.d_model, model.d_ffn or model.num_layers")

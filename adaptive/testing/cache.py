"""Cache consistency: incremental decoding with the KV policy's cache equals the full forward.

Two incremental schedules are compared with one full forward: a prefill followed by token-by-token
decoding, and a prefill in chunks of random sizes. Optionally the rows are left-padded first (as batched
generation does), with position ids restarting after the pads. Routing decisions are compared exactly
before the logits, so a decision that flips is reported as a routing mismatch.
"""

from __future__ import annotations

import torch

from adaptive.registry import Registry
from adaptive.testing.compare import ATOL, RTOL, assert_same
from adaptive.testing.models import ModelLike, as_model, left_padded, random_tokens, run, run_pieces, single_threaded

Tensor = torch.Tensor


@single_threaded
def check_cache_consistency(model_or_config: ModelLike, *, tokens_BT: Tensor | None = None, batch: int = 2,
                            length: int = 12, seed: int = 0, prompt_length: int | None = None,
                            chunk_sizes: list[int] | None = None, left_pads: list[int] | None = None,
                            training_rule: bool = False, capacities: list[float] | None = None,
                            registry: Registry | None = None, atol: float = ATOL, rtol: float = RTOL) -> None:
    """Raise AssertionError when decoding through the cache differs from the full forward.

    ``prompt_length`` (default: seeded random) is the prefill before token-by-token decoding;
    ``chunk_sizes`` (default: seeded random) must sum to the length; ``left_pads`` pads each row.
    """
    model = as_model(model_or_config, registry=registry, seed=seed, capacities=capacities)
    tokens_BT = random_tokens(model, batch, length, seed) if tokens_BT is None else tokens_BT
    B, T = tokens_BT.shape
    generator = torch.Generator().manual_seed(seed + 2)
    inputs = dict(training_rule=training_rule, valid_BT=None, position_ids_BT=None)
    if left_pads is not None:
        pad_BT = torch.randint(0, model.vocab_size, (B, T), generator=generator)
        tokens_BT, inputs["valid_BT"], inputs["position_ids_BT"] = left_padded(tokens_BT, left_pads, pad_BT)
    full = run(model, tokens_BT, **inputs)
    prompt_length = prompt_length or int(torch.randint(1, T + 1, (), generator=generator))
    decode = [prompt_length] + [1] * (T - prompt_length)
    chunks = chunk_sizes or random_chunks(T, generator)
    for name, pieces in (("prefill + token-by-token decode", decode), ("chunked prefill", chunks)):
        got = run_pieces(model, tokens_BT, pieces, **inputs)
        context = f"cache consistency ({name}, pieces {pieces}{_padding(left_pads)})"
        assert_same(full, got, context, inputs["valid_BT"], atol, rtol)


def random_chunks(length: int, generator: torch.Generator) -> list[int]:
    """Random positive chunk sizes summing to ``length``."""
    chunks, left = [], length
    while left:
        chunks.append(int(torch.randint(1, left + 1, (), generator=generator)))
        left -= chunks[-1]
    return chunks


def _padding(left_pads: list[int] | None) -> str:
    return f", left pads {left_pads}" if left_pads else ""

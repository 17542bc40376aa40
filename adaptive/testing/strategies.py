"""Hypothesis strategies for the checks, and the ``ci`` / ``thorough`` settings profiles.

``check_inputs(parts)`` draws a micro model config for the named parts and everything the checks take
(seed, batch, length, cut, prompt length, chunk sizes, left pads, capacities, schedule progress):

    @given(inputs=strategies.check_inputs({"router": "my_router", "kv_policy": "recursion_wise"}))
    def test_my_router_is_causal(inputs):
        check_causality(inputs.config, **inputs.causality())
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from adaptive.model.config import ModelConfig
from adaptive.registry import Registry
from adaptive.testing.combos import micro_config

MAX_LENGTH = 24


def register_profiles(load: bool = True) -> None:
    """``ci`` (few derandomized examples, no deadline) and ``thorough``; load the one named by
    ``HYPOTHESIS_PROFILE`` (default ``ci``)."""
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=3, derandomize=True, **common)
    settings.register_profile("thorough", max_examples=60, **common)
    if load:
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


@st.composite
def chunk_sizes(draw, length: int) -> list[int]:
    """Positive chunk sizes that sum to ``length``."""
    chunks, left = [], length
    while left:
        chunks.append(draw(st.integers(1, left)))
        left -= chunks[-1]
    return chunks


def left_pads(batch: int, length: int) -> st.SearchStrategy[list[int]]:
    """Pad tokens before each row (each row keeps at least one real token)."""
    return st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch)


def capacities(num_steps: int) -> st.SearchStrategy[list[float]]:
    """Non-increasing per-step capacities in (0, 1]."""
    fraction = st.floats(0.05, 1.0, allow_nan=False)
    return st.lists(fraction, min_size=num_steps, max_size=num_steps).map(lambda c: sorted(c, reverse=True))


@st.composite
def model_configs(draw, parts: dict[str, str], registry: Registry | None = None, max_recursions: int = 4) -> ModelConfig:
    """A micro model with the named parts: N_r, width, kv heads, norms and tying drawn."""
    shape = dict(
        d_model=draw(st.sampled_from([32, 64])),
        num_kv_heads=draw(st.sampled_from([1, 2, 4])),
        per_step_norms=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        init_std=draw(st.sampled_from([0.02, 0.1, 0.3])),
    )
    num_recursions = draw(st.integers(1, max_recursions))
    min_layers = draw(st.integers(2, 2 * num_recursions))  # up to two layers per step
    return micro_config(parts, num_recursions=num_recursions, min_layers=min_layers, registry=registry, **shape)


@dataclass
class CheckInputs:
    """One drawn model and the inputs of every check; ``causality()`` etc. give each check's kwargs."""

    config: ModelConfig
    seed: int
    batch: int
    length: int
    cut: int
    prompt_length: int
    chunks: list[int]
    pads: list[int]
    capacities: list[float] | None
    progress: float | None

    def causality(self, training_rule: bool = False) -> dict:
        return dict(seed=self.seed, batch=self.batch, length=self.length, cut=self.cut, training_rule=training_rule,
                    capacities=self.capacities, progress=self.progress if training_rule else None)

    def cache(self, padded: bool = False) -> dict:
        return dict(seed=self.seed, batch=self.batch, length=self.length, prompt_length=self.prompt_length,
                    chunk_sizes=self.chunks, left_pads=self.pads if padded else None, capacities=self.capacities)

    def batch_invariance(self, training_rule: bool = False) -> dict:
        return dict(seed=self.seed, batch=self.batch, length=self.length, training_rule=training_rule,
                    capacities=self.capacities, progress=self.progress if training_rule else None)

    def padding(self) -> dict:
        return dict(seed=self.seed, batch=self.batch, length=self.length, left_pads=self.pads,
                    capacities=self.capacities)


@st.composite
def check_inputs(draw, parts: dict[str, str], registry: Registry | None = None, max_batch: int = 3,
                 max_length: int = MAX_LENGTH, max_recursions: int = 4) -> CheckInputs:
    config = draw(model_configs(parts, registry, max_recursions))
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(2, max_length))
    fixed = draw(st.booleans())
    return CheckInputs(
        config=config,
        seed=draw(seeds()),
        batch=batch,
        length=length,
        cut=draw(st.integers(0, length - 2)),
        prompt_length=draw(st.integers(1, length)),
        chunks=draw(chunk_sizes(length)),
        pads=draw(left_pads(batch, length)),
        capacities=draw(capacities(config.num_recursions)) if fixed and config.num_recursions > 1 else None,
        progress=draw(st.none() | st.floats(0.0, 1.0)),
    )


@dataclass
class ServingInputs:
    """One drawn model, prompts and engine schedule for ``check_serving_consistency``."""

    config: ModelConfig
    seed: int
    prompts: list[list[int]]
    max_tokens: int
    schedule: "Schedule"
    capacities: list[float] | None

    def serving(self) -> dict:
        return dict(seed=self.seed, prompts=self.prompts, max_tokens=self.max_tokens, schedule=self.schedule,
                    capacities=self.capacities)


@st.composite
def serving_inputs(draw, parts: dict[str, str], registry: Registry | None = None, max_prompts: int = 4,
                   max_recursions: int = 3) -> ServingInputs:
    """A micro model, prompts of drawn lengths, arrival iterations (the order of arrival with them), batch
    and token limits, block size, and a pool between one request's worst case and plenty (small pools
    preempt), plus per-step capacities (the routing depths)."""
    from adaptive.testing.serving import Schedule

    config = draw(model_configs(parts, registry, max_recursions))
    n = draw(st.integers(1, max_prompts))
    prompts = [draw(st.lists(st.integers(0, 63), min_size=1, max_size=16)) for _ in range(n)]
    max_tokens = draw(st.integers(1, 8))
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    worst = max(-(-(len(p) + max_tokens) // block_size) for p in prompts) * (config.num_layers + 2)
    schedule = Schedule(arrivals=draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)),
                        max_batch=draw(st.integers(1, 4)), max_tokens_per_iteration=draw(st.integers(1, 24)),
                        block_size=block_size, num_blocks=draw(st.none() | st.integers(worst, 3 * worst)))
    fixed = draw(st.booleans())
    return ServingInputs(config, draw(seeds()), prompts, max_tokens, schedule,
                         draw(capacities(config.num_recursions)) if fixed and config.num_recursions > 1 else None)

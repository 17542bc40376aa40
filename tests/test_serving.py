"""The serving engine gives every request exactly what decoding it alone gives (greedy, float64, CPU):
for every registered combination of parts, whatever the arrival order and times, prompt lengths, batch and
token limits, block size, pool size (small pools preempt and recompute) and routing depths (hypothesis
draws them all). The reference decodes one request at a time with the model's own KV cache.

The second half shows the check can fail: an engine that drops a recursion step's KV writes, or that
routes every item with step 0's router, is caught.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive.model.engine import RecursionEngine
from adaptive.serving.kv_pool import PagedCall
from adaptive.serving.model_runner import ModelRunner
from adaptive.serving import paged_flex
from adaptive.testing import combinations, micro_config
from adaptive.testing.serving import Schedule, check_serving_consistency
from adaptive.testing.strategies import serving_inputs

COMBOS = combinations()


def params(combos):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=c.skip)] if c.skip else []) for c in combos]


@pytest.mark.parametrize("combo", params(COMBOS))
@given(data=st.data())
def test_batched_serving_equals_decoding_each_request_alone(combo, data):
    inputs = data.draw(serving_inputs(combo.names()))
    check_serving_consistency(inputs.config, **inputs.serving())


MOR = {"sharing": "middle_cycle", "router": "expert_choice", "kv_policy": "recursion_wise"}
BUSY = Schedule(arrivals=[0, 1, 1, 3], max_batch=3, max_tokens_per_iteration=6, block_size=2)


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
@pytest.mark.parametrize("kv_policy", ["full", "recursion_wise", "recursive_sharing", "hybrid"])
def test_depthwise_batching_with_preemption_equals_decoding_alone(router, kv_policy):
    config = micro_config({"sharing": "middle_cycle", "router": router, "kv_policy": kv_policy}, num_recursions=3)
    prompts = [[5, 9, 2, 7, 1, 3], [11, 3], [8] * 13, [4, 4, 6]]
    tight = Schedule(BUSY.arrivals, BUSY.max_batch, BUSY.max_tokens_per_iteration, BUSY.block_size,
                     num_blocks=-(-(13 + 8) // 2) * 5)  # room for one full-depth request: the others get preempted
    for schedule in (BUSY, tight):
        check_serving_consistency(config, prompts=prompts, max_tokens=8, schedule=schedule, seed=1,
                                  capacities=[0.9, 0.6, 0.3])


@pytest.mark.parametrize("router, kv_policy", [("expert_choice", p) for p in ("full", "recursion_wise",
                                                 "recursive_sharing", "hybrid")] + [("token_choice", "recursion_wise")])
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_flex_attention_in_place_over_the_pool_equals_decoding_alone(router, kv_policy, data):
    """The CUDA default path (FlexAttention over the pool, block mask of each row's pages), run eagerly."""
    inputs = data.draw(serving_inputs({"sharing": "middle_cycle", "router": router, "kv_policy": kv_policy}))
    kwargs = inputs.serving()
    kwargs["schedule"] = dataclasses.replace(kwargs["schedule"], paged_attention="flex")
    check_serving_consistency(inputs.config, **kwargs)


# ---------------------------------------------------------------------------------------------- the check can fail


def test_flex_attention_that_ignores_page_owners_is_caught(monkeypatch):
    """Rows see entries of blocks that other rows own (eager mode scores every entry of the pool)."""
    monkeypatch.setattr(paged_flex, "owned", lambda row_P, block, seq: row_P[block] >= -1)
    tight = dataclasses.replace(BUSY, paged_attention="flex")
    with pytest.raises(AssertionError, match="serving consistency"):
        check_serving_consistency(micro_config(MOR, num_recursions=2), max_tokens=6, schedule=tight, seed=2)



def test_a_dropped_kv_write_is_caught(monkeypatch):
    """The shared block's calls store no keys/values (prelude and coda still do)."""
    block_call = ModelRunner.block_call

    def forgetful(self, groups):
        with monkeypatch.context() as patch:
            patch.setattr(PagedCall, "write", lambda call, j, k_GNE, v_GNE: None)
            block_call(self, groups)

    monkeypatch.setattr(ModelRunner, "block_call", forgetful)
    with pytest.raises(AssertionError, match="serving consistency"):
        check_serving_consistency(micro_config(MOR, num_recursions=2), max_tokens=6, schedule=BUSY, seed=2)


def test_scoring_every_step_with_step_zeros_router_is_caught(monkeypatch):
    route_tokens = RecursionEngine.route_tokens

    def step_zero_router(self, step, h_N1D, first_N1D, carry, capacity):
        return route_tokens(self, 0, h_N1D, first_N1D, carry, capacity)

    monkeypatch.setattr(RecursionEngine, "route_tokens", step_zero_router)
    with pytest.raises(AssertionError, match="serving consistency"):
        check_serving_consistency(micro_config(MOR, num_recursions=3), max_tokens=8, schedule=BUSY, seed=3,
                                  capacities=[0.9, 0.6, 0.3])


def test_steps_that_do_not_share_weights_fall_back_to_per_step_calls(monkeypatch):
    from adaptive.serving import batching_mode
    from adaptive.testing import as_model

    shared = as_model(micro_config(MOR, num_recursions=3))
    assert shared.engine.shared_step_groups() == ([(0, 1, 2)], None)
    assert "depth-wise" in batching_mode(shared)
    sequence = as_model(micro_config({**MOR, "sharing": "sequence"}, num_recursions=2, min_layers=4))
    groups, why = sequence.engine.shared_step_groups()
    assert groups == [(0,), (1,)] and "different physical layers" in why and "per-step" in batching_mode(sequence)
    norms = as_model(micro_config(MOR, num_recursions=3, per_step_norms=True))
    assert "per_step_norms" in norms.engine.shared_step_groups()[1]
    calls = []
    block_call = ModelRunner.block_call
    monkeypatch.setattr(ModelRunner, "block_call", lambda self, groups: calls.append({g.step for g in groups})
                        or block_call(self, groups))
    check_serving_consistency(sequence, max_tokens=6, schedule=BUSY, seed=4)
    assert calls and all(len(steps) == 1 for steps in calls)  # never two steps in one call


def test_items_at_different_steps_share_one_call_of_the_block(monkeypatch):
    calls = []
    block_call = ModelRunner.block_call
    monkeypatch.setattr(ModelRunner, "block_call", lambda self, groups: calls.append(sorted({g.step for g in groups}))
                        or block_call(self, groups))
    check_serving_consistency(micro_config(MOR, num_recursions=3), max_tokens=8, schedule=BUSY, seed=5,
                              capacities=[1.0, 0.7, 0.4])
    assert any(len(steps) >= 2 for steps in calls), calls


def test_a_flex_kernel_that_cannot_be_built_falls_back_to_gather_unless_chosen(monkeypatch):
    from adaptive.serving import EngineConfig, SamplingParams, ServingEngine
    from adaptive.serving import kv_pool
    from adaptive.testing import as_model

    model = as_model(micro_config(MOR, num_recursions=2), seed=0, capacities=[0.8, 0.5])
    want = ServingEngine(model, EngineConfig(paged_attention="gather")).generate([[1, 2, 3]], SamplingParams(
        max_tokens=4, temperature=0))[0].tokens

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(kv_pool, "attend_pages", broken)
    monkeypatch.setattr(EngineConfig, "attention_path", lambda self, device: "flex")  # as "auto" does on CUDA
    with pytest.warns(RuntimeWarning, match="using the gather path"):
        got = ServingEngine(model, EngineConfig()).generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))
    assert got[0].tokens == want
    with pytest.raises(RuntimeError, match="no kernel"):
        ServingEngine(model, EngineConfig(paged_attention="flex")).generate([[1, 2, 3]], SamplingParams(max_tokens=2))

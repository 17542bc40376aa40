"""The serving engine gives every request exactly what decoding it alone gives (greedy, float64, CPU):
for every registered combination of parts, whatever the arrival order and times, prompt lengths, batch and
token limits, block size, pool size (small pools preempt and recompute) and routing depths (hypothesis
draws them all). The reference decodes one request at a time with the model's own KV cache.

The second half shows the check can fail: an engine that drops a recursion step's KV writes, or that
routes every item with step 0's router, is caught.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptive.model.engine import RecursionEngine
from adaptive.serving.kv_pool import PagedCall
from adaptive.serving.model_runner import ModelRunner
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


# ---------------------------------------------------------------------------------------------- the check can fail


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

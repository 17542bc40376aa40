"""Registry-wide property tests: every registered combination of parts is causal (inference rule; training
rule too where the router declares it), consistent under cached decoding, and batch/padding invariant.

The combinations come from the installed plugins at collection time, so a newly installed third-party
plugin is tested without anyone adding it here. Combinations that cannot run together are skipped with
the reason (see adaptive.testing.combos). The second half proves the checks can fail: deliberately leaky
routers, a cache that drops a write and an attention backend with the SDPA top-left ``is_causal`` pitfall
are all caught.

Hypothesis profiles: ``ci`` (default) and ``thorough`` (``HYPOTHESIS_PROFILE=thorough``), see conftest.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from adaptive import AttentionBackend, ComponentConfig, KVPolicy, RouteDecision, Router
from adaptive.model.cache import KVCache
from adaptive.plugins import get_registry
from adaptive.testing import (
    Trace,
    assert_same,
    check_batch_invariance,
    check_cache_consistency,
    check_causality,
    check_padding_invariance,
    combinations,
    micro_config,
)
from adaptive.testing.install import components_registered
from adaptive.testing.strategies import check_inputs


def params(combos):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=c.skip)] if c.skip else []) for c in combos]


def training_rule_params(combos):
    """Combinations whose router declares a causal training rule; the others skip with the reason."""
    registry = get_registry()
    marked = []
    for c in combos:
        router = registry.get("router", c.names()["router"]).cls
        reason = c.skip or (None if router.causal_in_training else (
            f"router {router.name!r} declares a non-causal training rule (causal_in_training=False); its inference "
            f"rule is checked, and test_expert_choice_training_leak_is_detected shows the check catches the leak"))
        marked.append(pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return marked


COMBOS = combinations()  # sharing scheme x router x KV policy x FFN, every registered name
SCHEDULER_COMBOS = combinations(axes=("depth_scheduler", "router"), fixed={"sharing": "cycle", "kv_policy": "full"})
BACKEND_COMBOS = combinations(axes=("attention", "router"), fixed={"sharing": "middle_cycle", "kv_policy": "full"})


# ---------------------------------------------------------------------------------------------- every combination


@pytest.mark.parametrize("combo", params(COMBOS))
@given(data=st.data())
def test_inference_rule_is_causal(combo, data):
    inputs = data.draw(check_inputs(combo.names()))
    check_causality(inputs.config, **inputs.causality())


@pytest.mark.parametrize("combo", training_rule_params(COMBOS))
@given(data=st.data())
def test_training_rule_is_causal_where_declared(combo, data):
    inputs = data.draw(check_inputs(combo.names()))
    check_causality(inputs.config, **inputs.causality(training_rule=True))


@pytest.mark.parametrize("combo", params(COMBOS))
@given(data=st.data(), padded=st.booleans())
def test_cached_decoding_equals_the_full_forward(combo, data, padded):
    inputs = data.draw(check_inputs(combo.names()))
    check_cache_consistency(inputs.config, **inputs.cache(padded))


@pytest.mark.parametrize("combo", params(COMBOS))
@given(data=st.data(), training_rule=st.booleans())
def test_batch_and_padding_invariance(combo, data, training_rule):
    inputs = data.draw(check_inputs(combo.names()))
    check_batch_invariance(inputs.config, **inputs.batch_invariance(training_rule))
    check_padding_invariance(inputs.config, **inputs.padding())


@pytest.mark.parametrize("combo", params(SCHEDULER_COMBOS))
@given(data=st.data())
def test_depth_schedulers_keep_every_property(combo, data):
    inputs = data.draw(check_inputs(combo.names()))
    router = get_registry().get("router", combo.names()["router"]).cls
    scheduled = {"capacities": None}  # the scheduler under test decides, at the drawn training progress
    check_causality(inputs.config, **{**inputs.causality(training_rule=router.causal_in_training), **scheduled})
    check_batch_invariance(inputs.config, **{**inputs.batch_invariance(training_rule=True), **scheduled})
    check_cache_consistency(inputs.config, **{**inputs.cache(), **scheduled})


@pytest.mark.parametrize("combo", params(BACKEND_COMBOS))
@given(data=st.data())
def test_attention_backends_keep_every_property(combo, data):
    inputs = data.draw(check_inputs(combo.names()))
    check_causality(inputs.config, **inputs.causality())
    check_cache_consistency(inputs.config, **inputs.cache(padded=True))
    check_padding_invariance(inputs.config, **inputs.padding())


def test_every_registered_name_appears_in_the_grid():
    """Nothing is left out silently: each registered router, KV policy, sharing scheme and FFN is in some
    combination, and each skipped combination carries a reason."""
    registry = get_registry()
    for axis, kind in [("sharing", "sharing_scheme"), ("router", "router"), ("kv_policy", "kv_policy"), ("ffn", "ffn")]:
        assert {c.names()[axis] for c in COMBOS} == set(registry.names(kind))
    assert all(c.skip is None or len(c.skip) > 20 for c in COMBOS)
    assert any(c.skip is None for c in COMBOS if c.names()["router"] == "expert_choice")


# ---------------------------------------------------------------------------------------------- the checks can fail


class SequenceMeanRouter(Router):
    """Leaky test router: a token continues iff its score beats the mean score of its whole row."""

    name = "test_sequence_mean"
    Config = ComponentConfig

    def route(self, hidden_BTD, ctx):
        score_BT = hidden_BTD[..., 0]
        return RouteDecision(score_BT > score_BT.mean(1, keepdim=True), torch.ones_like(score_BT))


class LeakyGateRouter(Router):
    """Leaky test router: keeps every token, but the gate looks at the mean hidden state of the whole row
    (so only the logits can reveal the leak)."""

    name = "test_leaky_gate"
    Config = ComponentConfig

    def route(self, hidden_BTD, ctx):
        gate_BT = torch.sigmoid(hidden_BTD[..., 1] + hidden_BTD[..., 1].mean(1, keepdim=True))
        return RouteDecision(ctx.active_BT, gate_BT, num_selected=hidden_BTD.shape[1])


class ChunkOffsetRouter(Router):
    """Inconsistent test router: keeps every other column of the current forward call. Causal (suffixes and
    prefixes see the same offsets) but decoding one token at a time keeps every token."""

    name = "test_chunk_offset"
    Config = ComponentConfig

    def route(self, hidden_BTD, ctx):
        B, T, _ = hidden_BTD.shape
        keep_BT = (torch.arange(T) % 2 == 0).expand(B, T)
        return RouteDecision(keep_BT, torch.ones(B, T, dtype=hidden_BTD.dtype))


class BatchMeanRouter(Router):
    """Batch-leaky test router: a token continues iff its score beats the batch mean at its position."""

    name = "test_batch_mean"
    Config = ComponentConfig

    def route(self, hidden_BTD, ctx):
        score_BT = hidden_BTD[..., 0]
        return RouteDecision(score_BT >= score_BT.mean(0, keepdim=True), torch.ones_like(score_BT))


class TopLeftCausal(AttentionBackend):
    """Broken test backend: ignores the mask and always uses ``is_causal=True``, which SDPA aligns top-left
    when there are fewer queries than keys (SPEC §4's pitfall)."""

    name = "test_top_left_causal"
    Config = ComponentConfig

    def attend(self, q_BHQE, k_BHSE, v_BHSE, *, allowed_BQS, causal):
        return F.scaled_dot_product_attention(q_BHQE, k_BHSE, v_BHSE, is_causal=True, enable_gqa=True)


def leaky_config(router: str = "all", kv_policy: str = "recursion_wise", attention: str = "sdpa", num_recursions: int = 3):
    return micro_config({"sharing": "middle_cycle", "router": router, "kv_policy": kv_policy, "attention": attention},
                        num_recursions=num_recursions, init_std=0.3)


@given(seed=st.integers(0, 2**16), num_recursions=st.integers(2, 4), length=st.integers(12, 24))
def test_expert_choice_training_leak_is_detected(seed, num_recursions, length):
    """Top-k over the sequence is not causal: the check finds it in the training rule (the cut leaves more
    prefix tokens than the top-k keeps, so a dominating suffix must displace some), not in the inference rule."""
    config = leaky_config("expert_choice", num_recursions=num_recursions)
    cut = length - 1 - max(1, length // (2 * num_recursions))
    with pytest.raises(AssertionError, match="causality \\(training rule\\)"):
        check_causality(config, seed=seed, length=length, cut=cut, training_rule=True)
    check_causality(config, seed=seed, length=length, cut=cut, training_rule=False)


@given(seed=st.integers(0, 2**16))
def test_a_router_that_looks_at_the_whole_sequence_is_caught(seed):
    with components_registered(SequenceMeanRouter):
        with pytest.raises(AssertionError, match=r"routing mismatch at row \d+, position \d+, step \d+"):
            check_causality(leaky_config("test_sequence_mean"), seed=seed, length=16)


@given(seed=st.integers(0, 2**16))
def test_a_gate_that_looks_at_the_whole_sequence_is_caught(seed):
    with components_registered(LeakyGateRouter):
        with pytest.raises(AssertionError, match=r"logits differ at row \d+, position \d+"):
            check_causality(leaky_config("test_leaky_gate"), seed=seed, length=16)


@given(seed=st.integers(0, 2**16))
def test_a_router_that_depends_on_the_chunk_passes_causality_but_not_the_cache_check(seed):
    with components_registered(ChunkOffsetRouter):
        config = leaky_config("test_chunk_offset")
        check_causality(config, seed=seed, length=16, cut=7)
        with pytest.raises(AssertionError, match=r"cache consistency \(prefill \+ token-by-token decode.*routing mismatch"):
            check_cache_consistency(config, seed=seed, length=12, prompt_length=2)


@given(seed=st.integers(0, 2**16))
def test_a_router_that_looks_at_the_batch_is_caught(seed):
    with components_registered(BatchMeanRouter):
        config = leaky_config("test_batch_mean")
        check_causality(config, seed=seed, batch=1, length=12)
        with pytest.raises(AssertionError, match="batch invariance"):
            check_batch_invariance(config, seed=seed, batch=3, length=12)


@given(seed=st.integers(0, 2**16))
def test_a_cache_that_drops_a_write_is_caught(seed):
    """A KV cache that silently loses the keys/values of column 1 at one layer is found by the cache check."""
    original = KVCache.write

    def dropping(self, layer, cols_BK, k_BGKE, v_BGKE, mask_BK, *args, **kwargs):
        if layer == 0:
            keep_BK = cols_BK != 1
            mask_BK = keep_BK if mask_BK is None else mask_BK & keep_BK
        return original(self, layer, cols_BK, k_BGKE, v_BGKE, mask_BK, *args, **kwargs)

    config = leaky_config("expert_choice")
    check_cache_consistency(config, seed=seed, length=10)
    KVCache.write = dropping
    try:
        with pytest.raises(AssertionError, match="cache consistency"):
            check_cache_consistency(config, seed=seed, length=10)
    finally:
        KVCache.write = original


@given(seed=st.integers(0, 2**16))
def test_top_left_causal_attention_is_caught(seed):
    """A backend that trusts SDPA's is_causal with fewer queries than keys breaks decoding and padding,
    though a plain full forward without padding stays causal."""
    with components_registered(TopLeftCausal):
        config = leaky_config(attention="test_top_left_causal")
        check_causality(config, seed=seed, length=12)
        with pytest.raises(AssertionError, match="cache consistency"):
            check_cache_consistency(config, seed=seed, length=10, prompt_length=4)
        with pytest.raises(AssertionError, match="padding invariance"):
            check_padding_invariance(config, seed=seed, batch=2, length=10, left_pads=[3, 0])


# ---------------------------------------------------------------------------------------------- the grid and the messages


class PickyPolicy(KVPolicy):
    """Test policy that declares it cannot serve beside the ``all`` router."""

    name = "test_picky"
    Config = ComponentConfig

    @classmethod
    def incompatible_with(cls, parts):
        return "needs a router that routes" if parts["router"].name == "all" else None

    def writes(self, step):
        return "selected"

    def reads(self, step):
        return (step,)


def test_a_new_plugin_joins_the_grid_and_its_declared_incompatibilities_skip_with_the_reason():
    with components_registered(PickyPolicy, SequenceMeanRouter):
        grid = {c.id: c for c in combinations(probe=False)}
    assert "needs a router that routes" in grid["cycle-all-test_picky-swiglu"].skip
    assert grid["cycle-expert_choice-test_picky-swiglu"].skip is None
    assert grid["middle_cycle-test_sequence_mean-recursion_wise-swiglu"].skip is None
    assert "no recursion steps" in grid["none-test_sequence_mean-full-swiglu"].skip


def test_failure_messages_name_the_earliest_row_position_and_step():
    logits_BTV = torch.zeros(2, 5, 3, dtype=torch.float64)
    selected_RBT = torch.ones(2, 2, 5, dtype=torch.bool)
    expected = Trace(logits_BTV, selected_RBT, torch.full((2, 5), 2))
    flipped = Trace(logits_BTV, selected_RBT.clone(), torch.full((2, 5), 2))
    flipped.selected_RBT[1, 0, 4] = flipped.selected_RBT[1, 1, 3] = False
    with pytest.raises(AssertionError, match="here: routing mismatch at row 1, position 3, step 1: expected selected, "
                       "got not selected \\(2 decisions differ"):
        assert_same(expected, flipped, "here")
    moved = Trace(logits_BTV.clone(), selected_RBT, torch.full((2, 5), 2))
    moved.logits_BTV[0, 2, 1] = 1e-6
    with pytest.raises(AssertionError, match="logits differ at row 0, position 2 by up to 1.000e-06"):
        assert_same(expected, moved, "here")
    assert_same(expected, moved, "here", atol=1e-5)

"""Unit tests of the example router, independent of the rest of the model."""

import pytest
import torch
from pydantic import ValidationError

from adaptive import RouteContext, Router
from adaptive_example_router import LinearThresholdRouter, register_routers

B, T, D, STEPS = 2, 7, 16, 3


def make_router(**options) -> LinearThresholdRouter:
    torch.manual_seed(0)
    config = LinearThresholdRouter.Config(**options)
    return LinearThresholdRouter.from_config(config, d_model=D, num_steps=STEPS)


def context(step: int, active_BT: torch.Tensor) -> RouteContext:
    ones_BT = torch.ones(B, T, dtype=torch.bool)
    return RouteContext(step=step, num_steps=STEPS, capacity=1.0, training_rule=True, active_BT=active_BT,
                        valid_BT=ones_BT, first_hidden_BTD=torch.zeros(B, T, D))


def test_registers_one_router_subclass():
    registered = []
    register_routers(register=registered.append)
    assert registered == [LinearThresholdRouter] and issubclass(LinearThresholdRouter, Router)


def test_continues_exactly_where_sigmoid_of_score_exceeds_threshold():
    router = make_router(threshold=0.5, alpha=0.5)
    with torch.no_grad():
        router.scorers[1].weight.zero_()
        router.scorers[1].weight[0, 0] = 1.0
        router.scorers[1].bias.zero_()
    hidden_BTD = torch.zeros(B, T, D)
    hidden_BTD[..., 0] = torch.linspace(-3, 3, T)  # scores -3..3: the positive half continues
    decision = router.route(hidden_BTD, context(1, torch.ones(B, T, dtype=torch.bool)))
    assert decision.selected_BT.dtype == torch.bool and decision.num_selected is None
    assert torch.equal(decision.selected_BT, hidden_BTD[..., 0] > 0)
    assert torch.allclose(decision.gate_BT, 0.5 * torch.sigmoid(hidden_BTD[..., 0]))


def test_never_revives_a_token_that_stopped():
    router = make_router(initial_keep=0.99)
    active_BT = torch.rand(B, T) > 0.5
    decision = router.route(torch.randn(B, T, D), context(0, active_BT))
    assert not (decision.selected_BT & ~active_BT).any()
    assert decision.selected_BT.sum() > 0


def test_decision_for_a_token_ignores_later_tokens():
    router = make_router()
    hidden_BTD = torch.randn(B, T, D)
    changed_BTD = hidden_BTD.clone()
    changed_BTD[:, 4:] = 100 * torch.randn(B, T - 4, D)
    active_BT = torch.ones(B, T, dtype=torch.bool)
    first = router.route(hidden_BTD, context(2, active_BT))
    second = router.route(changed_BTD, context(2, active_BT))
    assert torch.equal(first.selected_BT[:, :4], second.selected_BT[:, :4])
    assert torch.equal(first.gate_BT[:, :4], second.gate_BT[:, :4])


def test_gate_carries_gradient_to_the_scorer_of_its_step():
    router = make_router()
    decision = router.route(torch.randn(B, T, D), context(1, torch.ones(B, T, dtype=torch.bool)))
    decision.gate_BT.sum().backward()
    assert router.scorers[1].weight.grad.abs().sum() > 0
    assert router.scorers[0].weight.grad is None


@pytest.mark.parametrize("options", [{"threshold": 1.5}, {"alpha": 0}, {"thresold": 0.5}])
def test_config_rejects_bad_values(options):
    with pytest.raises(ValidationError):
        LinearThresholdRouter.Config(**options)


def test_linear_threshold_keeps_every_property():
    """The framework's own checks: causality, cache consistency, batch and padding invariance."""
    from adaptive.testing import check_all, components_registered, micro_config

    with components_registered(LinearThresholdRouter):  # a no-op when the plugin is installed
        parts = {"sharing": "middle_cycle", "router": "linear_threshold", "kv_policy": "recursion_wise"}
        check_all(micro_config(parts, num_recursions=3))


def test_initial_keep_survives_building_a_model():
    """The host's generic init must not override the router's own (its bias sets the initial keep rate)."""
    import math

    from adaptive.model import ModelConfig, build_model
    from adaptive.plugins import get_registry
    from adaptive.testing import components_registered

    with components_registered(LinearThresholdRouter):
        cfg = ModelConfig(preset="micro", num_layers=5, num_recursions=3, sharing={"name": "middle_cycle"},
                          router={"name": "linear_threshold", "initial_keep": 0.8})
        model = build_model(cfg, get_registry())
    for scorer in model.router.scorers:
        assert torch.allclose(scorer.bias, torch.full_like(scorer.bias, math.log(0.8 / 0.2)))

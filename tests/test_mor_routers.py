"""MoR routers (expert-choice, token-choice) and the capacity warm-up schedule.

Router-level tests feed hand-made hidden states through a linear head that reads feature 0 (or features
0..R-1), so the router logits are known exactly; model-level tests run the micro model in float64 on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from adaptive import RouteContext, RoutingStats
from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry
from adaptive.registry import ComponentSpec

D, R = 8, 3
TOL = dict(atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------- helpers


def make_router(name: str, num_steps: int = R, **options):
    router = get_registry().build("router", ComponentSpec(name=name, **options), d_model=D, num_steps=num_steps)
    return router.double()


def read_features(head: torch.nn.Linear) -> None:
    """Make a linear head output its input's first features: logits_c = hidden[..., c]."""
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for c in range(head.weight.shape[0]):
            head.weight[c, c] = 1.0


def hidden_with(logits_BT: torch.Tensor, channels: int = 1) -> torch.Tensor:
    logits_BT = torch.as_tensor(logits_BT, dtype=torch.float64)
    if logits_BT.dim() == 1:
        logits_BT = logits_BT[None]
    hidden_BTD = torch.randn(*logits_BT.shape[:2], D, dtype=torch.float64)
    hidden_BTD[..., :channels] = logits_BT.reshape(*logits_BT.shape[:2], channels)
    return hidden_BTD


def context(hidden_BTD, step=0, capacity=1.0, training=True, active=None, valid=None, carry=None, docs=None):
    B, T, _ = hidden_BTD.shape
    ones = torch.ones(B, T, dtype=torch.bool)
    return RouteContext(step, R, capacity, training, ones if active is None else active,
                        ones if valid is None else valid, hidden_BTD, carry, docs)


def expert_router(**options):
    router = make_router("expert_choice", **options)
    for head in router.heads:
        read_features(head)
    return router


def mor_model(router: dict, seed: int = 0, **extra):
    torch.manual_seed(seed)
    config = ModelConfig(preset="micro", num_layers=5, num_recursions=3, sharing={"name": "middle_cycle"},
                         router=router, **extra)
    return build_model(config, get_registry()).double()


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def record_combine(model):
    """Wrap the router's combine to record (hidden, block_out, gate, first, step, result) per call."""
    calls, original = [], model.router.combine

    def combine(hidden_KD, block_out_KD, gate_K, first_KD, step):
        result = original(hidden_KD, block_out_KD, gate_K, first_KD, step)
        calls.append((hidden_KD, block_out_KD, gate_K, first_KD, step, result))
        return result

    model.router.combine = combine
    return calls


def gathered_columns(selected_BT, K):
    """The columns the engine gathers for a step: the selected ones in order, then (surplus) the rest."""
    return torch.sort((~selected_BT).to(torch.uint8), dim=1, stable=True).indices[:, :K]


# ---------------------------------------------------------------------------- expert-choice: top-k


def test_registered_with_their_causality_flags():
    registry = get_registry()
    assert registry.get("router", "expert_choice").cls.causal_in_training is False
    assert registry.get("router", "token_choice").cls.causal_in_training is True
    assert "capacity_warmup" in registry.names("depth_scheduler")


@pytest.mark.parametrize("capacity, expected", [(0.5, [0, 1, 2]), (4 / 6, [0, 1, 2, 3]), (1 / 6, [1]), (0.01, [1])])
def test_top_k_keeps_the_kth_token_and_breaks_ties_by_position(capacity, expected):
    router = expert_router()
    hidden = hidden_with([1.0, 5.0, 1.0, 1.0, 0.0, 1.0])  # four tokens tie at 1.0
    decision = router.route(hidden, context(hidden, step=1, capacity=capacity))
    assert decision.num_selected == len(expected)
    assert decision.selected_BT[0].nonzero().flatten().tolist() == expected


def test_top_k_counts_never_zero_at_one_token():
    router = expert_router()
    hidden = hidden_with([-3.0])
    decision = router.route(hidden, context(hidden, step=2, capacity=1 / 3))
    assert decision.num_selected == 1 and decision.selected_BT.all()


def test_top_k_ranks_padding_after_real_tokens_and_never_exceeds_the_active_count():
    router = expert_router()
    hidden = hidden_with([[9.0, 1.0, 2.0, 8.0, 3.0, 4.0]])
    valid = torch.tensor([[False, True, True, False, True, True]])
    decision = router.route(hidden, context(hidden, step=1, capacity=0.5, valid=valid))
    assert decision.selected_BT[0].nonzero().flatten().tolist() == [2, 4, 5]  # 9 and 8 are padding
    active = torch.tensor([[True, True, False, False, False, True]])
    decision = router.route(hidden, context(hidden, step=2, capacity=0.9, active=active, carry=3))
    assert decision.num_selected == 3 and torch.equal(decision.selected_BT, active)


def test_engine_filters_hierarchically_and_keeps_exact_counts_in_training():
    model = mor_model({"name": "expert_choice"}).train()
    B, T = 3, 10
    out = model(tokens(B, T))
    selected = out.stats.selected_per_step
    expected = [10, math.floor(10 * 2 / 3), math.floor(10 / 3)]  # 10, 6, 3
    previous = torch.ones(B, T, dtype=torch.bool)
    for step, (sel_BT, logits_BT) in enumerate(zip(selected, out.stats.logits_per_step)):
        assert sel_BT.sum(1).tolist() == [expected[step]] * B
        assert not (sel_BT & ~previous).any(), "a token not kept at step r was kept at r+1"
        for b in range(B):  # the kept tokens are the top-k of this step's logits among the still-active ones
            candidates = sorted(previous[b].nonzero().flatten().tolist(), key=lambda t: (-logits_BT[b, t].item(), t))
            assert sel_BT[b].nonzero().flatten().tolist() == sorted(candidates[: expected[step]])
        previous = sel_BT
    histogram = torch.bincount(out.stats.depth_BT.flatten(), minlength=4).tolist()
    assert histogram == [0, B * 4, B * 3, B * 3]


def test_capacities_are_validated():
    with pytest.raises(ValueError, match="capacities"):
        make_router("expert_choice", capacities=[1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="capacities"):
        make_router("expert_choice", capacities=[1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="capacities"):
        make_router("expert_choice", capacities=[1.5, 0.5, 0.2])
    with pytest.raises(ValueError, match="capacities"):
        mor_model({"name": "expert_choice", "capacities": [1.0, 0.5]})
    assert make_router("expert_choice", capacities=[1.0, 0.5, 0.5]).base_capacities() == [1.0, 0.5, 0.5]
    assert make_router("expert_choice", num_steps=4).base_capacities() == [1.0, 0.75, 0.5, 0.25]


# ---------------------------------------------------------------------------- expert-choice: gates


@pytest.mark.parametrize("score", ["sigmoid", "tanh", "softmax"])
@pytest.mark.parametrize("gate_mode", ["block_output", "delta"])
def test_gate_modes_on_a_tiny_model(gate_mode, score):
    model = mor_model({"name": "expert_choice", "gate_mode": gate_mode, "score": score, "alpha": 0.3}).train()
    calls = record_combine(model)
    out = model(tokens(2, 9))
    assert len(calls) == R  # step 0 keeps every token (capacity 1) and still combines
    for hidden, block_out, gate, _, step, result in calls:
        g = gate.unsqueeze(-1)
        expected = hidden + g * block_out if gate_mode == "block_output" else hidden + g * (block_out - hidden)
        torch.testing.assert_close(result, expected, **TOL)
        logits_BT, sel_BT = out.stats.logits_per_step[step], out.stats.selected_per_step[step]
        G = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "softmax": torch.sigmoid}[score]
        torch.testing.assert_close(gate, 0.3 * G(logits_BT[sel_BT]).view(gate.shape), **TOL)


def test_gate_modes_differ_by_the_residual_term():
    """Same weights, same routing: block_output's new hidden exceeds delta's by exactly g * H."""
    results = {}
    for mode in ("block_output", "delta"):
        model = mor_model({"name": "expert_choice", "gate_mode": mode}, seed=3).train()
        calls = record_combine(model)
        model(tokens(1, 6, seed=1))
        results[mode] = calls[0]
    hidden, block_out, gate, _, _, bo = results["block_output"]
    g = gate.unsqueeze(-1)
    torch.testing.assert_close(bo - results["delta"][5], g * hidden, **TOL)
    torch.testing.assert_close(bo, (1 + g) * hidden + g * (block_out - hidden), **TOL)


# ------------------------------------------------------------------ expert-choice: causality fixes


def test_bce_aux_loss_matches_a_hand_computation():
    router = expert_router(bce_coef=0.01)
    logits = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]
    active = torch.tensor([[True, True, True, False, True, True]])  # token 3 already stopped
    hidden = hidden_with(logits)
    decision = router.route(hidden, context(hidden, step=1, capacity=0.5, active=active, carry=5))
    kept = {0, 2, 5}  # k = 3 among the active: 2.0, 0.5, 0.0
    assert set(decision.selected_BT[0].nonzero().flatten().tolist()) == kept
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = [-math.log(sigmoid(x)) if t in kept else -math.log(1 - sigmoid(x))
             for t, x in enumerate(logits) if active[0, t]]
    assert decision.aux_losses["router_bce"].item() == pytest.approx(0.01 * sum(terms) / len(terms), rel=1e-12)
    assert "router_z" not in decision.aux_losses


def test_z_loss_and_no_aux_losses_at_inference():
    router = expert_router(z_loss_coef=0.5)
    logits = [2.0, -1.0, 0.5, 3.0]
    hidden = hidden_with(logits)
    decision = router.route(hidden, context(hidden, capacity=1.0))
    assert decision.aux_losses["router_z"].item() == pytest.approx(0.5 * sum(x * x for x in logits) / 4, rel=1e-12)
    assert router.route(hidden, context(hidden, training=False)).aux_losses == {}


def test_sampling_accuracy_is_agreement_of_the_causal_rule_with_top_k():
    router = expert_router()
    hidden = hidden_with([1.5, 0.5, -2.5, -3.5, -0.5, -4.5])  # top-3: {0, 1, 4}; sigmoid > 0.5: {0, 1}
    decision = router.route(hidden, context(hidden, step=1, capacity=0.5))
    assert decision.metrics["sampling_acc"].item() == pytest.approx(5 / 6)
    assert decision.metrics["selected_frac"].item() == pytest.approx(0.5)
    hidden = hidden_with([1.5, 0.5, -2.5, -3.5, 0.1, -4.5])
    assert router.route(hidden, context(hidden, step=1, capacity=0.5)).metrics["sampling_acc"].item() == 1.0


def test_inference_rule_is_sigmoid_above_one_half_and_data_dependent():
    router = expert_router()
    hidden = hidden_with([1.5, 0.0, -2.5, 0.2])
    active = torch.tensor([[True, True, True, False]])
    decision = router.route(hidden, context(hidden, step=1, capacity=2 / 3, training=False, active=active))
    assert decision.num_selected is None and decision.max_selected is None
    assert decision.selected_BT[0].tolist() == [True, False, False, False]
    full = router.route(hidden, context(hidden, step=1, capacity=1.0, training=False, active=active))
    assert full.selected_BT[0].tolist() == [True, True, True, False]  # top-k at capacity 1 keeps all active


def test_aux_router_trains_on_detached_states_and_decides_at_inference():
    router = make_router("expert_choice", causal_rule="aux_router", bce_coef=1.0)
    read_features(router.heads[1])
    hidden = hidden_with([1.0, 2.0, -1.0, -2.0]).requires_grad_(True)
    decision = router.route(hidden, context(hidden, step=1, capacity=0.5))
    decision.aux_losses["router_bce"].backward()
    assert hidden.grad is None and router.heads[1].weight.grad is None
    assert router.aux_heads[1][0].weight.grad.abs().sum() > 0
    inference = router.route(hidden, context(hidden, step=1, capacity=0.5, training=False))
    aux_logits = router.aux_heads[1](hidden)[..., 0]
    assert torch.equal(inference.selected_BT, aux_logits > 0)
    torch.testing.assert_close(inference.gate_BT, 0.1 * torch.sigmoid(hidden[..., 0]), **TOL)


def test_training_top_k_is_not_causal_but_the_inference_rule_is():
    router = expert_router()
    base = [0.3, 0.2, -0.1, 0.4, 0.0, -0.3]
    hidden_a, hidden_b = hidden_with(base), hidden_with(base[:-1] + [9.0])  # only the last token changes
    train = [router.route(h, context(h, step=1, capacity=0.5)).selected_BT[0, :-1] for h in (hidden_a, hidden_b)]
    assert not torch.equal(*train), "a later token's score should be able to evict an earlier token"
    infer = [router.route(h, context(h, step=1, training=False)).selected_BT[0, :-1] for h in (hidden_a, hidden_b)]
    assert torch.equal(*infer)


def test_eval_mode_model_outputs_ignore_the_suffix():
    model = mor_model({"name": "expert_choice"}).eval()
    a, b = tokens(2, 10, seed=0), tokens(2, 10, seed=0)
    b[:, 6:] = tokens(2, 4, seed=5)
    torch.testing.assert_close(model(a).logits_BTV[:, :6], model(b).logits_BTV[:, :6], **TOL)


# ------------------------------------------------------------------------ expert-choice: documents


def per_doc_reference(logits, docs, capacity, at_least_one):
    kept = []
    for doc in sorted(set(docs)):
        members = [t for t, d in enumerate(docs) if d == doc]
        quota = math.floor(len(members) * capacity + 1e-9)
        quota = max(1, quota) if at_least_one else quota
        kept += sorted(members, key=lambda t: (-logits[t], t))[:quota]
    return sorted(kept)


@pytest.mark.parametrize("at_least_one", [False, True])
def test_top_k_is_taken_within_each_packed_document(at_least_one):
    router = expert_router(doc_quota="at_least_one" if at_least_one else "floor")
    logits = [0.9, 0.1, 0.5, 0.7, 3.0, 2.0, 1.0, 1.0, 1.0, 0.0, 5.0, -1.0]
    docs = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 3]
    hidden = hidden_with(logits)
    decision = router.route(hidden, context(hidden, step=1, capacity=0.5, docs=torch.tensor([docs])))
    expected = per_doc_reference(logits, docs, 0.5, at_least_one)
    assert decision.selected_BT[0].nonzero().flatten().tolist() == expected
    assert decision.num_selected is None
    if at_least_one:
        assert expected == [0, 3, 4, 5, 6, 10, 11] and decision.max_selected is None
    else:
        assert expected == [0, 3, 4, 5, 6] and decision.max_selected == 6


def test_packed_documents_through_the_engine_stay_within_quota():
    model = mor_model({"name": "expert_choice"}).train()
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 3 + [2] * 6])
    out = model(tokens(2, 12), doc_ids_BT=docs)
    for step, capacity in enumerate([1.0, 2 / 3, 1 / 3]):
        sel = out.stats.selected_per_step[step]
        for b in range(2):
            for doc in docs[b].unique():
                members = docs[b] == doc
                assert sel[b][members].sum() == math.floor(int(members.sum()) * capacity + 1e-9)


# ------------------------------------------------------------------------------------ token-choice


def token_router(**options):
    router = make_router("token_choice", **options)
    read_features(router.head)
    return router


def test_token_choice_assigns_a_depth_and_runs_steps_up_to_it():
    router = token_router()
    # the last token ties between depths 0 and 1: the shallower wins
    logits = torch.tensor([[[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [1.0, 1.0, 0]]], dtype=torch.float64)
    hidden = hidden_with(logits, channels=R)
    first = router.route(hidden, context(hidden))
    assert first.num_selected == 4 and first.selected_BT.all()
    assert first.carry.depth_BT[0].tolist() == [0, 1, 2, 0]
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(first.carry.gate_BT, probs.max(-1).values, **TOL)
    for step in (1, 2):
        decision = router.route(hidden, context(hidden, step=step, carry=first.carry))
        assert decision.selected_BT[0].tolist() == [d >= step for d in [0, 1, 2, 0]]
        assert decision.gate_BT[0, :, 1].tolist() == [float(d == step) for d in [0, 1, 2, 0]]


def test_token_choice_depths_through_the_engine():
    model = mor_model({"name": "token_choice"}).train()
    out = model(tokens(2, 12))
    loads = torch.stack([out.stats.metrics[f"depth_load{i}/step0"] for i in range(R)])
    histogram = torch.bincount(out.stats.depth_BT.flatten() - 1, minlength=R).double() / 24
    torch.testing.assert_close(loads, histogram, **TOL)
    for r in range(1, R):
        assert not (out.stats.selected_per_step[r] & ~out.stats.selected_per_step[r - 1]).any()


@pytest.mark.parametrize("update", ["code", "paper"])
def test_token_choice_update_rules(update):
    model = mor_model({"name": "token_choice", "update": update, "alpha": 0.7}).train()
    calls = record_combine(model)
    out = model(tokens(2, 12))
    assert len(calls) == R
    for hidden, block_out, gate2, first, step, result in calls:
        g, last = gate2[..., :1], gate2[..., 1:] > 0.5
        gathered_BK = gathered_columns(out.stats.selected_per_step[step], hidden.shape[1])
        assert torch.equal(last[..., 0], out.stats.depth_BT.gather(1, gathered_BK) == step + 1)
        going_on = g * block_out if update == "paper" else block_out
        torch.testing.assert_close(result, torch.where(last, first + g * block_out, going_on), **TOL)
    hidden, block_out, gate2, first, _, _ = calls[0]
    gate_expected = 0.7 * torch.softmax(model.router.head(first), -1).max(-1).values
    torch.testing.assert_close(gate2[..., 0], gate_expected, **TOL)


def test_token_choice_static_shapes_give_the_same_result():
    outs = []
    for static in (False, True):
        model = mor_model({"name": "token_choice", "static_shapes": static}, seed=4).train()
        outs.append(model(tokens(2, 12, seed=2)))
    torch.testing.assert_close(outs[0].logits_BTV, outs[1].logits_BTV, **TOL)


def test_token_choice_is_causal_in_training():
    model = mor_model({"name": "token_choice"}).train()
    a, b = tokens(2, 10, seed=0), tokens(2, 10, seed=0)
    b[:, 6:] = tokens(2, 4, seed=5)
    torch.testing.assert_close(model(a).logits_BTV[:, :6], model(b).logits_BTV[:, :6], **TOL)


def test_balance_loss_matches_a_hand_computation():
    router = token_router(balance_coef=0.1, z_loss_coef=0.01)
    logits = torch.tensor([[[2.0, 0, 0], [2.0, 1.0, 0], [0, 0, 1.0], [9.0, 9.0, 9.0]]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, False]])
    hidden = hidden_with(logits, channels=R)
    decision = router.route(hidden, context(hidden, valid=valid))
    probs = torch.softmax(logits[0, :3], -1)
    f = [2 / 3, 0.0, 1 / 3]  # depths 0, 0, 2 among the three real tokens
    P = probs.mean(0).tolist()
    expected = 0.1 * R * sum(fi * pi for fi, pi in zip(f, P))
    assert decision.aux_losses["router_balance"].item() == pytest.approx(expected, rel=1e-12)
    z = torch.logsumexp(logits[0, :3], -1).square().mean().item()
    assert decision.aux_losses["router_z"].item() == pytest.approx(0.01 * z, rel=1e-12)
    assert [decision.metrics[f"depth_load{i}"].item() for i in range(R)] == pytest.approx(f)


def test_loss_free_bias_moves_towards_the_underloaded_depths():
    router = make_router("token_choice", balancing="loss_free", bias_rate=0.01)
    stats = RoutingStats(metrics={f"depth_load{i}/step0": torch.tensor(x) for i, x in enumerate([0.5, 0.3, 0.2])})
    router.after_optimizer_step(stats)
    router.after_optimizer_step(stats)
    assert router.balance_bias.tolist() == pytest.approx([-0.02, 0.02, 0.02])
    assert not router.balance_bias.requires_grad


def test_loss_free_bias_steers_selection_only():
    router = token_router(balancing="loss_free")
    logits = torch.tensor([[[2.0, 0, 0], [0, 2.0, 0]]], dtype=torch.float64)
    hidden = hidden_with(logits, channels=R)
    router.balance_bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    decision = router.route(hidden, context(hidden))
    assert decision.carry.depth_BT.tolist() == [[2, 2]]
    torch.testing.assert_close(decision.carry.gate_BT, torch.softmax(logits, -1)[..., 2], **TOL)
    assert decision.aux_losses == {}


def test_loss_free_bias_is_a_persistent_fp32_buffer_updated_from_a_forward():
    model = mor_model({"name": "token_choice", "balancing": "loss_free"}).train()
    out = model(tokens(2, 12))
    loads = torch.tensor([out.stats.metrics[f"depth_load{i}/step0"].item() for i in range(R)])
    model.after_optimizer_step(out.stats)
    torch.testing.assert_close(model.router.balance_bias, 0.001 * torch.sign(loads.mean() - loads).float())
    with torch.no_grad():
        model.router.balance_bias.copy_(torch.tensor([0.0011, -0.0023, 0.0012]))
    model = model.to(torch.bfloat16)
    bias = model.router.balance_bias
    assert bias.dtype == torch.float32 and bias.tolist() == torch.tensor([0.0011, -0.0023, 0.0012]).tolist()
    state = model.state_dict()
    assert state["engine.router.balance_bias"].dtype == torch.float32
    assert all(p is not bias for p in model.parameters())
    fresh = mor_model({"name": "token_choice", "balancing": "loss_free"}).to(torch.bfloat16)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.router.balance_bias, bias)


def test_balance_warmup_ramps_the_loss_over_optimizer_steps():
    router = token_router(balance_warmup_steps=4)
    hidden = hidden_with(torch.randn(1, 5, R), channels=R)
    values = []
    for _ in range(6):
        values.append(router.route(hidden, context(hidden)).aux_losses["router_balance"].item())
        router.after_optimizer_step(RoutingStats())
    assert values[0] == 0.0
    assert values[1:] == pytest.approx([values[4] * f for f in (0.25, 0.5, 0.75, 1.0, 1.0)])
    assert router.state_dict()["optimizer_steps"].item() == 6


def test_token_choice_warns_about_ignored_options():
    with pytest.warns(UserWarning, match="bias_rate"):
        make_router("token_choice", bias_rate=0.01)


# -------------------------------------------------------------------------------- capacity warm-up


def test_capacity_warmup_is_a_cosine_from_one_to_the_base():
    scheduler = get_registry().build("depth_scheduler", ComponentSpec(name="capacity_warmup", warmup_fraction=0.2))
    base = [1.0, 2 / 3, 1 / 3]
    assert scheduler.capacities(base, 0.0) == pytest.approx([1.0, 1.0, 1.0])
    assert scheduler.capacities(base, 0.2) == pytest.approx(base)
    assert scheduler.capacities(base, 0.9) == pytest.approx(base)
    assert scheduler.capacities(base, None) == base
    mid = scheduler.capacities(base, 0.1)  # half-way: cos(pi/2) = 0, so half-way between base and 1
    assert mid == pytest.approx([1.0, 5 / 6, 2 / 3])
    for progress in (0.01, 0.05, 0.15):
        caps = scheduler.capacities(base, progress)
        assert all(a >= b for a, b in zip(caps, caps[1:]))


def test_capacity_warmup_drives_the_expert_choice_counts():
    model = mor_model({"name": "expert_choice"}, depth_scheduler={"name": "capacity_warmup", "warmup_fraction": 0.5})
    model.train()
    counts = [s.sum(1).tolist() for s in model(tokens(1, 12), progress=0.25).stats.selected_per_step]
    assert counts == [[12], [10], [8]]  # capacities 1, 5/6, 2/3


def test_a_capacity_schedule_beside_a_router_that_ignores_capacity_warns():
    cfg = ModelConfig(preset="micro", num_layers=5, num_recursions=3, sharing={"name": "middle_cycle"},
                      router={"name": "token_choice"}, depth_scheduler={"name": "capacity_warmup"})
    with pytest.warns(UserWarning, match="depth_scheduler='capacity_warmup' is ignored"):
        build_model(cfg, get_registry())

"""The MoR KV policies (recursion_wise, recursive_sharing, hybrid): what they declare, what the engine
stores for them (measured KV ratios against ``full``), and a dense reference of their attention rule.

Shape legend: B batch, T tokens, D model width, G kv heads, H heads, E head dim, S key columns, R steps.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptive.interfaces import RouteContext
from adaptive.model import next_token_loss
from adaptive.plugins import get_registry
from adaptive.testing import as_model, micro_config, run

Tensor = torch.Tensor
MOR_POLICIES = ["recursion_wise", "recursive_sharing", "hybrid"]
DECLARED = {
    "recursion_wise": lambda r: ("selected", (r,)),
    "recursive_sharing": lambda r: ("all" if r == 0 else "none", (0,)),
    "hybrid": lambda r: ("all" if r == 0 else "selected", (0,) if r == 0 else (r, 0)),
}


def mor_model(kv_policy: str, num_recursions: int, router: str = "expert_choice", sharing: str = "middle_cycle",
              seed: int = 0, **shape):
    parts = {"sharing": sharing, "router": router, "kv_policy": kv_policy}
    return as_model(micro_config(parts, num_recursions=num_recursions, **shape), seed=seed)


def recursion_block(model) -> list[int]:
    return [layer for step in model.engine.step_layers for layer in step]


# ---------------------------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("name", MOR_POLICIES)
def test_policy_is_registered_with_a_summary_and_declares_its_rule(name):
    entry = get_registry().get("kv_policy", name)
    assert entry.plugin == "adaptive_mor" and entry.summary
    policy = entry.cls(entry.cls.Config())
    for num_steps in range(1, 5):
        policy.validate(num_steps)
        assert [(policy.writes(r), policy.reads(r)) for r in range(num_steps)] == [DECLARED[name](r) for r in range(num_steps)]


@pytest.mark.parametrize("name", MOR_POLICIES)
def test_policy_config_forbids_unknown_keys(name):
    with pytest.raises(ValueError, match="extra"):
        get_registry().config("kv_policy", name, {"bogus": 1})


# ---------------------------------------------------------------------------------------------- measured KV


def prefill_entries(kv_policy: str, num_recursions: int, batch: int, length: int, seed: int):
    """Entries a training-rule (top-k) prefill writes, per step, over the recursion block; and the routing."""
    model = mor_model(kv_policy, num_recursions, seed=seed)
    cache = model.new_cache(batch, length)
    tokens_BT = torch.randint(0, model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(tokens_BT, cache=cache, training_rule=True)
    per_step = [int(cache.entries_written(layers)) for layers in model.engine.step_layers]
    return model, cache, out, per_step


def top_k_counts(num_recursions: int, length: int) -> list[int]:
    """Expert-choice capacities k_r = floor(T (N_r - r + 1) / N_r), r = 1..N_r."""
    return [int(length * (num_recursions - r) / num_recursions + 1e-9) for r in range(num_recursions)]


@given(num_recursions=st.integers(2, 4), batch=st.integers(1, 2), length=st.integers(80, 160), seed=st.integers(0, 2**16))
def test_measured_kv_ratios_match_the_paper(num_recursions, batch, length, seed):
    """Recursion-wise stores (N_r+1)/(2N_r) of full's KV over the recursion block, recursive sharing 1/N_r
    (SPEC §2.4), measured from a real top-k prefill into the cache."""
    full = sum(prefill_entries("full", num_recursions, batch, length, seed)[3])
    wise = sum(prefill_entries("recursion_wise", num_recursions, batch, length, seed)[3])
    shared = sum(prefill_entries("recursive_sharing", num_recursions, batch, length, seed)[3])
    per_step = len(mor_model("full", num_recursions).engine.step_layers[0])
    assert full == batch * length * num_recursions * per_step
    assert wise / full == pytest.approx((num_recursions + 1) / (2 * num_recursions), rel=0.02)
    assert shared / full == pytest.approx(1 / num_recursions, rel=1e-12)


@pytest.mark.parametrize("num_recursions", [2, 3, 4])
def test_each_step_stores_exactly_the_tokens_its_policy_names(num_recursions):
    batch, length = 2, 30
    counts = top_k_counts(num_recursions, length)
    expected = {
        "recursion_wise": counts,
        "recursive_sharing": [length] + [0] * (num_recursions - 1),
        "hybrid": [length] + counts[1:],
        "full": [length] * num_recursions,
    }
    for name, per_token in expected.items():
        model, cache, out, per_step = prefill_entries(name, num_recursions, batch, length, seed=1)
        assert per_step == [batch * k * len(model.engine.step_layers[0]) for k in per_token], name
        assert int(cache.entries_written(model.engine.coda_layers)) == batch * length  # outside the block: full


@pytest.mark.parametrize("name", MOR_POLICIES)
def test_written_slots_are_the_routed_tokens(name):
    """An exited token has no KV at deeper steps under recursion_wise/hybrid; sharing allocates no later slots."""
    model, cache, out, _ = prefill_entries(name, 3, batch=2, length=24, seed=2)
    for step, layers in enumerate(model.engine.step_layers):
        writes = model.engine.kv_policy.writes(step)
        for layer in layers:
            if writes == "none":
                assert layer not in cache.slots
                continue
            written_BT = cache.written(layer, 24)
            expected_BT = out.stats.selected_per_step[step] if writes == "selected" else torch.ones_like(written_BT)
            assert torch.equal(written_BT, expected_BT), (name, step, layer)


# ---------------------------------------------------------------------------------------------- dense reference


def reference_logits(model, tokens_BT: Tensor, training_rule: bool) -> Tensor:
    """The model's forward computed densely from the KV policy's declared rule: every token is computed at
    every layer of a step (only the routed ones are kept), and attention masks follow writes/reads."""
    engine = model.engine
    B, T = tokens_BT.shape
    position_ids_BT = torch.arange(T).expand(B, T)
    cos, sin = model.rotary.cos_sin(position_ids_BT, torch.float64)
    causal_TS = torch.ones(T, T, dtype=torch.bool).tril()
    h_BTD = model.embed(tokens_BT)
    for layer in range(len(engine.plan.prelude)):
        h_BTD, _ = dense_layer(engine, layer, h_BTD, cos, sin, lambda k, v: (k, v, causal_TS.expand(B, T, T)))
    h_BTD = dense_steps(model, h_BTD, cos, sin, training_rule)
    for layer in engine.coda_layers:
        h_BTD, _ = dense_layer(engine, layer, h_BTD, cos, sin, lambda k, v: (k, v, causal_TS.expand(B, T, T)))
    return model.lm_head(model.final_norm(h_BTD))


def dense_steps(model, h_BTD: Tensor, cos: Tensor, sin: Tensor, training_rule: bool) -> Tensor:
    engine, policy = model.engine, model.engine.kv_policy
    B, T, _ = h_BTD.shape
    capacities = engine.scheduler.capacities(engine.router.base_capacities(), None)
    first_BTD, active_BT, carry = h_BTD, torch.ones(B, T, dtype=torch.bool), None
    slots: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}  # (step, j) -> k, v, written_BS
    for step, layers in enumerate(engine.step_layers):
        ctx = RouteContext(step, len(engine.step_layers), capacities[step], training_rule, active_BT,
                           torch.ones(B, T, dtype=torch.bool), first_BTD, carry)
        decision = engine.router.route(h_BTD, ctx)
        selected_BT = decision.selected_BT & active_BT
        carry, active_BT = decision.carry, selected_BT
        x_BTD = h_BTD
        for j, layer in enumerate(layers):
            def attend_rule(k_BGTE, v_BGTE, step=step, j=j, selected_BT=selected_BT):
                writes = policy.writes(step)
                if writes != "none":
                    written_BS = selected_BT if writes == "selected" else torch.ones_like(selected_BT)
                    slots[step, j] = (k_BGTE, v_BGTE, written_BS)
                return read(slots, [(source, j) for source in policy.reads(step)])
            out_BTD, _ = dense_layer(engine, layer, x_BTD, cos, sin, attend_rule)
            x_BTD = torch.where(selected_BT[..., None], out_BTD, x_BTD)  # exited tokens stay frozen
        new_BTD = engine.router.combine(h_BTD, x_BTD, decision.gate_BT, first_BTD, step)
        h_BTD = torch.where(selected_BT[..., None], new_BTD, h_BTD)
    return h_BTD


def read(slots, sources) -> tuple[Tensor, Tensor, Tensor]:
    """Keys/values of the named slots, earlier sources shadowing later ones; allowed = written and causal."""
    k, v, written = slots[sources[0]]
    for source in sources[1:]:
        k2, v2, written2 = slots[source]
        k = torch.where(written[:, None, :, None], k, k2)
        v = torch.where(written[:, None, :, None], v, v2)
        written = written | written2
    T = written.shape[1]
    allowed_BTS = written[:, None, :] & torch.ones(T, T, dtype=torch.bool).tril()
    allowed_BTS = allowed_BTS | (~allowed_BTS.any(-1, keepdim=True) & torch.eye(T, dtype=torch.bool))
    return k, v, allowed_BTS


def dense_layer(engine, logical: int, x_BTD: Tensor, cos: Tensor, sin: Tensor, rule) -> tuple[Tensor, None]:
    weights = engine.layers[engine.physical_of[logical]]
    norms = engine.norms[engine.norm_index[logical]]
    normed_BTD = norms.attn_norm(x_BTD)
    q_BHTE = weights.attn.queries(normed_BTD, cos, sin)
    k_BGTE, v_BGTE = weights.attn.keys_values(normed_BTD, cos, sin)
    k_BGSE, v_BGSE, allowed_BTS = rule(k_BGTE, v_BGTE)
    attn_BHTE = engine.backend.attend(q_BHTE, k_BGSE, v_BGSE, allowed_BQS=allowed_BTS, causal=False)
    x_BTD = x_BTD + weights.attn.output(attn_BHTE)
    B, T, D = x_BTD.shape
    return x_BTD + weights.ffn(norms.ffn_norm(x_BTD).reshape(B * T, D)).out_BTD.reshape(B, T, D), None


@pytest.mark.parametrize("name", ["full", *MOR_POLICIES])
@given(num_recursions=st.integers(2, 4), per_step=st.integers(1, 2), batch=st.integers(1, 3), length=st.integers(2, 20),
       seed=st.integers(0, 2**16), training_rule=st.booleans(), sharing=st.sampled_from(["cycle", "middle_cycle"]))
def test_engine_matches_a_dense_reference_of_the_policy(name, num_recursions, per_step, batch, length, seed,
                                                        training_rule, sharing):
    """The engine (compact gathers, the store, prefill into a cache) computes what the policy declares."""
    model = mor_model(name, num_recursions, sharing=sharing, seed=seed, init_std=0.2, min_layers=per_step * num_recursions)
    generator = torch.Generator().manual_seed(seed)
    # distinct tokens: a repeated opening token gives exactly tied top-k scores, broken by 1-ulp noise
    tokens_BT = torch.stack([torch.randperm(model.vocab_size, generator=generator)[:length] for _ in range(batch)])
    with torch.no_grad():
        expected_BTV = reference_logits(model, tokens_BT, training_rule)
    full = run(model, tokens_BT, training_rule=training_rule)
    cached = run(model, tokens_BT, training_rule=training_rule, cache=model.new_cache(batch, length))
    torch.testing.assert_close(full.logits_BTV, expected_BTV, atol=1e-10, rtol=0)
    torch.testing.assert_close(cached.logits_BTV, expected_BTV, atol=1e-10, rtol=0)


def test_policies_differ_where_tokens_exit():
    """With routing, each policy attends to different keys at later steps, so their outputs differ; with
    every token kept, recursion_wise and hybrid equal full and only sharing differs."""
    tokens_BT = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    routed = {name: run(mor_model(name, 3), tokens_BT, training_rule=True).logits_BTV for name in ["full", *MOR_POLICIES]}
    for a in routed:
        for b in routed:
            assert a == b or not torch.allclose(routed[a], routed[b], atol=1e-6), (a, b)
    kept = {name: run(mor_model(name, 3, router="all"), tokens_BT).logits_BTV for name in ["full", *MOR_POLICIES]}
    torch.testing.assert_close(kept["recursion_wise"], kept["full"], atol=1e-10, rtol=0)
    torch.testing.assert_close(kept["hybrid"], kept["full"], atol=1e-10, rtol=0)
    assert not torch.allclose(kept["recursive_sharing"], kept["full"], atol=1e-6)


@pytest.mark.parametrize("name", MOR_POLICIES)
def test_training_forward_backpropagates_through_every_step(name):
    """In training (top-k, no cache; the ephemeral per-forward store where a step reads another's slot)
    the loss reaches the router of every step and the shared attention weights."""
    model = mor_model(name, 3).train()
    tokens_BT = torch.randint(0, model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(tokens_BT)
    assert len(out.stats.selected_per_step) == 3 and out.stats.selected_per_step[2].sum() == 2 * 4
    (next_token_loss(out.logits_BTV[:, :-1], tokens_BT[:, 1:]) + out.aux_loss).backward()
    for head in model.router.heads:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    shared = model.engine.layers[model.engine.physical_of[model.engine.step_layers[0][0]]]
    assert shared.attn.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("num_recursions", [2, 3, 4])
def test_the_decoding_cache_allocates_only_what_each_step_stores(num_recursions):
    """Memory, not just entries: the compact cache's slots over the recursion block hold (N_r+1)/(2N_r) of
    full's bytes after a top-k prefill, and 1/N_r under recursive sharing; decoding then grows them."""
    length = 120
    allocated = {}
    for name in ("full", "recursion_wise", "recursive_sharing"):
        model, cache, _, _ = prefill_entries(name, num_recursions, 1, length, seed=3)
        block = [layer for layers in model.engine.step_layers for layer in layers]
        allocated[name] = cache.bytes_allocated(block)
        entry_bytes = cache.bytes_per_entry()
        assert allocated[name] >= int(cache.entries_written(block)) * entry_bytes
    trash = (1 + 1 / length)  # each slot keeps one extra entry for masked-out writes
    assert allocated["recursion_wise"] / allocated["full"] == pytest.approx(
        (num_recursions + 1) / (2 * num_recursions), rel=0.02 * trash)
    assert allocated["recursive_sharing"] / allocated["full"] == pytest.approx(1 / num_recursions, rel=0.02)


def test_decoding_grows_slots_and_keeps_every_entry():
    model = mor_model("recursion_wise", 3, seed=4)
    cache = model.new_cache(1, 128)
    tokens_BT = torch.randint(0, model.vocab_size, (1, 110), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(tokens_BT[:, :20], cache=cache)
        before = {layer: slot.capacity for layer, slot in cache.slots.items()}
        for t in range(20, 110):  # entries are appended, so slots grow in chunks as decoding goes on
            model(tokens_BT[:, t:t + 1], cache=cache)
    assert any(slot.capacity > before.get(layer, 0) for layer, slot in cache.slots.items())
    for slot in cache.slots.values():
        assert int(slot.lens_B.max()) <= slot.capacity <= 128
        assert int((slot.cols_BC >= 0).sum()) == int(slot.lens_B.sum())

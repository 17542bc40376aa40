"""Sharing schemes (SPEC §2.1): the layer mapping, indivisible depths, tied weights, per-step norms, and
the recursive baseline equals the unrolled vanilla model with the same (tied) weights."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry
from adaptive.registry import ComponentSpec


FORMULAS = {
    "cycle": lambda l, L, n: l % (L // n),
    "sequence": lambda l, L, n: l // n,
    "middle_cycle": lambda l, L, n: 0 if l == 0 else (L - 2) // n + 1 if l == L - 1 else (l - 1) % ((L - 2) // n) + 1,
    "middle_sequence": lambda l, L, n: 0 if l == 0 else (L - 2) // n + 1 if l == L - 1 else (l - 1) // n + 1,
}
MIDDLE = {"middle_cycle", "middle_sequence"}


def plan(name: str, num_layers: int, num_recursions: int, **options):
    scheme = get_registry().build("sharing_scheme", ComponentSpec(name=name, **options))
    return scheme.plan(num_layers, num_recursions)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(num_layers=6, d_model=32, num_heads=4, num_kv_heads=2, d_ffn=48, vocab_size=61, max_seq_len=32)
    return ModelConfig(**{**base, **overrides})


def build(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg, get_registry()).double()


# ---------------------------------------------------------------------------------------------- mapping


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(FORMULAS)), per_step=st.integers(1, 4), num_recursions=st.integers(1, 4))
def test_mapping_follows_the_formula(name, per_step, num_recursions):
    L = per_step * num_recursions + (2 if name in MIDDLE else 0)
    p = plan(name, L, num_recursions)
    assert p.logical_to_physical == tuple(FORMULAS[name](l, L, num_recursions) for l in range(L))
    assert p.num_logical == L and p.num_steps == num_recursions
    assert all(len(step) == per_step for step in p.steps)
    assert (len(p.prelude), len(p.coda)) == ((1, 1) if name in MIDDLE else (0, 0))
    assert p.num_physical == L // num_recursions if name not in MIDDLE else (L - 2) // num_recursions + 2


def test_paper_example_nine_layers_three_recursions():
    assert plan("cycle", 9, 3).logical_to_physical == (0, 1, 2, 0, 1, 2, 0, 1, 2)
    assert plan("sequence", 9, 3).logical_to_physical == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert plan("middle_cycle", 11, 3).logical_to_physical == (0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4)
    assert plan("middle_sequence", 11, 3).logical_to_physical == (0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4)
    assert plan("cycle", 9, 3).steps == ((0, 1, 2),) * 3
    assert plan("middle_cycle", 11, 3).prelude == (0,) and plan("middle_cycle", 11, 3).coda == (4,)


def test_none_is_vanilla_and_rejects_recursions():
    p = plan("none", 5, 1)
    assert p.logical_to_physical == (0, 1, 2, 3, 4) and p.steps == ()
    with pytest.raises(ValueError, match="num_recursions=1"):
        plan("none", 5, 2)


@pytest.mark.parametrize("name, L, valid", [("cycle", 10, "num_layers=9 or 12"), ("sequence", 7, "num_layers=6 or 9"),
                                            ("middle_cycle", 10, "num_layers=8 or 11"),
                                            ("middle_sequence", 12, "num_layers=11 or 14")])
def test_indivisible_depth_is_a_clear_error(name, L, valid):
    with pytest.raises(ValueError) as info:
        plan(name, L, 3)
    message = str(info.value)
    assert f"num_layers={L}" in message and "num_recursions=3" in message and valid in message
    assert "on_indivisible: pad" in message


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(FORMULAS)), L=st.integers(3, 14), num_recursions=st.integers(1, 4))
def test_padding_adds_layers_and_never_drops(name, L, num_recursions):
    ends = 2 if name in MIDDLE else 0
    if L - ends < num_recursions:
        with pytest.raises(ValueError, match="needs at least"):
            plan(name, L, num_recursions, on_indivisible="pad")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(name, L, num_recursions, on_indivisible="pad")
    padded = -(-(L - ends) // num_recursions) * num_recursions + ends
    assert p.num_logical == padded >= L
    assert p.logical_to_physical == tuple(FORMULAS[name](l, padded, num_recursions) for l in range(padded))
    assert bool(caught) == (padded != L), "padding must warn, and only when it pads"
    if padded != L:
        assert f"padded to {padded}" in str(caught[0].message)


def test_too_shallow_is_an_error():
    with pytest.raises(ValueError, match="needs at least 5 layers"):
        plan("middle_cycle", 4, 3)


def test_model_with_padding_builds_the_padded_depth():
    with pytest.warns(UserWarning, match="padded to 8"):
        model = build(tiny_config(num_layers=7, num_recursions=3, sharing={"name": "middle_cycle", "on_indivisible": "pad"}))
    assert model.plan.num_logical == 8 and len(model.engine.layers) == 4


# ---------------------------------------------------------------------------------------------- tied weights


def _call_counts(model, tokens):
    """How often each physical layer's attention and FFN weights are used in one forward."""
    counts = Counter()
    handles = []
    for p, layer in enumerate(model.engine.layers):
        parts = {part: getattr(layer.attn, f"{part}_proj") for part in ("q", "k", "v", "o")} | {"ffn": layer.ffn}
        for part, module in parts.items():
            handles.append(module.register_forward_hook(lambda m, i, o, key=(p, part): counts.update([key])))
    model(tokens)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("name, L", [("cycle", 6), ("sequence", 6), ("middle_cycle", 8), ("middle_sequence", 8)])
def test_shared_weights_are_one_tensor_used_at_every_depth(name, L):
    cfg = tiny_config(num_layers=L, num_recursions=3, sharing={"name": name})
    model = build(cfg)
    p = model.plan
    # only the physical layers exist as parameters: state_dict has one entry per physical tensor
    names = [n for n in model.state_dict() if n.startswith("engine.layers.")]
    assert {int(n.split(".")[2]) for n in names} == set(range(p.num_physical))
    # every forward runs each physical layer's attention and FFN once per logical use, attention included
    counts = _call_counts(model, torch.randint(0, 61, (1, 5)))
    for phys in range(p.num_physical):
        uses = p.logical_to_physical.count(phys)
        assert all(counts[(phys, part)] == uses for part in ("q", "k", "v", "o", "ffn")), (phys, counts)
    # unique parameters: embeddings, final norm, physical layers and one norm pair per physical layer
    D, G, E, F = cfg.d_model, cfg.num_kv_heads, cfg.head_dim, cfg.d_ffn
    per_layer = 2 * D * D + 2 * D * G * E + 3 * D * F
    assert model.num_params() == 61 * D + D + p.num_physical * (per_layer + 2 * D)
    assert model.num_params(unique=False) == 61 * D + D + p.num_logical * (per_layer + 2 * D)


@pytest.mark.parametrize("per_step_norms", [False, True])
def test_per_step_norms(per_step_norms):
    cfg = tiny_config(num_layers=8, num_recursions=3, sharing={"name": "middle_cycle"}, per_step_norms=per_step_norms)
    model = build(cfg)
    p = model.plan
    norms = model.engine.norms
    assert len(norms) == (p.num_logical if per_step_norms else p.num_physical)
    used = []
    hooks = [n.attn_norm.register_forward_hook(lambda m, i, o, k=k: used.append(k)) for k, n in enumerate(norms)]
    model(torch.randint(0, 61, (1, 4)))
    for h in hooks:
        h.remove()
    expected = list(range(p.num_logical)) if per_step_norms else list(p.logical_to_physical)
    assert used == expected
    weights = {id(n.attn_norm.weight) for n in norms} | {id(n.ffn_norm.weight) for n in norms}
    assert len(weights) == 2 * len(norms), "each norm owns its own parameter"


# ---------------------------------------------------------------------------------------------- equivalence


def unrolled_vanilla(recursive):
    """A vanilla model (sharing none) whose layer l holds recursive physical layer plan[l] (and its norms)."""
    cfg = recursive.config.model_copy(update=dict(num_recursions=1, sharing=ComponentSpec(name="none"), per_step_norms=False))
    vanilla = build(cfg, seed=1)
    src = recursive.state_dict()
    engine = recursive.engine
    state = {}
    for name, tensor in src.items():
        if not name.startswith("engine."):
            state[name] = tensor
    for l, phys in enumerate(engine.physical_of):
        for name, tensor in engine.layers[phys].state_dict().items():
            state[f"engine.layers.{l}.{name}"] = tensor
        for name, tensor in engine.norms[engine.norm_index[l]].state_dict().items():
            state[f"engine.norms.{l}.{name}"] = tensor
    vanilla.load_state_dict(state, strict=True)
    return vanilla


@pytest.mark.parametrize("name, L, per_step_norms", [("cycle", 6, False), ("sequence", 6, False), ("middle_cycle", 8, True),
                                                     ("middle_sequence", 8, False)])
def test_recursive_with_all_tokens_equals_unrolled_vanilla(name, L, per_step_norms):
    cfg = tiny_config(num_layers=L, num_recursions=3, sharing={"name": name}, per_step_norms=per_step_norms)
    recursive = build(cfg)
    for norms in recursive.engine.norms:  # non-trivial norm weights, so a wrong norm index shows
        for w in (norms.attn_norm.weight, norms.ffn_norm.weight):
            w.data.uniform_(0.5, 1.5)
    vanilla = unrolled_vanilla(recursive)
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    out_r, out_v = recursive(tokens).logits_BTV, vanilla(tokens).logits_BTV
    assert out_r.dtype == torch.float64
    torch.testing.assert_close(out_r, out_v, atol=1e-12, rtol=0)

    # one gradient: the shared tensor's gradient is the sum over the logical layers that use it
    out_r.square().mean().backward()
    out_v.square().mean().backward()
    for phys, layer in enumerate(recursive.engine.layers):
        users = [l for l, p in enumerate(recursive.engine.physical_of) if p == phys]
        for attr in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.down"):
            grad = layer.get_submodule(attr).weight.grad
            expected = sum(vanilla.engine.layers[l].get_submodule(attr).weight.grad for l in users)
            torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(recursive.embed.weight.grad, vanilla.embed.weight.grad, atol=1e-12, rtol=0)

"""The recursion engine and its KV store: cached decoding (token by token and in chunks) equals the full
forward, padding and packing are invisible, and KV policies that read another step's slot work.

Everything runs in float64 on CPU, so "equal" means equal to 1e-10.
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive import ComponentConfig, KVPolicy, RouteDecision, Router, hookimpl
from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry, register_plugin, unregister_plugin
from adaptive.registry import ComponentSpec


V = 67
TOL = dict(atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------- in-test parts


class ThresholdRouter(Router):
    """Test router: a token continues past step r iff its hidden feature r is positive (a per-token, causal
    rule with data-dependent counts, so gathers, partial selections and skipped steps are exercised)."""

    name = "test_threshold"
    Config = ComponentConfig

    def route(self, hidden_BTD, ctx):
        return RouteDecision(selected_BT=hidden_BTD[..., ctx.step] > 0, gate_BT=torch.sigmoid(hidden_BTD[..., -1]))


class ShareFirst(KVPolicy):
    """Test policy: every token writes at step 0; later steps write nothing and read step 0."""

    name = "test_share_first"
    Config = ComponentConfig

    def writes(self, step):
        return "all" if step == 0 else "none"

    def reads(self, step):
        return (0,)


class HybridFirst(KVPolicy):
    """Test policy: step 0 writes all; later steps write their selected tokens and read (own, step 0)."""

    name = "test_hybrid_first"
    Config = ComponentConfig

    def writes(self, step):
        return "all" if step == 0 else "selected"

    def reads(self, step):
        return (step,) if step == 0 else (step, 0)


class SelectedOnly(KVPolicy):
    """Test policy: recursion-wise caching (selected tokens write, each step reads its own slot)."""

    name = "test_selected"
    Config = ComponentConfig

    def writes(self, step):
        return "selected"

    def reads(self, step):
        return (step,)


@pytest.fixture(autouse=True)
def test_parts():
    """Register the in-test parts (per test: the shared conftest gives every test a fresh plugin host)."""
    plugin = types.ModuleType("engine_test_parts")

    @hookimpl
    def register_routers(register):
        register(ThresholdRouter)

    @hookimpl
    def register_kv_policies(register):
        for cls in (ShareFirst, HybridFirst, SelectedOnly):
            register(cls)

    plugin.register_routers = register_routers
    plugin.register_kv_policies = register_kv_policies
    info = register_plugin(plugin, "engine_test_parts")
    assert info.error is None, info.error
    yield
    unregister_plugin("engine_test_parts")


def make(sharing="none", L=4, num_recursions=1, router="all", kv="full", seed=0):
    cfg = ModelConfig(num_layers=L, d_model=32, num_heads=4, num_kv_heads=2, d_ffn=48, vocab_size=V, max_seq_len=32,
                      num_recursions=num_recursions, sharing={"name": sharing}, router={"name": router},
                      kv_policy={"name": kv})
    torch.manual_seed(seed)
    model = build_model(cfg, get_registry()).double().eval()
    with torch.no_grad():  # spread the hidden states so the threshold router keeps about half the tokens
        model.embed.weight.normal_(0, 1.0)
    return model


BASELINES = {
    "vanilla": dict(),
    "recursive_cycle": dict(sharing="cycle", L=6, num_recursions=3),
    "recursive_middle_cycle": dict(sharing="middle_cycle", L=6, num_recursions=2),
}
ROUTED = {
    f"{router}/{kv}": dict(sharing="middle_cycle", L=5, num_recursions=3, router=router, kv=kv)
    for router in ("all", "test_threshold")
    for kv in ("full", "test_share_first", "test_hybrid_first", "test_selected")
}
ALL = {**BASELINES, **ROUTED}


def tokens(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def chunked(model, x_BT, sizes, **kwargs):
    """Logits of ``x_BT`` fed through a cache in chunks of the given sizes."""
    cache = model.new_cache(x_BT.shape[0], x_BT.shape[1])
    outs, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        extra = {k: v[:, sl] for k, v in kwargs.items()}
        outs.append(model(x_BT[:, sl], cache=cache, **extra).logits_BTV)
        start += size
    assert cache.length == x_BT.shape[1]
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------- cache consistency


@pytest.mark.parametrize("name", list(ALL))
def test_prefill_then_token_by_token_equals_full_forward(name):
    model = make(**ALL[name])
    x = tokens(2, 10)
    full = model(x).logits_BTV
    torch.testing.assert_close(chunked(model, x, [4] + [1] * 6), full, **TOL)


@pytest.mark.parametrize("name", ["vanilla", "recursive_middle_cycle", "test_threshold/full",
                                  "test_threshold/test_hybrid_first", "test_threshold/test_selected"])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_chunked_prefill_with_random_chunks_equals_full_forward(name, data):
    model = make(**ALL[name])
    T = data.draw(st.integers(2, 12), label="T")
    sizes = []
    while sum(sizes) < T:
        sizes.append(data.draw(st.integers(1, T - sum(sizes)), label="chunk"))
    x = tokens(2, T, seed=data.draw(st.integers(0, 99), label="seed"))
    torch.testing.assert_close(chunked(model, x, sizes), model(x).logits_BTV, **TOL)


def test_routed_models_really_route():
    """The routed combinations above are only meaningful if some tokens stop early and some go deep."""
    model = make(**ROUTED["test_threshold/full"])
    depth = model(tokens(2, 10)).stats.depth_BT
    assert depth.min() < 3 and depth.max() >= 2


def test_cache_overflow_is_a_clear_error():
    model = make()
    cache = model.new_cache(1, 4)
    model(tokens(1, 3), cache=cache)
    with pytest.raises(ValueError, match="cache holds 4 columns; 3 used and 2 more requested"):
        model(tokens(1, 2), cache=cache)


# ---------------------------------------------------------------------------------------------- padding


def left_padded(seqs):
    T = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, T - len(s):] = s
        valid[i, T - len(s):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return x, valid, positions


@pytest.mark.parametrize("name", ["vanilla", "recursive_cycle", "test_threshold/full", "test_threshold/test_share_first",
                                  "all/test_selected"])
@pytest.mark.parametrize("cached", [False, True])
def test_left_padding_is_invisible(name, cached):
    model = make(**ALL[name])
    seqs = [tokens(1, 9, seed=1)[0], tokens(1, 4, seed=2)[0], tokens(1, 1, seed=3)[0]]
    x, valid, positions = left_padded(seqs)
    if cached:
        logits = chunked(model, x, [5, 1, 3], valid_BT=valid, position_ids_BT=positions)
    else:
        logits = model(x, valid_BT=valid, position_ids_BT=positions).logits_BTV
    assert torch.isfinite(logits).all()
    for i, s in enumerate(seqs):
        alone = model(s[None]).logits_BTV[0]
        torch.testing.assert_close(logits[i, x.shape[1] - len(s):], alone, **TOL)


def test_decoding_after_a_padded_prompt_matches_each_sequence_alone():
    model = make(**BASELINES["recursive_middle_cycle"])
    seqs = [tokens(1, 6, seed=4)[0], tokens(1, 3, seed=5)[0]]
    x, valid, positions = left_padded(seqs)
    cache = model.new_cache(2, 10)
    model(x, valid_BT=valid, position_ids_BT=positions, cache=cache)
    nxt = tokens(2, 2, seed=6)
    pos = positions[:, -1:] + 1
    step_logits = []
    for j in range(2):
        step_logits.append(model(nxt[:, j:j + 1], position_ids_BT=pos + j, cache=cache).logits_BTV[:, 0])
    for i, s in enumerate(seqs):
        alone = model(torch.cat([s, nxt[i]])[None]).logits_BTV[0, -2:]
        torch.testing.assert_close(torch.stack([step_logits[0][i], step_logits[1][i]]), alone, **TOL)


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("name", ["vanilla", "recursive_cycle", "test_threshold/full", "test_threshold/test_hybrid_first",
                                  "test_threshold/test_selected"])
@pytest.mark.parametrize("cached", [False, True])
def test_packed_documents_do_not_see_each_other(name, cached):
    model = make(**ALL[name])
    docs = [tokens(1, 5, seed=7)[0], tokens(1, 6, seed=8)[0], tokens(1, 2, seed=9)[0]]
    x = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    if cached:
        logits = chunked(model, x, [3, 4, 1, 5], doc_ids_BT=doc_ids, position_ids_BT=positions)
    else:
        logits = model(x, doc_ids_BT=doc_ids, position_ids_BT=positions).logits_BTV
    start = 0
    for d in docs:
        torch.testing.assert_close(logits[0, start:start + len(d)], model(d[None]).logits_BTV[0], **TOL)
        start += len(d)


@pytest.mark.parametrize("name", ["recursive_cycle", "test_threshold/test_hybrid_first"])
def test_decoding_after_a_packed_prompt_continues_the_last_document(name):
    model = make(**ALL[name])
    first, last, nxt = tokens(1, 4, seed=10)[0], tokens(1, 3, seed=11)[0], tokens(1, 2, seed=12)[0]
    cache = model.new_cache(1, 9)
    model(torch.cat([first, last])[None], cache=cache, doc_ids_BT=torch.tensor([[0] * 4 + [1] * 3]),
          position_ids_BT=torch.cat([torch.arange(4), torch.arange(3)])[None])
    got = [model(nxt[None, j:j + 1], cache=cache, position_ids_BT=torch.tensor([[3 + j]])).logits_BTV[0, 0] for j in range(2)]
    alone = model(torch.cat([last, nxt])[None]).logits_BTV[0, -2:]
    torch.testing.assert_close(torch.stack(got), alone, **TOL)


# ---------------------------------------------------------------------------------------------- semantics


def reference_forward(model, x_BT):
    """A dense, loop-free restatement of what the KV policies mean, for plans with one layer per step:
    every token computes keys/values at every layer; a step's slot keeps those of the tokens its policy
    writes; a query sees the earlier entries of the slots it reads (earlier listed slots shadow later
    ones); only selected tokens update their state."""
    engine, policy = model.engine, model.engine.kv_policy
    T = x_BT.shape[1]
    cos, sin = model.rotary.cos_sin(torch.arange(T).expand_as(x_BT), torch.float64)
    causal_TT = torch.ones(T, T, dtype=torch.bool).tril()

    def layer(logical, h, keys_from):
        weights, norms = engine.layers[engine.physical_of[logical]], engine.norms[engine.norm_index[logical]]
        normed = norms.attn_norm(h)
        q = weights.attn.queries(normed, cos, sin)
        k, v, written = keys_from(weights.attn.keys_values(normed, cos, sin))
        allowed = causal_TT[None] & written[:, None, :]
        attn = reference_attention(q, k, v, allowed, causal=False)
        h = h + weights.attn.output(attn)
        return h + weights.ffn(norms.ffn_norm(h)).out_BTD

    everyone = torch.ones_like(x_BT, dtype=torch.bool)
    h = model.embed(x_BT)
    for logical in engine.plan.prelude:
        h = layer(logical, h, lambda kv: (*kv, everyone))
    slots, active = {}, everyone
    for r, (logical,) in enumerate(engine.step_layers):
        selected = active & (h[..., r] > 0)
        gate = torch.sigmoid(h[..., -1])

        def keys_from(kv, r=r, selected=selected):
            written = {"all": everyone, "selected": selected, "none": torch.zeros_like(selected)}[policy.writes(r)]
            slots[r] = (*kv, written)
            k, v, seen = slots[policy.reads(r)[-1]]
            for source in reversed(policy.reads(r)[:-1]):
                sk, sv, sw = slots[source]
                k, v = torch.where(sw[:, None, :, None], sk, k), torch.where(sw[:, None, :, None], sv, v)
                seen = seen | sw
            return k, v, seen

        out = layer(logical, h, keys_from)
        h = torch.where(selected[..., None], h + gate[..., None] * (out - h), h)
        active = selected
    for logical in engine.coda_layers:
        h = layer(logical, h, lambda kv: (*kv, everyone))
    return model.lm_head(model.final_norm(h))


@pytest.mark.parametrize("kv", ["full", "test_share_first", "test_hybrid_first", "test_selected"])
def test_kv_policies_mean_what_they_say(kv):
    """The engine (gathers, compact attention, the store) against the dense restatement above."""
    model = make(**ROUTED[f"test_threshold/{kv}"])
    assert all(len(layers) == 1 for layers in model.engine.step_layers)
    x = tokens(2, 11, seed=13)
    depth = model(x).stats.depth_BT
    assert set(depth.flatten().tolist()) == {0, 1, 2, 3}, "every depth should occur for the check to bite"
    expected = reference_forward(model, x)
    torch.testing.assert_close(model(x).logits_BTV, expected, **TOL)
    torch.testing.assert_close(chunked(model, x, [5, 1, 1, 4]), expected, **TOL)


# ---------------------------------------------------------------------------------------------- store path


def test_store_path_in_training_mode_has_gradients_through_the_shared_slot():
    """With a policy that reads step 0, the per-forward store keeps autograd: the loss depends on the
    step-0 keys through later steps, and cached inference still matches."""
    model = make(**ROUTED["all/test_share_first"]).train()
    x = tokens(2, 8)
    out = model(x)
    out.logits_BTV.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    torch.testing.assert_close(chunked(model, x, [3, 1, 4]), model(x).logits_BTV, **TOL)


def test_store_path_differs_from_own_step_attention():
    """Reading step 0's keys is not the same computation as each step attending to itself (the test
    above would pass vacuously if the policy were ignored)."""
    shared = make(**ROUTED["all/test_share_first"])
    own = make(**ROUTED["all/full"])
    own.load_state_dict(shared.state_dict())
    x = tokens(1, 8)
    assert not torch.allclose(shared(x).logits_BTV, own(x).logits_BTV, atol=1e-6)


# ---------------------------------------------------------------------------------------------- attention backends


def reference_attention(q, k, v, allowed, causal):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()[None]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ v


def backend_inputs(device, dtype, Q=5, S=7):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=g, dtype=dtype) for h, n in ((4, Q), (2, S), (2, S)))
    allowed = torch.rand(2, Q, S, generator=g) < 0.6
    allowed[..., 0] = True
    return q.to(device), k.to(device), v.to(device), allowed.to(device)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_backend_matches_reference(causal):
    backend = get_registry().build("attention_backend", ComponentSpec(name="sdpa"))
    q, k, v, allowed = backend_inputs("cpu", torch.float64, S=5 if causal else 7)
    got = backend.attend(q, k, v, allowed_BQS=None if causal else allowed, causal=causal)
    torch.testing.assert_close(got, reference_attention(q, k, v, allowed, causal), **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["flex", "xformers"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backends_match_reference(name, causal):
    if name == "xformers":
        pytest.importorskip("xformers")
    backend = get_registry().build("attention_backend", ComponentSpec(name=name))
    q, k, v, allowed = backend_inputs("cuda", torch.float32, Q=128, S=128 if causal else 256)
    got = backend.attend(q, k, v, allowed_BQS=None if causal else allowed, causal=causal)
    torch.testing.assert_close(got, reference_attention(q, k, v, allowed, causal), atol=2e-3, rtol=2e-3)


def test_flex_backend_refuses_cpu_clearly():
    backend = get_registry().build("attention_backend", ComponentSpec(name="flex"))
    q, k, v, allowed = backend_inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        backend.attend(q, k, v, allowed_BQS=allowed, causal=False)

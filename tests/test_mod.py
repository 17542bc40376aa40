"""Mixture-of-Depths (plugins/adaptive_mod): what is specific to MoD. Each routed step chooses among all
tokens, independently of the others (unlike MoR's hierarchical filtering); a skipped token writes no
keys/values there; outside training the causal per-token rule routes (eval, full forwards, decoding); the
router weight and the membership BCE are on the gradient path; the recipes validate, train and generate.

Causality, cache consistency, batch/padding invariance and serving consistency of every ``mod`` and
``per_layer`` combination are the registry-wide grid's (tests/test_properties.py, tests/test_serving.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptive import recipe as recipes
from adaptive.flops import count_flops
from adaptive.model.transformer import next_token_loss
from adaptive.plugins import get_registry
from adaptive.registry import ComponentSpec
from adaptive.serving.model_runner import ModelRunner
from adaptive.testing import (Schedule, as_model, check_cache_consistency, check_causality,
                              check_serving_consistency, micro_config)
from adaptive.train.loop import train
from test_cli import run_main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MOD = {"sharing": "per_layer", "router": "mod", "kv_policy": "recursion_wise"}


def mod_config(options: dict | None = None, parts: dict = MOD, layers: int = 4, **shape):
    config = micro_config(parts, num_recursions=3, min_layers=layers, init_std=0.3, **shape)
    if options:
        config = config.model_copy(update={"router": ComponentSpec(name="mod", **options)})
    return config


def tokens(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def selections(model, tokens_BT, **kwargs) -> torch.Tensor:
    return torch.stack(model(tokens_BT, **kwargs).stats.selected_per_step)  # R B T


# ---------------------------------------------------------------------------------------------- routing


def test_each_routed_step_chooses_among_all_tokens_unlike_hierarchical_filtering():
    model = as_model(mod_config({"routed_steps": "all", "capacity": 0.5}))
    chosen_RBT = selections(model, tokens(), training_rule=True)
    assert (chosen_RBT.sum(-1) == 8).all()  # top-k: k = T/2 tokens of every row at every step
    assert (chosen_RBT[1:] & ~chosen_RBT[:-1]).any()  # skipped at one step, run at the next
    model.engine.router.hierarchical = True  # the same weights under MoR's hierarchical filtering
    nested_RBT = selections(model, tokens(), training_rule=True)
    assert not (nested_RBT[1:] & ~nested_RBT[:-1]).any()


def test_every_other_step_is_routed_by_default_and_the_others_run_every_token():
    model = as_model(mod_config(layers=6))
    router = model.engine.router
    assert router.routed == [1, 3, 5] and router.base_capacities() == [1.0, 0.125] * 3
    chosen_RBT = selections(model, tokens(), training_rule=True)
    assert chosen_RBT[0::2].all() and (chosen_RBT[1::2].sum(-1) == 2).all()  # k = floor(16 * 0.125)


def routed_inputs(model, tokens_BT):
    """The eval forward's output and the hidden states entering each routed step."""
    seen = []
    handles = [head.register_forward_hook(lambda m, args, out: seen.append(args[0]))
               for head in model.engine.router.heads]
    out = model(tokens_BT)
    for handle in handles:
        handle.remove()
    return out, seen


def causal_heads(model, rule: str) -> list:
    """The heads whose sign routes outside training; the auxiliary predictors' output biases are centred
    (step by step: a step's inputs depend on the earlier steps' decisions) so that they keep some tokens."""
    router = model.engine.router
    if rule == "bce":
        return list(router.heads)
    with torch.no_grad():
        for i, predictor in enumerate(router.aux_heads):
            hidden_BTD = routed_inputs(model, tokens())[1][i]
            predictor[-1].bias -= predictor(hidden_BTD).median()
    return list(router.aux_heads)


@pytest.mark.parametrize("rule", ["bce", "aux_router"])
def test_outside_training_a_token_runs_a_routed_step_iff_its_causal_score_is_positive(rule):
    model = as_model(mod_config({"causal_rule": rule}))
    router = model.engine.router
    heads = causal_heads(model, rule)
    out, seen = routed_inputs(model, tokens())  # eval mode: the causal rule
    for step, head, hidden_BTD in zip(router.routed, heads, seen):
        expected_BT = head(hidden_BTD)[..., 0] > 0
        assert expected_BT.any() and not expected_BT.all()
        assert torch.equal(out.stats.selected_per_step[step], expected_BT)
    model.train()
    assert torch.equal(selections(model, tokens(), cache=model.new_cache(2, 16)),  # a cache: the causal rule
                       selections(model, tokens(), training_rule=False))
    check_cache_consistency(model, seed=3, left_pads=[3, 0])  # decoding, which uses it too, equals the full forward


def test_the_training_rule_is_declared_non_causal_and_is():
    model = as_model(mod_config({"routed_steps": "all", "capacity": 0.25}))
    assert not model.engine.router.causal_in_training
    with pytest.raises(AssertionError, match=r"causality \(training rule\)"):
        check_causality(model, length=16, cut=12, training_rule=True)
    check_causality(model, length=16, cut=12)


def test_a_skipped_token_writes_no_keys_or_values_at_a_routed_layer():
    model = as_model(mod_config({"routed_steps": [1, 3], "capacity": 0.25}))
    cache = model.new_cache(2, 16)
    out = model(tokens(), cache=cache)
    for step, layers in enumerate(model.engine.step_layers):
        written_BT = cache.written(layers[0], 16)
        assert torch.equal(written_BT, out.stats.selected_per_step[step])
        assert written_BT.all() == (step not in (1, 3))


@pytest.mark.parametrize("kv_policy", ["recursion_wise", "recursive_sharing"])
def test_a_step_no_token_runs_does_not_stop_the_next_ones(kv_policy):
    """Hierarchical routers stop at the first empty step; an independent one goes on, and a later step that
    reads the empty step's keys/values (recursive sharing) still finds them in a full forward too."""
    model = as_model(mod_config({"routed_steps": "all", "capacity": 0.5}, {**MOD, "kv_policy": kv_policy}))
    with torch.no_grad():
        model.engine.router.heads[0].bias.fill_(-1e3)  # step 0 keeps no token outside training
        chosen_RBT = selections(model, tokens())
    assert not chosen_RBT[0].any() and chosen_RBT[1:].any()
    check_causality(model, seed=1)
    check_cache_consistency(model, seed=1)


# ---------------------------------------------------------------------------------------------- gradients


def test_the_router_weight_and_the_membership_bce_are_on_the_gradient_path():
    model = as_model(mod_config()).train()
    tokens_BT = tokens()
    out = model(tokens_BT)
    head = model.engine.router.heads[0].weight
    lm_loss = next_token_loss(out.logits_BTV[:, :-1], tokens_BT[:, 1:])
    (from_lm,) = torch.autograd.grad(lm_loss, head, retain_graph=True)  # x + r*f(x): r scales the update
    (from_bce,) = torch.autograd.grad(out.aux_losses["router_bce"], head)
    assert from_lm.abs().sum() > 0 and from_bce.abs().sum() > 0


def test_the_auxiliary_predictor_learns_from_detached_inputs_only():
    model = as_model(mod_config({"causal_rule": "aux_router"})).train()
    router = model.engine.router
    out = model(tokens())
    watched = [router.aux_heads[0][0].weight, router.heads[0].weight, model.embed.weight]
    grads = torch.autograd.grad(out.aux_losses["router_bce"], watched, allow_unused=True)
    assert grads[0].abs().sum() > 0
    assert all(g is None or not g.any() for g in grads[1:])  # neither the router nor the trunk


# ---------------------------------------------------------------------------------------------- serving


@pytest.mark.parametrize("parts", [MOD, {"sharing": "middle_cycle", "router": "mod", "kv_policy": "full"}],
                         ids=["per_layer-recursion_wise", "middle_cycle-full"])
def test_serving_with_preemption_equals_decoding_alone_and_groups_skip_whole_steps(parts, monkeypatch):
    skipped_whole = []
    route_next = ModelRunner.route_next

    def spy(self, groups):
        skipped_whole.extend(g for g in groups if not len(g.running()))
        route_next(self, groups)

    monkeypatch.setattr(ModelRunner, "route_next", spy)
    config = mod_config({"routed_steps": "all", "capacity": 0.5}, parts)
    prompts = [[5, 9, 2, 7, 1, 3], [11, 3], [8] * 13, [4, 4, 6]]
    busy = Schedule(arrivals=[0, 1, 1, 3], max_batch=3, max_tokens_per_iteration=6, block_size=2)
    tight = Schedule(busy.arrivals, 3, 6, 2, num_blocks=-(-(13 + 8) // 2) * (config.num_layers + 1))
    for schedule in (busy, tight):
        check_serving_consistency(config, prompts=prompts, max_tokens=8, schedule=schedule, seed=1)
    assert skipped_whole  # a decode token skipped a whole step, and was routed again at the next


def test_served_step_fractions_count_the_steps_each_token_ran():
    """Under independent routing a depth counts steps run, so the per-step shares sum to the mean depth and
    the unrouted steps run every token (what ``adaptive bench``'s FLOP bound reads), preemption or not."""
    from adaptive.serving import EngineConfig, SamplingParams, ServingEngine

    model = as_model(mod_config(layers=6), seed=3)
    prompts = [[5, 9, 2, 7, 1, 3], [11, 3], [8] * 13, [4, 4, 6]]
    for num_blocks in (None, 70):  # room for one request at full depth: the others are preempted
        engine = ServingEngine(model, EngineConfig(max_batch=3, max_tokens_per_iteration=6, block_size=2,
                                                   num_blocks=num_blocks))
        engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
        fractions, stats = engine.stats.step_fractions, engine.stats
        assert fractions[0::2] == [1.0] * len(fractions[0::2]) and all(f < 1 for f in fractions[1::2])
        assert sum(fractions) == pytest.approx(stats.mean_depth)
        assert num_blocks is None or stats.preemptions > 0


# ---------------------------------------------------------------------------------------------- recipes


def test_the_accountant_counts_routed_steps_at_their_capacity():
    registry = get_registry()
    load = lambda name: recipes.load(RECIPES / f"{name}.yaml", [], registry).model  # noqa: E731
    mod = count_flops(load("mod"), registry, seq_len=128)
    steps = [s for s in mod.breakdown if s.name.startswith("step")]
    assert [s.active_fraction for s in steps] == [1.0, 0.125] * 4
    assert [s.write_fraction for s in steps] == [1.0, 0.125] * 4  # a skipped token writes no KV
    assert mod.flops_per_token_forward < count_flops(load("vanilla"), registry, seq_len=128).flops_per_token_forward
    recursive = count_flops(load("mod_recursive"), registry, seq_len=128)
    assert [s.active_fraction for s in recursive.breakdown if s.name.startswith("step")] == [1.0, 0.5, 0.5]


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"routed_steps \[5\] do not exist in a model with 4 steps"):
        as_model(mod_config({"routed_steps": [1, 5]}))
    with pytest.raises(ValueError, match="num_recursions=1"):
        as_model(micro_config(MOD, num_recursions=2).model_copy(update={"num_recursions": 2}))


@pytest.mark.parametrize("name", ["mod", "mod_recursive"])
def test_the_recipes_train_and_generate(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path / "cache"))
    small = ["model.d_model=64", "model.d_ffn=128", "data.source={name: pydoc_topics}", "data.seq_len=32",
             "tokenizer.vocab_size=300", "train.steps=2", "train.batch_size=4", "train.eval_every=2",
             "train.eval_batches=1", "train.checkpoint_every=2", "train.progress_bar=false",
             f"train.out_dir={tmp_path / 'run'}"]
    train(recipes.load(RECIPES / f"{name}.yaml", small, get_registry()), get_registry())
    code, out, err = run_main(capsys, "generate", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "4",
                             "--temperature", "0", "--device", "cpu")
    assert code == 0, err
    assert "tokens/s" in err

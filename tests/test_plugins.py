"""The plugin host: loading entry points one at a time, failures, strict mode, the allow-list, and one test
per hook (test_meta checks that every hook has one)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from adaptive import (
    FFN,
    AttentionBackend,
    ComponentConfig,
    DataSource,
    DepthScheduler,
    FFNOutput,
    KVPolicy,
    PluginError,
    RecipeError,
    RouteDecision,
    Router,
    SharingScheme,
    hookimpl,
)
from adaptive.errors import PluginWarning
from adaptive.interfaces import DepthPlan
from adaptive.plugins import get_host, get_registry, register_plugin, unregister_plugin
from adaptive.recipe import validate

MICRO = {"preset": "micro", "num_layers": 4, "num_recursions": 2, "sharing": {"name": "cycle"}}

BROKEN_IMPORT = "raise RuntimeError('boom at import')\n"
MISSPELLED_HOOK = """
from adaptive import hookimpl

@hookimpl
def register_routerz(register):
    pass
"""
DUPLICATE_ALL = """
from adaptive import hookimpl
from adaptive_base.baseline import AllTokens

class Imposter(AllTokens):
    '''Claims the built-in router name.'''

@hookimpl
def register_routers(register):
    register(Imposter)
"""
GOOD_ROUTER = """
from adaptive import hookimpl
from adaptive_base.baseline import AllTokens

class Everyone(AllTokens):
    '''Every token, under another name.'''
    name = "everyone"

@hookimpl
def register_routers(register):
    register(Everyone)
"""


class Plugin:
    """An in-process plugin object whose hooks are given as keyword arguments."""

    def __init__(self, **hooks):
        for hook_name, fn in hooks.items():
            setattr(self, hook_name, hookimpl(specname=hook_name)(fn))


def registers(*classes):
    def hook(register):
        for cls in classes:
            register(cls)

    return hook


def check(raw: dict):
    return validate(raw, get_registry())


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        check(raw)
    return caught.value.problems


# -------------------------------------------------------------------------------------------- loading


def test_builtin_plugins_load_cleanly_with_version_and_hooks():
    info = get_host().plugins["adaptive_base"]
    assert info.error is None and info.distribution == "adaptive-lm" and info.version
    assert "register_routers" in info.hooks
    assert get_registry().get("router", "all").plugin == "adaptive_base"


def test_plugin_that_fails_to_import_is_recorded_and_the_rest_loads(fake_dist, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_dist("broken_plugin", BROKEN_IMPORT)))
    fake_dist("good_plugin", GOOD_ROUTER)
    with pytest.warns(PluginWarning, match="broken_plugin.*boom at import"):
        host = get_host()
    assert host.plugins["broken_plugin"].error == "import failed: RuntimeError: boom at import"
    assert host.registry.get("router", "everyone").plugin == "good_plugin"
    assert host.plugins["adaptive_base"].error is None


def test_misspelled_hook_fails_loudly_with_a_suggestion(fake_dist, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_dist("typo_plugin", MISSPELLED_HOOK)))
    with pytest.warns(PluginWarning, match="did you mean 'register_routers'"):
        host = get_host()
    assert "unknown hook 'register_routerz'" in host.plugins["typo_plugin"].error
    assert not host.pm.has_plugin("typo_plugin")


def test_hook_with_wrong_argument_names_is_rejected():
    with pytest.warns(PluginWarning, match="wrong_args"):
        info = register_plugin(Plugin(register_routers=lambda reg: None), "wrong_args")
    assert "invalid hook" in info.error and "reg" in info.error


def test_duplicate_component_name_names_both_plugins_and_the_builtin_wins(fake_dist, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_dist("dup_plugin", DUPLICATE_ALL, entry_point="aaa_dup")))
    with pytest.warns(PluginWarning):
        host = get_host()
    error = host.plugins["aaa_dup"].error
    assert "router 'all'" in error and "'adaptive_base'" in error and "'aaa_dup'" in error
    assert host.registry.get("router", "all").plugin == "adaptive_base"


def test_entry_point_name_taken_by_another_distribution_is_reported(fake_dist, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_dist("first_dist", GOOD_ROUTER, entry_point="shared_name")))
    fake_dist("second_dist", BROKEN_IMPORT, entry_point="shared_name")
    with pytest.warns(PluginWarning, match="'shared_name'.*already used by distribution 'first_dist'"):
        host = get_host()
    assert host.plugins["shared_name"].distribution == "first_dist" and host.plugins["shared_name"].error is None


def test_strict_mode_turns_a_broken_plugin_into_an_error(fake_dist, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_dist("broken_plugin", BROKEN_IMPORT)))
    monkeypatch.setenv("ADAPTIVE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="broken_plugin.*ADAPTIVE_STRICT_PLUGINS"):
        get_host()


@pytest.mark.parametrize("allow, loaded", [("good_plugin", {"good_plugin"}), ("", set())])
def test_allow_list_narrows_third_party_plugins_only(fake_dist, monkeypatch, recwarn, allow, loaded):
    monkeypatch.syspath_prepend(str(fake_dist("broken_plugin", BROKEN_IMPORT)))
    fake_dist("good_plugin", GOOD_ROUTER)
    monkeypatch.setenv("ADAPTIVE_LOAD_PLUGINS", allow)
    builtin = {ep.name for ep in importlib.metadata.distribution("adaptive-lm").entry_points if ep.group == "adaptive"}
    assert {"adaptive_base", "adaptive_mor", "adaptive_mod", "adaptive_moe"} <= builtin
    third_party = set(get_host().plugins) - builtin
    assert third_party == loaded
    assert "adaptive_base" in get_host().plugins
    assert not [w for w in recwarn if issubclass(w.category, PluginWarning)]


def test_failing_hook_leaves_no_partial_registration():
    class Half(Router):
        name = "half_registered"

    with pytest.warns(PluginWarning, match="not a Router subclass"):
        info = register_plugin(Plugin(register_routers=registers(Half, object)), "half")
    assert "register_routers failed" in info.error
    assert "half_registered" not in get_registry().names("router")


def test_registering_a_taken_plugin_name_keeps_the_original():
    with pytest.warns(PluginWarning, match="already registered"):
        register_plugin(Plugin(), "adaptive_base")
    assert get_host().plugins["adaptive_base"].error is None
    assert get_registry().get("router", "all").plugin == "adaptive_base"


@pytest.mark.parametrize("attrs, message", [
    ({"name": "Bad Name"}, "lowercase identifier"),
    ({"name": "loose", "Config": type("Loose", (ComponentConfig,), {"model_config": {"extra": "allow"}})}, "forbid"),
])
def test_registry_rejects_malformed_components(attrs, message):
    cls = type("Malformed", (Router,), attrs)
    with pytest.warns(PluginWarning, match=message):
        info = register_plugin(Plugin(register_routers=registers(cls)), "malformed")
    assert message in info.error


def test_unregister_plugin_removes_its_components():
    register_plugin(Plugin(register_routers=registers(EveryOther)), "every_other_plugin")
    assert "every_other" in get_registry().names("router")
    unregister_plugin("every_other_plugin")
    assert "every_other" not in get_registry().names("router")
    assert "every_other_plugin" not in get_host().plugins


# ------------------------------------------------------------------------------------- one test per hook


class Reversed(SharingScheme):
    """Steps that run the shared layers in reverse order (only to prove a plugin's plan is used)."""

    name = "reversed_cycle"

    def plan(self, num_layers, num_recursions):
        per_step = num_layers // num_recursions
        step = tuple(reversed(range(per_step)))
        return DepthPlan(num_physical=per_step, prelude=(), steps=(step,) * num_recursions, coda=())


def test_register_sharing_schemes_plan_drives_recipe_checks():
    register_plugin(Plugin(register_sharing_schemes=registers(Reversed)), "reversed_plugin")
    recipe = check({"model": {**MICRO, "sharing": {"name": "reversed_cycle"}}})
    assert recipe.model.sharing.name == "reversed_cycle"
    assert get_registry().get("sharing_scheme", "reversed_cycle").plugin == "reversed_plugin"


class EveryOtherConfig(ComponentConfig):
    phase: int = 0


class EveryOther(Router):
    """Every other token continues (a toy, causal rule)."""

    name = "every_other"
    Config = EveryOtherConfig

    def route(self, hidden_BTD, ctx):
        B, T, _ = hidden_BTD.shape
        keep_T = torch.arange(T) % 2 == self.config.phase
        return RouteDecision(selected_BT=keep_T.expand(B, T) & ctx.active_BT, gate_BT=hidden_BTD.new_ones(B, T))


def test_register_routers_component_options_are_validated_by_its_config():
    register_plugin(Plugin(register_routers=registers(EveryOther)), "every_other_plugin")
    recipe = check({"model": {**MICRO, "router": {"name": "every_other", "phase": 1}}})
    assert recipe.model.router.options() == {"phase": 1}
    assert problems_of({"model": {**MICRO, "router": {"name": "every_other", "phaze": 1}}}) == [
        "model.router.phaze: unknown key; did you mean 'phase'? (valid keys: phase)"]


class ReadsTheFuture(KVPolicy):
    """Step r reads step r + 1: no policy may do that."""

    name = "reads_the_future"

    def writes(self, step):
        return "all"

    def reads(self, step):
        return (step + 1,)


def test_register_kv_policies_validate_runs_at_recipe_time():
    register_plugin(Plugin(register_kv_policies=registers(ReadsTheFuture)), "future_plugin")
    problems = problems_of({"model": {**MICRO, "kv_policy": {"name": "reads_the_future"}}})
    assert len(problems) == 1 and problems[0].startswith("model.kv_policy: kv policy 'reads_the_future': step 0 reads step 1")


class NeedsTwoSteps(DepthScheduler):
    """Refuses any depth but two steps."""

    name = "needs_two_steps"

    def capacities(self, base, progress):
        if len(base) != 2:
            raise ValueError(f"needs exactly 2 steps, got {len(base)}")
        return base


def test_register_depth_schedulers_errors_name_the_key():
    register_plugin(Plugin(register_depth_schedulers=registers(NeedsTwoSteps)), "two_step_plugin")
    check({"model": {**MICRO, "depth_scheduler": {"name": "needs_two_steps"}}})
    problems = problems_of({"model": {**MICRO, "num_recursions": 4, "depth_scheduler": {"name": "needs_two_steps"}}})
    assert problems == ["model.depth_scheduler: needs exactly 2 steps, got 4"]


class Uniform(AttentionBackend):
    """Every allowed key gets the same weight (a toy backend)."""

    name = "uniform"

    def attend(self, q_BHQE, k_BHSE, v_BHSE, *, allowed_BQS, causal):
        return v_BHSE.mean(dim=2, keepdim=True).expand_as(q_BHQE)


def test_register_attention_backends_is_listed_and_buildable():
    register_plugin(Plugin(register_attention_backends=registers(Uniform)), "uniform_plugin")
    recipe = check({"model": {**MICRO, "attention": {"name": "uniform"}}})
    backend = get_registry().build("attention_backend", recipe.model.attention)
    out = backend.attend(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4), allowed_BQS=None, causal=False)
    assert out.shape == (1, 2, 3, 4)


class Doubling(FFN):
    """x -> 2x, no parameters."""

    name = "doubling"

    def forward(self, x_ND):
        return FFNOutput(2 * x_ND)

    def flops_per_token(self):
        return 0


def test_register_ffns_builds_with_the_model_width():
    register_plugin(Plugin(register_ffns=registers(Doubling)), "doubling_plugin")
    recipe = check({"model": {**MICRO, "ffn": {"name": "doubling"}}})
    ffn = get_registry().build("ffn", recipe.model.ffn, d_model=recipe.model.d_model, d_ffn=recipe.model.d_ffn)
    assert ffn.d_model == 64 and torch.equal(ffn(torch.ones(3, 64)).out_BTD, 2 * torch.ones(3, 64))


class TwoDocs(DataSource):
    """Two tiny documents."""

    name = "two_docs"

    def documents(self, split):
        return ["first document"] if split == "train" else ["second document"]


def test_register_datasets_named_by_the_data_section():
    register_plugin(Plugin(register_datasets=registers(TwoDocs)), "two_docs_plugin")
    recipe = check({"model": MICRO, "data": {"source": {"name": "two_docs"}}})
    from adaptive.train.data import build_source

    source = build_source(recipe.data, get_registry())
    assert source.documents("train") == ["first document"]
    assert problems_of({"model": MICRO, "data": {"source": {"name": "two_doc"}}})[0].startswith(
        "data.source.name: unknown dataset 'two_doc'; did you mean 'two_docs'?")

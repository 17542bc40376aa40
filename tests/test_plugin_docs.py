"""docs/plugins.md and docs/testing.md are true and complete for a plugin author working from them alone:
the router snippet, run as written, keeps its init in a built model and passes check_all; every documented
API field is documented; broken plugins are named where they explain an error."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import types
from pathlib import Path

import pytest
import torch

from adaptive.cli import main
from adaptive.errors import PluginError, UnknownComponentError
from adaptive.interfaces import RouteContext
from adaptive.plugins import get_host
from adaptive.testing import check_all, components_registered, micro_config

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_MD = (ROOT / "docs" / "plugins.md").read_text()
EXAMPLE = ROOT / "examples" / "adaptive-example-router" / "adaptive_example_router" / "router.py"
PARTS = {"sharing": "middle_cycle", "router": "linear_threshold", "kv_policy": "recursion_wise"}


def router_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PLUGINS_MD, flags=re.S)
    found = [b for b in blocks if "class LinearThresholdRouter(Router)" in b]
    assert len(found) == 1, "docs/plugins.md should show the example router exactly once"
    return found[0]


@pytest.fixture
def doc_router():
    """The router class defined by executing the docs' snippet as written."""
    module = types.ModuleType("plugins_md_snippet")
    exec(compile(router_snippet(), "docs/plugins.md", "exec"), module.__dict__)
    return module.LinearThresholdRouter


def test_the_snippet_is_the_example_package_verbatim():
    assert router_snippet() in EXAMPLE.read_text()


def test_the_documented_init_survives_building_a_model(doc_router):
    with components_registered(doc_router):
        from adaptive.model import build_model
        from adaptive.plugins import get_registry

        model = build_model(micro_config(PARTS, num_recursions=3), get_registry())
    expected = math.log(0.9 / 0.1)
    assert round(expected, 3) == 2.197 and "2.197" in PLUGINS_MD
    for scorer in model.router.scorers:
        torch.testing.assert_close(scorer.bias.detach(), torch.full_like(scorer.bias, expected))


def test_the_documented_router_passes_check_all(doc_router):
    with components_registered(doc_router):
        check_all(micro_config(PARTS, num_recursions=3))


def test_the_accountant_counts_the_declared_expected_depth(doc_router, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: micro, num_recursions: 3, sharing: {name: middle_cycle}, "
                      "router: {name: linear_threshold}}\n")
    with components_registered(doc_router):
        main(["flops", str(recipe), "--json"])
    steps = [p for p in json.loads(capsys.readouterr().out)["breakdown"] if p["name"].startswith("step")]
    assert [round(p["active_fraction"], 6) for p in steps] == [0.9, 0.81, 0.729]


def test_every_route_context_field_is_documented():
    table = PLUGINS_MD.split("The fields of\n`RouteContext`:")[1].split("### What `route()` returns")[0]
    for field in dataclasses.fields(RouteContext):
        assert f"| `{field.name}` |" in table, f"RouteContext.{field.name} is not documented in docs/plugins.md"


def test_every_micro_config_option_is_documented():
    testing_md = (ROOT / "docs" / "testing.md").read_text()
    section = testing_md.split("`micro_config(")[1].split("\n\n")[0]
    for name in inspect.signature(micro_config).parameters:
        if name != "overrides":
            assert f"`{name}`" in section, f"micro_config's {name!r} is not documented in docs/testing.md"
    assert "`**overrides`" in section


BROKEN = "raise ImportError('needs a package that is not installed')\n"


def test_unknown_component_names_the_plugin_that_failed_to_load(fake_dist, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_dist("thresholds_plugin", BROKEN)))
    with pytest.warns(UserWarning):
        host = get_host()
    with pytest.raises(UnknownComponentError, match=r"unknown router 'x'.*'thresholds_plugin': import failed: "
                                                    r"ImportError: needs a package"):
        host.registry.get("router", "x")


def test_validate_names_the_broken_plugin_behind_an_unknown_router(fake_dist, monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(fake_dist("thresholds_plugin", BROKEN)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: micro, num_layers: 4, num_recursions: 2, sharing: {name: cycle}, "
                      "router: {name: linear_threshold}}\n")
    with pytest.warns(UserWarning), pytest.raises(SystemExit) as info:
        main(["validate", str(recipe)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "model.router.name: unknown router 'linear_threshold'" in err
    assert "'thresholds_plugin': import failed" in err


def test_strict_mode_reports_every_broken_plugin(fake_dist, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_dist("broken_one", BROKEN)))
    fake_dist("broken_two", "raise RuntimeError('boom')\n")
    monkeypatch.setenv("ADAPTIVE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError) as info:
        get_host()
    assert "broken_one" in str(info.value) and "broken_two" in str(info.value)


def test_components_shows_plugin_versions(capsys):
    main(["components", "router", "--json"])
    rows = json.loads(capsys.readouterr().out)
    versions = {row["plugin"]: row["version"] for row in rows}
    assert versions["adaptive_mor"] == get_host().plugins["adaptive_mor"].version is not None
    main(["components", "router"])
    assert "version" in capsys.readouterr().out

"""Recipes: YAML + interpolation + overrides, validated as a whole; every problem reported with its key.

Each ``tests/data/bad_*.yaml`` lists the problems it must produce in ``# expect:`` lines (a line may be a
prefix of the problem; ``{path}`` stands for the file). Every shipped recipe must validate.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptive.errors import RecipeError
from adaptive.recipe import load

ROOT = Path(__file__).resolve().parents[1]
BAD_RECIPES = sorted((ROOT / "tests" / "data").glob("bad_*.yaml"))
SHIPPED_RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))

MICRO = """\
name: mor-${model.num_recursions}
model:
  preset: micro
  num_layers: 4
  num_recursions: 2
  sharing: {name: cycle, on_indivisible: error}
train: {steps: 5, lr: 0.01}
"""


@pytest.fixture
def micro(tmp_path) -> Path:
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO)
    return path


def problems(path: Path, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load(path, overrides)
    return caught.value.problems


def expected_problems(path: Path) -> list[str]:
    return [line.removeprefix("# expect:").strip().replace("{path}", str(path))
            for line in path.read_text().splitlines() if line.startswith("# expect:")]


@pytest.mark.parametrize("path", BAD_RECIPES, ids=lambda p: p.stem)
def test_malformed_recipe_reports_each_problem_with_its_key(path):
    found = problems(path)
    expected = expected_problems(path)
    assert expected, f"{path.name} has no '# expect:' lines"
    assert len(found) == len(expected), found
    for line in expected:
        assert sum(p.startswith(line) for p in found) == 1, f"{line!r} not among {found}"


def test_error_message_lists_every_problem_on_its_own_line():
    error = pytest.raises(RecipeError, load, ROOT / "tests" / "data" / "bad_many_problems.yaml").value
    lines = str(error).splitlines()
    assert lines[0].startswith("6 problem(s) in ") and lines[1:] == [f"  {p}" for p in error.problems]


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_validates(path):
    load(path)


def test_interpolation_resolves_after_overrides(micro):
    assert load(micro).name == "mor-2"
    assert load(micro, ["model.num_layers=8", "model.num_recursions=4"]).name == "mor-4"


def test_overrides_set_nested_values_and_add_new_keys(micro):
    recipe = load(micro, ["train.lr=3e-4", "model.router.name=all", "data.seq_len=64", "train.betas=[0.8,0.9]"])
    assert recipe.train.lr == 3e-4 and recipe.data.seq_len == 64 and recipe.train.betas == (0.8, 0.9)


def test_tilde_deletes_a_key_back_to_its_default(micro):
    assert load(micro).train.steps == 5
    recipe = load(micro, ["~train.steps", "~model.sharing.on_indivisible"])
    assert recipe.train.steps == 300 and recipe.model.sharing.options() == {}


def test_bad_overrides_are_reported_together(micro):
    assert problems(micro, ["~train.nothing", "train.lr", "a.b=[1"]) == [
        "train.nothing: cannot delete, no such key",
        "train.lr: an override is key=value (or ~key to delete)",
        "a.b: bad override 'a.b=[1': did not find expected ',' or ']' (while parsing a flow sequence)",
    ]


def test_override_with_a_typo_gets_a_suggestion(micro):
    [problem] = problems(micro, ["train.lrr=1"])
    assert problem.startswith("train.lrr: unknown key; did you mean 'lr'? (valid keys: ")


def test_unknown_component_lists_the_registered_names(micro):
    [problem] = problems(micro, ["model.kv_policy.name=fulll"])
    assert problem.startswith("model.kv_policy.name: unknown kv_policy 'fulll'; did you mean 'full'? (registered: ")
    assert "full" in problem.split("registered: ")[1].rstrip(")").split(", ")


def test_missing_recipe_file_is_a_recipe_error(tmp_path):
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such recipe file"]


def test_empty_recipe_is_refused(tmp_path):
    """An empty file is a mistake (a wrong path, a failed copy), not a request for the all-default run."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert problems(path) == [f"{path}: the recipe is empty (no keys, only comments or blank lines); a recipe is a "
                              "mapping of sections (name, seed, model, data, tokenizer, train)"]


def test_a_component_that_declares_itself_incompatible_is_a_recipe_error(tmp_path):
    from adaptive import hookimpl
    from adaptive.plugins import register_plugin, unregister_plugin
    from adaptive_base.baseline import AllTokens

    class PickyRouter(AllTokens):
        name = "picky"

        @classmethod
        def incompatible_with(cls, parts):
            return "needs kv_policy recursion_wise" if parts["kv_policy"].name != "recursion_wise" else None

    class Plugin:
        @hookimpl
        def register_routers(self, register):
            register(PickyRouter)

    register_plugin(Plugin(), "picky_plugin")
    try:
        path = tmp_path / "r.yaml"
        path.write_text("model: {preset: micro, num_layers: 4, num_recursions: 2, sharing: {name: cycle}, router: {name: picky}}\n")
        with pytest.raises(RecipeError) as err:
            load(path)
        assert err.value.problems == ["model.router: 'picky' cannot serve here: needs kv_policy recursion_wise"]
        load(path, ["model.kv_policy.name=recursion_wise"])
    finally:
        unregister_plugin("picky_plugin")

"""Meta-tests: every hook is documented and exercised by a test named after it; the documentation's
generated reference covers every recipe key; the full recipes shown in the docs validate."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from adaptive import hookspecs
from adaptive.interfaces import KINDS
from adaptive.plugins import COMPONENT_HOOKS, register_plugin
from adaptive.recipe import Recipe, load
from adaptive.registry import ComponentSpec

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("register_"))
RECIPE_BLOCK = re.compile(r"```yaml\n(# [\w.-]+\.yaml\n.*?)```", re.S)


def test_hookspecs_are_the_expected_set():
    assert set(HOOKS) == set(COMPONENT_HOOKS) | {"register_commands"}
    assert set(COMPONENT_HOOKS.values()) == set(KINDS)


def test_every_hook_has_a_section_in_the_hook_reference():
    headings = re.findall(r"^## (\w+)$", (ROOT / "docs" / "hooks.md").read_text(), re.M)
    assert sorted(headings) == HOOKS


def test_every_hook_is_exercised_by_a_test_named_after_it():
    names = [node.name for path in (ROOT / "tests").glob("test_*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)
             and node.name.startswith("test_")]
    assert [hook for hook in HOOKS if not any(hook in name for name in names)] == []


def load_docs_hook():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "_hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sections(prefix: str, model: type[BaseModel]):
    """(dotted prefix, model) of the recipe and each nested section, components excluded."""
    yield prefix, model
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not ComponentSpec:
            yield from sections(f"{prefix}.{name}" if prefix else name, annotation)


def test_generated_recipe_reference_has_every_key_of_every_section():
    reference = load_docs_hook().recipe_reference()
    for prefix, model in sections("", Recipe):
        table = reference.split(f"### `{prefix}`" if prefix else "### top level")[1].split("\n### ")[0]
        for key in model.model_fields:
            assert f"| `{key}` |" in table, f"{prefix}.{key} missing from the recipe reference"


def docs_recipes():
    for page in sorted((ROOT / "docs").glob("*.md")):
        for index, block in enumerate(RECIPE_BLOCK.findall(page.read_text())):
            yield pytest.param(block, id=f"{page.stem}-{index}")


@pytest.mark.parametrize("block", list(docs_recipes()))
def test_recipe_shown_in_the_docs_validates(block, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "adaptive-example-router"))
    import adaptive_example_router

    register_plugin(adaptive_example_router, "adaptive_example_router")
    path = tmp_path / "recipe.yaml"
    path.write_text(block)
    load(path)

"""Recipes: OmegaConf YAML + ``key=value`` overrides -> one validated, typed tree.

Loading resolves interpolations, applies dotlist overrides (``~key`` deletes a key), validates the whole
tree with pydantic, then validates each named component against its registered Config. Every problem is
collected and raised together as one RecipeError, one ``dotted.path: what is wrong`` line each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adaptive.errors import RecipeError, UnknownComponentError
from adaptive.model.config import MODEL_COMPONENTS, ModelConfig
from adaptive.registry import ComponentSpec, Registry, format_validation_error
from adaptive.train.config import DataConfig, TokenizerConfig, TrainConfig


# recipe path of every named component -> registry kind
COMPONENT_PATHS = {**{f"model.{key}": kind for key, kind in MODEL_COMPONENTS.items()}, "data.source": "dataset"}


class Recipe(BaseModel):
    """The whole description of a run."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="run", description="names the run directory and the summary")
    seed: int = Field(default=0, description="seeds parameter init, data order and sampling")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="tiny"), description="see the model section")
    data: DataConfig = Field(default_factory=DataConfig, description="see the data section")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="see the tokenizer section")
    train: TrainConfig = Field(default_factory=TrainConfig, description="see the train section")

    def component_specs(self) -> dict[str, tuple[str, ComponentSpec]]:
        """Every component the recipe names: dotted path -> (registry kind, spec)."""
        return {path: (kind, _lookup(self, path)) for path, kind in COMPONENT_PATHS.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply overrides and resolve interpolations; no validation yet."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: no such recipe file"], source=str(path))
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise RecipeError([f"{path}{_yaml_location(exc)}: not valid YAML: {_yaml_problem(exc)}"], source=str(path)) from None
    except OmegaConfBaseException as exc:
        raise RecipeError([f"{path}: not a valid recipe: {_first_line(exc)}"], source=str(path)) from None
    if not OmegaConf.is_dict(cfg):
        raise RecipeError([f"{path}: a recipe is a mapping of sections (name, seed, model, data, tokenizer, train)"],
                          source=str(path))
    return apply_overrides(cfg, overrides, source=str(path))


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...], source: str | None = None) -> dict[str, Any]:
    """Apply ``key=value`` and ``~key`` overrides in order, then resolve ``${...}`` interpolations."""
    problems = []
    for item in overrides:
        problem = _delete_key(cfg, item[1:]) if item.startswith("~") else _set_key(cfg, item)
        if problem:
            problems.append(problem)
    if problems:
        raise RecipeError(problems, source=source)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "recipe"
        raise RecipeError([f"{key}: cannot resolve interpolation: {_first_line(exc)}"], source=source) from None


def _delete_key(cfg: Any, key: str) -> str | None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not key or parent is None or not OmegaConf.is_dict(parent) or leaf not in parent:
        return f"{key or '~'}: cannot delete, no such key"
    parent.pop(leaf)
    return None


def _set_key(cfg: Any, item: str) -> str | None:
    key, eq, _ = item.partition("=")
    if not eq or not key.strip():
        return f"{item}: an override is key=value (or ~key to delete)"
    try:
        cfg.merge_with(OmegaConf.from_dotlist([item]))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        return f"{key}: bad override {item!r}: {_first_line(exc)}"
    return None


def validate(raw: dict[str, Any], registry: Registry, source: str | None = None) -> Recipe:
    """Validate a raw recipe tree, reporting every problem at once."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_with_registered_names(line, registry) for line in format_validation_error("", exc, Recipe)]
        problems += _raw_component_problems(raw, registry, skip=problems)
        raise RecipeError(problems, source=source) from None
    problems = []
    for path, (kind, spec) in recipe.component_specs().items():
        problems += _check_component(path, kind, spec, registry)
    if not problems:
        problems += _check_model_structure(recipe, registry) + _check_sections(recipe)
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def _check_component(path: str, kind: str, spec: ComponentSpec, registry: Registry) -> list[str]:
    try:
        registered = registry.get(kind, spec.name)
    except UnknownComponentError as exc:
        return [f"{path}.name: {exc}"]
    try:
        registered.cls.Config.model_validate(spec.options())
    except ValidationError as exc:
        return format_validation_error(path, exc, registered.cls.Config)
    return []


def _raw_component_problems(raw: Any, registry: Registry, skip: list[str]) -> list[str]:
    """Component problems in a tree that failed validation elsewhere, so all are reported together."""
    problems = []
    for path, kind in COMPONENT_PATHS.items():
        value = _lookup(raw, path)
        if any(p.startswith(f"{path}.") or p.startswith(f"{path}:") for p in skip):
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            problems += _check_component(path, kind, ComponentSpec.model_validate(value), registry)
    return problems


def _with_registered_names(line: str, registry: Registry) -> str:
    """Add the registered names to ``model.router.name: required key is missing``."""
    for path, kind in COMPONENT_PATHS.items():
        if line.startswith(f"{path}.name: "):
            return f"{line} (registered: {', '.join(registry.names(kind)) or 'none'})"
    return line


def _check_model_structure(recipe: Recipe, registry: Registry) -> list[str]:
    """Cross-component checks that need built components (the sharing plan must exist, the KV policy must
    serve its steps, the router and schedule must accept the depth)."""
    model = recipe.model
    try:
        plan = registry.build("sharing_scheme", model.sharing).plan(model.num_layers, model.num_recursions)
    except ValueError as exc:
        return [f"model.sharing: {exc}"]
    problems = []
    try:
        registry.build("kv_policy", model.kv_policy).validate(plan.num_steps)
    except ValueError as exc:
        problems.append(f"model.kv_policy: {exc}")
    try:
        router = registry.build("router", model.router, d_model=model.d_model, num_steps=max(plan.num_steps, 1))
        base = router.base_capacities()
    except ValueError as exc:
        return problems + [f"model.router: {exc}"]
    try:
        registry.build("depth_scheduler", model.depth_scheduler).capacities(base, 0.0)
    except ValueError as exc:
        problems.append(f"model.depth_scheduler: {exc}")
    return problems + _incompatibilities(recipe, registry)


def _incompatibilities(recipe: Recipe, registry: Registry) -> list[str]:
    """Each component may refuse the parts beside it (``Component.incompatible_with``)."""
    classes = {key: registry.get(kind, getattr(recipe.model, key).name).cls for key, kind in MODEL_COMPONENTS.items()}
    problems = []
    for key, cls in classes.items():
        reason = cls.incompatible_with(classes)
        if reason:
            problems.append(f"model.{key}: {cls.name!r} cannot serve here: {reason}")
    return problems


def _check_sections(recipe: Recipe) -> list[str]:
    """Checks that span sections of the recipe."""
    seq_len, context = recipe.data.seq_len, recipe.model.max_seq_len
    if seq_len > context:
        return [f"data.seq_len: {seq_len} is longer than the model's context "
                f"(valid: at most model.max_seq_len={context}, or raise model.max_seq_len)"]
    return []


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), registry: Registry | None = None) -> Recipe:
    """Load, override and validate a recipe file."""
    if registry is None:
        from adaptive.plugins import get_registry

        registry = get_registry()
    return validate(load_raw(path, overrides), registry, source=str(path))


def _lookup(tree: Any, dotted: str) -> Any:
    """``tree["a"]["b"]`` (dicts) or ``tree.a.b`` (models) for ``"a.b"``; None where the path breaks."""
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else getattr(tree, key, None)
    return tree


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, yaml.YAMLError):
        return _yaml_problem(exc)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _yaml_location(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if not problem:
        return " ".join(str(exc).split()) or type(exc).__name__
    return f"{problem} ({context})" if context else problem

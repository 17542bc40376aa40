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


class Recipe(BaseModel):
    """The whole description of a run."""

    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    seed: int = 0
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="tiny"))
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    train: TrainConfig = TrainConfig()

    def component_specs(self) -> dict[str, tuple[str, ComponentSpec]]:
        """Every component the recipe names: dotted path -> (registry kind, spec)."""
        specs = {f"model.{key}": (kind, getattr(self.model, key)) for key, kind in MODEL_COMPONENTS.items()}
        specs["data.source"] = ("dataset", self.data.source)
        return specs

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply overrides and resolve interpolations; no validation yet."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: no such recipe file"], source=str(path))
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise RecipeError([f"{path}: not valid YAML: {exc}"], source=str(path)) from None
    if not OmegaConf.is_dict(cfg):
        raise RecipeError([f"{path}: a recipe is a mapping of sections (model, data, tokenizer, train)"], source=str(path))
    return apply_overrides(cfg, overrides, source=str(path))


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...], source: str | None = None) -> dict[str, Any]:
    problems = []
    for item in overrides:
        if item.startswith("~"):
            key = item[1:]
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if parent is None or not OmegaConf.is_dict(parent) or leaf not in parent:
                problems.append(f"{key}: cannot delete, no such key")
            else:
                parent.pop(leaf)
            continue
        if "=" not in item:
            problems.append(f"{item}: overrides are key=value (or ~key to delete)")
            continue
        try:
            cfg.merge_with(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            problems.append(f"{item.split('=', 1)[0]}: bad override: {exc}")
    if problems:
        raise RecipeError(problems, source=source)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "recipe"
        raise RecipeError([f"{key}: cannot resolve interpolation: {exc.msg if hasattr(exc, 'msg') else exc}"], source=source) from None


def validate(raw: dict[str, Any], registry: Registry, source: str | None = None) -> Recipe:
    """Validate a raw recipe tree, reporting every problem at once."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error("", exc, Recipe), source=source) from None
    problems = []
    for path, (kind, spec) in recipe.component_specs().items():
        problems += _check_component(path, kind, spec, registry)
    if not problems:
        problems += _check_model_structure(recipe, registry)
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


def _check_model_structure(recipe: Recipe, registry: Registry) -> list[str]:
    """Cross-component checks that need built components (e.g. the sharing plan must exist)."""
    model = recipe.model
    scheme = registry.build("sharing_scheme", model.sharing)
    try:
        scheme.plan(model.num_layers, model.num_recursions)
    except ValueError as exc:
        return [f"model.sharing: {exc}"]
    return []


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), registry: Registry | None = None) -> Recipe:
    """Load, override and validate a recipe file."""
    if registry is None:
        from adaptive.plugins import get_registry

        registry = get_registry()
    return validate(load_raw(path, overrides), registry, source=str(path))

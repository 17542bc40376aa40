"""Recipes: OmegaConf YAML + ``key=value`` overrides -> one validated, typed tree.

Loading resolves interpolations, applies dotlist overrides (``~key`` deletes a key), validates the whole
tree with pydantic, then validates each named component against its registered Config. Every problem is
collected and raised together as one RecipeError, one ``dotted.path: what is wrong`` line each.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adaptive import shipped
from adaptive.errors import RecipeError, UnknownComponentError
from adaptive.model.config import MODEL_COMPONENTS, PRESETS, ModelConfig
from adaptive.registry import ComponentSpec, Registry, format_validation_error
from adaptive.train import sizing
from adaptive.train.config import DataConfig, TokenizerConfig, TrainConfig


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")

# recipe path of every named component -> registry kind
COMPONENT_PATHS = {**{f"model.{key}": kind for key, kind in MODEL_COMPONENTS.items()}, "data.source": "dataset"}


class Recipe(BaseModel):
    """The whole description of a run."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="run", description="names the run directory and the summary (letters, digits, _ . -)")
    seed: int = Field(default=0, ge=0, lt=2**32, description="seeds parameter init, data order and sampling")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="tiny"), description="see the model section")
    data: DataConfig = Field(default_factory=DataConfig, description="see the data section")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="see the tokenizer section")
    train: TrainConfig = Field(default_factory=TrainConfig, description="see the train section")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain name: a run name is letters, digits, '_', '.' and '-' "
                             "(it names a directory under runs/; set train.out_dir to choose another place)")
        return name

    def component_specs(self) -> dict[str, tuple[str, ComponentSpec]]:
        """Every component the recipe names: dotted path -> (registry kind, spec)."""
        return {path: (kind, _lookup(self, path)) for path, kind in COMPONENT_PATHS.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply overrides and resolve interpolations; no validation yet."""
    path = shipped.resolve(path)  # an existing file, else a shipped recipe's name, else a RecipeError
    _check_text(path)
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
    problems += _resolver_problems(OmegaConf.to_container(cfg, resolve=False))
    if problems:
        raise RecipeError(problems, source=source)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "recipe"
        raise RecipeError([f"{key}: cannot resolve interpolation: {_first_line(exc)}"], source=source) from None


def _check_text(path: Path) -> None:
    """A recipe file is UTF-8 text that holds at least one key (not empty, not only comments)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                           "a recipe is a YAML file"], source=str(path)) from None
    except OSError as exc:
        raise RecipeError([f"{path}: cannot read the recipe ({exc.strerror or exc})"], source=str(path)) from None
    try:
        empty = yaml.safe_load(text) is None
    except yaml.YAMLError:
        return  # reported with its location by the OmegaConf load
    if empty:
        raise RecipeError([f"{path}: the recipe is empty (no keys, only comments or blank lines); a recipe is a "
                           "mapping of sections (name, seed, model, data, tokenizer, train)"], source=str(path))


_RESOLVER = re.compile(r"\$\{\s*([\w.\-]+)\s*:")


def _resolver_problems(tree: Any, prefix: str = "") -> list[str]:
    """``${oc.env:HOME}`` and every other resolver would read outside the recipe: only ``${key}`` references
    to other keys of the recipe are allowed."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _resolver_problems(v, f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in _resolver_problems(v, f"{prefix}{i}.")]
    found = _RESOLVER.search(tree) if isinstance(tree, str) else None
    if found:
        return [f"{prefix.rstrip('.')}: the resolver ${{{found.group(1)}:...}} is not allowed; a recipe may only "
                "interpolate its own keys (${model.d_model}, ${..seq_len})"]
    return []


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
    """Validate a raw recipe tree, reporting every problem at once. Types are strict (``true`` is not a
    number, ``"3"`` is not an integer) and every number is finite."""
    problems = _nonfinite_problems(raw)
    try:
        recipe = _strict(Recipe, raw)
    except ValidationError as exc:
        reported = {p.partition(":")[0] for p in problems}  # a non-finite value is reported once
        problems += [_with_registered_names(line, registry) for line in format_validation_error("", exc, Recipe)
                     if line.partition(":")[0] not in reported]
        problems += _raw_component_problems(raw, registry, skip=problems)
        problems += _raw_section_problems(raw, skip=problems)
        raise RecipeError(problems, source=source) from None
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
        _strict(registered.cls.Config, spec.options())
    except ValidationError as exc:
        return format_validation_error(path, exc, registered.cls.Config)
    return []


def _strict(model: type[BaseModel], raw: Any) -> Any:
    """``model`` validated in strict mode from the tree's JSON form (so YAML lists may fill tuples)."""
    return model.model_validate_json(json.dumps(raw, default=str), strict=True)


def _nonfinite_problems(tree: Any, prefix: str = "") -> list[str]:
    """``inf``, ``-inf`` and ``nan`` anywhere in the tree (no recipe value may be one)."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _nonfinite_problems(v, f"{prefix}{k}.")]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in _nonfinite_problems(v, f"{prefix}{i}.")]
    if isinstance(tree, float) and not math.isfinite(tree):
        return [f"{prefix.rstrip('.')}: must be a finite number (got {tree})"]
    return []


def _raw_section_problems(raw: Any, skip: list[str]) -> list[str]:
    """The cross-section checks on a tree that failed validation elsewhere, where their keys are readable."""
    seq_len, model = _lookup(raw, "data.seq_len"), _lookup(raw, "model")
    if not isinstance(model, dict) or any(p.startswith(("data.seq_len", "model.max_seq_len")) for p in skip):
        return []
    preset = model.get("preset")
    context = model.get("max_seq_len", PRESETS.get(preset, {}).get("max_seq_len") if isinstance(preset, str) else None)
    if type(seq_len) is int and type(context) is int:
        return _context_problems(seq_len, context)
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
    vocab = model.vocab_size or recipe.tokenizer.vocab_size
    too_big = sizing.parameter_problem(model, plan.num_physical, vocab)  # before any component allocates
    if too_big:
        return [too_big]
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
    return _context_problems(recipe.data.seq_len, recipe.model.max_seq_len)


def _context_problems(seq_len: int, context: int) -> list[str]:
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

"""Every registered combination of parts, which of them can run together, and a micro model for each.

A combination names one registered component per axis (sharing scheme, router, KV policy, FFN, ...).
It is skipped, always with a reason, when a sharing scheme has no recursion steps (router and KV policy
would be unused: only the model defaults run), when a component declares it incompatible
(``Component.incompatible_with``), or when the micro model refuses it with a ValueError (e.g. an
attention backend that needs a GPU).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch

from adaptive.model.config import MODEL_COMPONENTS, ModelConfig
from adaptive.plugins import get_registry
from adaptive.registry import ComponentSpec, Registry
from adaptive.testing.models import as_model, single_threaded

AXES = ("sharing", "router", "kv_policy", "ffn")
MICRO = dict(d_model=32, num_heads=4, num_kv_heads=2, d_ffn=64, vocab_size=64, max_seq_len=64, init_std=0.1)
MAX_EXTRA_LAYERS = 4  # layers a sharing scheme may add beyond N_r (e.g. middle_cycle's unique ends)


@dataclass(frozen=True)
class Combination:
    """One registered name per recipe key, and why it is skipped (None: it runs)."""

    parts: tuple[tuple[str, str], ...]
    skip: str | None = None

    def names(self) -> dict[str, str]:
        return dict(self.parts)

    @property
    def id(self) -> str:
        return "-".join(name for _, name in self.parts)


def _registry(registry: Registry | None) -> Registry:
    return registry if registry is not None else get_registry()


def combinations(registry: Registry | None = None, axes: tuple[str, ...] = AXES,
                 fixed: dict[str, str] | None = None, probe: bool = True) -> list[Combination]:
    """The product of every registered name on each of ``axes`` (``fixed`` pins other recipe keys)."""
    registry = _registry(registry)
    fixed = dict(fixed or {})
    names = [registry.names(MODEL_COMPONENTS[axis]) for axis in axes]
    found = []
    for chosen in itertools.product(*names):
        parts = {**fixed, **dict(zip(axes, chosen))}
        found.append(Combination(tuple(parts.items()), skip_reason(parts, registry, probe)))
    return found


def skip_reason(parts: dict[str, str], registry: Registry, probe: bool = True) -> str | None:
    """Why these parts are not run together, or None."""
    classes = {key: registry.get(MODEL_COMPONENTS[key], name).cls for key, name in parts.items()}
    for key, cls in classes.items():
        reason = cls.incompatible_with(classes)
        if reason:
            return f"{MODEL_COMPONENTS[key]} {cls.name!r} declares it cannot serve beside {_describe(parts)}: {reason}"
    router, scheduler = classes.get("router"), parts.get("depth_scheduler")
    if router is not None and not router.uses_capacity and scheduler not in (None, _default("depth_scheduler")):
        return (f"router {router.name!r} does not use step capacities, so depth_scheduler {scheduler!r} would have "
                f"no effect (its combination with depth_scheduler={_default('depth_scheduler')!r} runs instead)")
    try:
        config = micro_config(parts, registry=registry)
    except ValueError as exc:
        return f"no micro model for {_describe(parts)}: {exc}"
    if config.num_recursions == 1 and not _has_steps(config, registry):
        unused = [key for key in ("router", "kv_policy") if key in parts and parts[key] != _default(key)]
        if unused:
            return (f"sharing {parts['sharing']!r} has no recursion steps, so {' and '.join(unused)} would be unused "
                    f"(its combination with the defaults router={_default('router')!r}, "
                    f"kv_policy={_default('kv_policy')!r} runs instead)")
    return _probe(config, registry) if probe else None


def micro_config(parts: dict[str, str], *, num_recursions: int = 2, min_layers: int = 2,
                 registry: Registry | None = None, **overrides) -> ModelConfig:
    """A micro model (d_model 32, vocabulary 64) with the named parts. The number of layers is the smallest
    at least ``min_layers`` that the sharing scheme accepts for ``num_recursions`` steps; a scheme without
    recursion gets one step."""
    registry = _registry(registry)
    specs = {key: ComponentSpec(name=name) for key, name in parts.items()}
    for recursions in dict.fromkeys((num_recursions, 1)):
        sharing = specs.get("sharing", ComponentSpec(name=_default("sharing")))
        layers = _layers_for(sharing, recursions, max(min_layers, recursions), registry)
        if layers is not None:
            shape = {**MICRO, **overrides, "num_layers": layers, "num_recursions": recursions}
            return ModelConfig(**shape, **specs)
    raise ValueError(f"sharing {parts.get('sharing')!r} accepts neither {num_recursions} nor 1 recursion steps "
                     f"with {min_layers} to {max(min_layers, num_recursions) + MAX_EXTRA_LAYERS} layers")


def _layers_for(sharing: ComponentSpec, num_recursions: int, min_layers: int, registry: Registry) -> int | None:
    scheme = registry.build("sharing_scheme", sharing)
    for layers in range(max(2, min_layers), min_layers + MAX_EXTRA_LAYERS + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a scheme that pads the depth warns: look further
                scheme.plan(layers, num_recursions)
        except (ValueError, Warning):
            continue
        return layers
    return None


def _has_steps(config: ModelConfig, registry: Registry) -> bool:
    return bool(registry.build("sharing_scheme", config.sharing).plan(config.num_layers, config.num_recursions).steps)


@single_threaded
def _probe(config: ModelConfig, registry: Registry) -> str | None:
    """Build the micro model and run one short forward; a ValueError is the model refusing the parts."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = as_model(config, registry=registry)
            with torch.no_grad():
                model(torch.zeros(1, 4, dtype=torch.long))
    except ValueError as exc:
        return f"the micro model refuses {_describe(config_parts(config))}: {exc}"
    return None


def config_parts(config: ModelConfig) -> dict[str, str]:
    return {key: getattr(config, key).name for key in MODEL_COMPONENTS}


def _default(key: str) -> str:
    return ModelConfig.model_fields[key].default.name


def _describe(parts: dict[str, str]) -> str:
    return ", ".join(f"{key}={name!r}" for key, name in parts.items())

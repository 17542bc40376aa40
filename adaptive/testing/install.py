"""Register component classes in-process for the duration of a test, exactly as an installed plugin would."""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

from adaptive.hookspecs import hookimpl
from adaptive.interfaces import Component
from adaptive.plugins import COMPONENT_HOOKS, get_registry, register_plugin, unregister_plugin
from adaptive.registry import Registry

HOOK_OF_KIND = {kind: hook for hook, kind in COMPONENT_HOOKS.items()}


@contextlib.contextmanager
def components_registered(*classes: type[Component], plugin: str = "test_components") -> Iterator[None]:
    """``with components_registered(MyRouter): check_causality(...)`` registers the classes under the plugin
    name ``plugin`` and removes them afterwards. A class already registered (its plugin is installed) is
    left as it is."""
    registry = get_registry()
    classes = tuple(cls for cls in classes if _registered_class(registry, cls) is not cls)
    if not classes:
        yield
        return
    hooks = {}
    for kind in dict.fromkeys(cls.kind for cls in classes):
        hooks[HOOK_OF_KIND[kind]] = hookimpl(_registrar([cls for cls in classes if cls.kind == kind]))
    info = register_plugin(types.SimpleNamespace(**hooks), plugin)
    if info.error:
        raise RuntimeError(f"registering {', '.join(c.__name__ for c in classes)} failed: {info.error}")
    try:
        yield
    finally:
        unregister_plugin(plugin)


def _registrar(classes: list[type[Component]]):
    def register_all(register):
        for cls in classes:
            register(cls)

    return register_all


def _registered_class(registry: Registry, cls: type[Component]) -> type | None:
    found = [entry.cls for entry in registry.entries(cls.kind) if entry.name == cls.name]
    return found[0] if found else None

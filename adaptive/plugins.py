"""The plugin manager: built-in and third-party plugins load the same way, through entry points.

Entry points in the group ``adaptive`` are loaded one at a time. A plugin that fails to import, names a
hook that does not exist, or fails while registering is recorded with its error and a warning, and
everything else goes on (``ADAPTIVE_STRICT_PLUGINS=1`` turns that into an error).
``ADAPTIVE_LOAD_PLUGINS=a,b`` loads only the named entry points.
"""

from __future__ import annotations

import os
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from adaptive import hookspecs
from adaptive.errors import PluginError, PluginWarning
from adaptive.registry import Registry

ENTRY_POINT_GROUP = "adaptive"
COMPONENT_HOOKS = {
    "register_sharing_schemes": "sharing_scheme",
    "register_routers": "router",
    "register_kv_policies": "kv_policy",
    "register_depth_schedulers": "depth_scheduler",
    "register_attention_backends": "attention_backend",
    "register_ffns": "ffn",
    "register_datasets": "dataset",
}


@dataclass
class PluginInfo:
    name: str
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    distribution: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "distribution": self.distribution,
                "hooks": self.hooks, "error": self.error}


class PluginHost:
    """A pluggy manager plus the component registry it fills."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.pm = pluggy.PluginManager("adaptive")
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: dict[str, PluginInfo] = {}

    def load_entry_points(self, allow: set[str] | None = None) -> None:
        seen = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in seen or (allow is not None and ep.name not in allow):
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, version=dist.version if dist else None, distribution=dist.name if dist else None)
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must never take the host down
                self._fail(info, f"import failed: {type(exc).__name__}: {exc}", exc)
                continue
            self.register_plugin(module, ep.name, info)

    def register_plugin(self, plugin: object, name: str, info: PluginInfo | None = None) -> PluginInfo:
        """Register one plugin object (module or instance) and the components it provides."""
        info = info or PluginInfo(name)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(info, f"invalid hooks: {exc}", exc)
            return info
        info.hooks = sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or [])
        self.plugins[name] = info
        for hook_name, kind in COMPONENT_HOOKS.items():
            if hook_name not in info.hooks:
                continue
            try:
                getattr(plugin, hook_name)(register=self._register_for(kind, name))
            except Exception as exc:
                self.registry.drop_plugin(name)
                self.pm.unregister(plugin)
                info.hooks = []
                self._fail(info, f"{hook_name} failed: {type(exc).__name__}: {exc}", exc)
                return info
        return info

    def _register_for(self, kind: str, plugin_name: str):
        def register(cls: type) -> None:
            self.registry.add(kind, cls, plugin_name)

        return register

    def _fail(self, info: PluginInfo, message: str, exc: BaseException) -> None:
        info.error = message
        self.plugins[info.name] = info
        if self.strict:
            raise PluginError(f"plugin {info.name!r}: {message}") from exc
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        warnings.warn(f"plugin {info.name!r} was not loaded: {message} ({detail})", PluginWarning, stacklevel=2)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _allow_list() -> set[str] | None:
    raw = os.environ.get("ADAPTIVE_LOAD_PLUGINS")
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _host
    if _host is None:
        host = PluginHost(strict=_env_flag("ADAPTIVE_STRICT_PLUGINS"))
        host.load_entry_points(_allow_list())
        _host = host
    return _host


def reset_host() -> None:
    """Forget the loaded plugins (tests; after installing a plugin in-process)."""
    global _host
    _host = None


def get_registry() -> Registry:
    return get_host().registry


def register_plugin(plugin: object, name: str) -> PluginInfo:
    """Register a plugin object in-process (tests, notebooks) exactly as an entry point would be."""
    return get_host().register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    host = get_host()
    plugin = host.pm.get_plugin(name)
    if plugin is not None:
        host.pm.unregister(plugin)
    host.registry.drop_plugin(name)
    host.plugins.pop(name, None)

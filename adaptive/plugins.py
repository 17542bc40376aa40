"""The plugin manager: built-in and third-party plugins load the same way, through entry points.

Entry points in the group ``adaptive`` are loaded one at a time, the built-in ones (those of the
``adaptive-lm`` distribution) first, so a third-party plugin can never displace a built-in name. A plugin
that fails to import, names a hook that does not exist, or fails while registering is recorded with its
error and a warning, and everything else goes on (``ADAPTIVE_STRICT_PLUGINS=1`` turns that into an
error). ``ADAPTIVE_LOAD_PLUGINS=a,b`` loads only the named third-party entry points (empty: none); the
built-in plugins always load.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from adaptive import hookspecs
from adaptive.errors import AdaptiveError, PluginError, PluginWarning
from adaptive.registry import Registry

ENTRY_POINT_GROUP = "adaptive"
BUILTIN_DISTRIBUTION = "adaptive-lm"
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
        self._strict_failures: list[str] | None = None  # collected while loading entry points in strict mode

    def load_entry_points(self, allow: set[str] | None = None) -> None:
        """Load every entry point of the group (third-party ones narrowed by ``allow``), one at a time."""
        loaded: dict[str, str | None] = {}
        self._strict_failures = [] if self.strict else None
        try:
            self._load_each(allow, loaded)
        finally:
            failures, self._strict_failures = self._strict_failures, None
        if failures:  # strict: every broken plugin at once (one line each), not only the first
            raise PluginError("\n".join(f"{line} (ADAPTIVE_STRICT_PLUGINS is set)" for line in failures))

    def _load_each(self, allow: set[str] | None, loaded: dict[str, str | None]) -> None:
        entry_points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=_load_order)
        _warn_unknown_allowed(allow, entry_points)
        for ep in entry_points:
            dist = _distribution_name(ep)
            if allow is not None and dist != BUILTIN_DISTRIBUTION and ep.name not in allow:
                continue
            if ep.name in loaded:  # the same distribution seen twice on sys.path is harmless
                if loaded[ep.name] != dist:
                    self._fail(PluginInfo(ep.name, distribution=dist),
                               f"entry point name already used by distribution {loaded[ep.name]!r}", record=False)
                continue
            loaded[ep.name] = dist
            info = PluginInfo(ep.name, version=ep.dist.version if ep.dist else None, distribution=dist)
            try:
                module = ep.load()
            except (Exception, SystemExit) as exc:  # a broken third-party plugin must never take the host down
                self._fail(info, f"import failed: {_one_line(exc)}", exc)
                continue
            self.register_plugin(module, ep.name, info)

    def register_plugin(self, plugin: object, name: str, info: PluginInfo | None = None) -> PluginInfo:
        """Register one plugin object (module or instance) and the components it provides."""
        info = info or PluginInfo(name)
        if self.pm.has_plugin(name) or self.pm.is_registered(plugin):
            self._fail(info, "a plugin with this name or object is already registered", record=False)
            return info
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            message = _unknown_hooks_message(self.pm, plugin) or f"invalid hook: {_one_line(exc)}"
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(info, message, exc)
            return info
        info.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
        self.plugins[name] = info
        self._register_components(plugin, info)
        return info

    def _register_components(self, plugin: object, info: PluginInfo) -> None:
        for caller in self.pm.get_hookcallers(plugin) or []:
            kind = COMPONENT_HOOKS.get(caller.name)
            impls = [impl for impl in caller.get_hookimpls() if impl.plugin is plugin]
            if kind is None or not impls:
                continue
            try:
                impls[0].function(register=self._register_for(kind, info.name))
            except Exception as exc:
                self.registry.drop_plugin(info.name)
                self.pm.unregister(plugin)
                info.hooks = []
                self._fail(info, f"{caller.name} failed: {_one_line(exc)}", exc)
                return

    def _register_for(self, kind: str, plugin_name: str):
        def register(cls: type) -> None:
            self.registry.add(kind, cls, plugin_name)

        return register

    def fail(self, name: str, message: str, exc: BaseException | None = None) -> None:
        """Record that a loaded plugin failed later (e.g. in ``register_commands``): warn, or raise if strict."""
        info = self.plugins.setdefault(name, PluginInfo(name))
        self._fail(info, message, exc, outcome="failed")

    def _fail(self, info: PluginInfo, message: str, exc: BaseException | None = None, record: bool = True,
              outcome: str = "was not loaded") -> None:
        if record:
            info.error = message
            self.plugins[info.name] = info
            self.registry.failed_plugins[info.name] = message
        if self._strict_failures is not None:
            self._strict_failures.append(f"plugin {info.name!r}: {message}")
            return
        if self.strict:
            raise PluginError(f"plugin {info.name!r}: {message} (ADAPTIVE_STRICT_PLUGINS is set)") from exc
        warnings.warn(f"plugin {info.name!r} {outcome}: {message}", PluginWarning, stacklevel=3)


def _warn_unknown_allowed(allow: set[str] | None, entry_points: list[metadata.EntryPoint]) -> None:
    """``ADAPTIVE_LOAD_PLUGINS`` naming a plugin that no installed distribution provides is a typo or a missing
    install: say so, with the names that exist."""
    known = {ep.name for ep in entry_points}
    unknown = sorted((allow or set()) - known)
    if unknown:
        third_party = sorted({ep.name for ep in entry_points if _distribution_name(ep) != BUILTIN_DISTRIBUTION})
        warnings.warn(f"ADAPTIVE_LOAD_PLUGINS names {', '.join(map(repr, unknown))}, which no installed plugin "
                      f"provides (installed third-party plugins: {', '.join(third_party) or 'none'})",
                      PluginWarning, stacklevel=3)


def _distribution_name(ep: metadata.EntryPoint) -> str | None:
    return ep.dist.name if getattr(ep, "dist", None) else None


def _load_order(ep: metadata.EntryPoint) -> tuple[bool, str, str]:
    """Built-in plugins first, then by entry point name, then by distribution (deterministic on any disk)."""
    dist = _distribution_name(ep) or ""
    return (dist != BUILTIN_DISTRIBUTION, ep.name, dist)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, AdaptiveError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unknown_hooks_message(pm: pluggy.PluginManager, plugin: object) -> str | None:
    """``unknown hook 'register_routerz' (did you mean 'register_routers'?)`` for a misspelled hook."""
    unknown = [c.name for c in pm.get_hookcallers(plugin) or [] if c.spec is None]
    if not unknown:
        return None
    valid = sorted(n for n in dir(hookspecs) if n.startswith("register_"))
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"unknown hook {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(parts) + f"; valid hooks: {', '.join(valid)}"


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
    host.registry.failed_plugins.pop(name, None)
    host.plugins.pop(name, None)

"""Components by kind and name, each remembering the plugin that registered it."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from adaptive.errors import PluginError, UnknownComponentError
from adaptive.interfaces import KINDS, Component, ComponentConfig

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]*$")


@dataclass(frozen=True)
class Registered:
    kind: str
    name: str
    cls: type[Component]
    plugin: str

    @property
    def summary(self) -> str:
        doc = (self.cls.description or self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class Registry:
    """Registered component classes, validated when they are added."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        self.failed_plugins: dict[str, str] = {}  # plugin -> why it did not load (named by unknown-name errors)

    def add(self, kind: str, cls: type, plugin: str) -> None:
        base = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"plugin {plugin!r} registered {cls!r} as a {kind}, but it is not a {base.__name__} subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise PluginError(f"plugin {plugin!r}: {cls.__name__}.name must be a lowercase identifier, got {name!r}")
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, ComponentConfig)):
            raise PluginError(f"plugin {plugin!r}: {cls.__name__}.Config must subclass adaptive.ComponentConfig")
        if cls.Config.model_config.get("extra") != "forbid":
            raise PluginError(f"plugin {plugin!r}: {cls.__name__}.Config must forbid unknown keys (extra='forbid')")
        existing = self._by_kind[kind].get(name)
        if existing is not None and existing.cls is not cls:
            raise PluginError(
                f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} and by plugin {plugin!r}"
            )
        self._by_kind[kind][name] = Registered(kind, name, cls, plugin)

    def drop_plugin(self, plugin: str) -> None:
        for entries in self._by_kind.values():
            for name in [n for n, r in entries.items() if r.plugin == plugin]:
                del entries[name]

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def entries(self, kind: str | None = None) -> list[Registered]:
        kinds = [kind] if kind else list(self._by_kind)
        return [self._by_kind[k][n] for k in kinds for n in sorted(self._by_kind[k])]

    def get(self, kind: str, name: str) -> Registered:
        if kind not in self._by_kind:
            raise UnknownComponentError(f"unknown component kind {kind!r} (valid: {', '.join(self._by_kind)})")
        found = self._by_kind[kind].get(name)
        if found is None:
            raise UnknownComponentError(unknown_name_message(kind, name, self.names(kind), self.failed_plugins))
        return found

    def config(self, kind: str, name: str, values: dict) -> ComponentConfig:
        """Validate ``values`` against the component's Config (raises pydantic's ValidationError)."""
        return self.get(kind, name).cls.Config.model_validate(values)

    def build(self, kind: str, spec: "ComponentSpec", **context) -> Component:
        reg = self.get(kind, spec.name)
        config = reg.cls.Config.model_validate(spec.options())
        return reg.cls.from_config(config, **context)


class ComponentSpec(BaseModel):
    """A recipe's reference to a component: ``{name: ..., <its Config's keys>...}``."""

    model_config = {"extra": "allow", "frozen": True}
    name: str

    def options(self) -> dict:
        return dict(self.model_extra or {})


def unknown_name_message(kind: str, name: str, valid: list[str], failed: dict[str, str] | None = None) -> str:
    """``unknown router 'x'`` with the closest registered name, and the plugins that failed to load (one of
    them may be what provides it)."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    message = f"unknown {kind} {name!r}{hint} (registered: {', '.join(valid) or 'none'})"
    if failed:
        broken = "; ".join(f"{plugin!r}: {why}" for plugin, why in sorted(failed.items()))
        message += f"; plugins that failed to load, which may be why: {broken}"
    return message


def format_validation_error(prefix: str, err: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One ``dotted.path: message (what would be valid)`` line per pydantic error."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        path = ".".join([prefix, *loc] if prefix else loc) or "recipe"
        lines.append(f"{path}: {_describe(e, model, loc)}")
    return lines


def _describe(e: dict, model: type[BaseModel] | None, loc: list[str]) -> str:
    kind, value = e["type"], e.get("input")
    if kind == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key{hint} (valid keys: {', '.join(valid)})" if valid else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "model_type" and e.get("ctx", {}).get("class_name") == "ComponentSpec":
        return f"expected a mapping {{name: <registered name>, <options>}} (got {value!r})"
    if kind in ("model_type", "dict_type"):
        return f"expected a mapping (got {value!r})"
    msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = msg.replace("Input should be", "must be", 1)
    if kind != "value_error" and not isinstance(value, (dict, list)):
        msg += f" (got {value!r})"
    return msg


def _fields_at(model: type[BaseModel] | None, loc: list[str]) -> list[str]:
    """The field names of the (nested) pydantic model at ``loc``, when it can be resolved statically."""
    for key in loc:
        if model is None or key not in model.model_fields:
            return []
        annotation = model.model_fields[key].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(model.model_fields) if model is not None else []

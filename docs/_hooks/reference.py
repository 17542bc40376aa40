"""mkdocs hook: generates the recipe and component reference tables from the code, so they cannot drift.

A page containing ``<!-- recipe-reference -->`` gets one table per recipe section (from the pydantic
models); ``<!-- component-reference -->`` gets the components registered in the building environment,
each with the options of its Config; ``<!-- component-reference: PLUGIN -->`` gets only those one plugin
registers (a plugin's own page).
"""

from __future__ import annotations

import re
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

RECIPE_MARKER = "<!-- recipe-reference -->"
COMPONENT_MARKER = "<!-- component-reference -->"
PLUGIN_MARKER = re.compile(r"<!-- component-reference: ([A-Za-z0-9_.-]+) -->")
COMPONENT_HELP = "a registered component: `{name: ..., <its options>}` (see Components below)"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if RECIPE_MARKER in markdown:
        markdown = markdown.replace(RECIPE_MARKER, recipe_reference())
    if COMPONENT_MARKER in markdown:
        markdown = markdown.replace(COMPONENT_MARKER, component_reference())
    return PLUGIN_MARKER.sub(lambda m: component_reference(plugin=m.group(1)), markdown)


def recipe_reference() -> str:
    from adaptive.recipe import Recipe

    return "\n".join(section_tables("", Recipe))


def section_tables(prefix: str, model: type[BaseModel]) -> list[str]:
    """A table of ``model``'s keys, then one per nested section, depth first."""
    title = f"`{prefix}`" if prefix else "top level"
    doc = (model.__doc__ or "").strip().split("\n\n")[0]
    out = [f"### {title}", "", *([doc, ""] if doc else []), *fields_table(model), ""]
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            out += section_tables(f"{prefix}.{name}" if prefix else name, field.annotation)
    return out


def fields_table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = field.description or (COMPONENT_HELP if _is_component(field.annotation) else "")
        cells = [f"`{name}`", type_name(field.annotation) + _bounds(field), _default(field), description]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def _cell(text: str) -> str:
    """Table-safe markdown: pipes escaped, ``<...>`` outside code spans shown literally, one line."""
    parts = text.replace("\n", " ").replace("|", "\\|").split("`")
    parts[::2] = [p.replace("<", "&lt;").replace(">", "&gt;") for p in parts[::2]]
    return "`".join(parts)


def component_reference(plugin: str | None = None) -> str:
    """Every registered component by kind, or only ``plugin``'s (an unknown plugin fails the build)."""
    from adaptive.interfaces import KINDS
    from adaptive.plugins import get_registry

    registry = get_registry()
    out = []
    for kind in KINDS:
        entries = [e for e in registry.entries(kind) if plugin is None or e.plugin == plugin]
        if not entries:
            continue
        out += [f"### {kind}", ""]
        for entry in entries:
            out += [f"#### `{entry.name}`", "", f"{entry.summary} *(plugin `{entry.plugin}`)*", ""]
            options = fields_table(entry.cls.Config) if entry.cls.Config.model_fields else ["No options."]
            out += [*options, ""]
    if not out:
        raise ValueError(f"component-reference: no components registered by plugin {plugin!r}")
    return "\n".join(out)


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if _is_component(annotation):
        return "component"
    if _is_section(annotation):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _is_component(annotation) -> bool:
    from adaptive.registry import ComponentSpec

    return annotation is ComponentSpec


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel) and not _is_component(annotation)


def _bounds(field) -> str:
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
    found = [f"{sign} {getattr(m, key)}" for m in field.metadata for key, sign in signs.items() if hasattr(m, key)]
    return f" ({', '.join(found)})" if found else ""


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default if field.default_factory is None else field.default_factory()
    if isinstance(value, BaseModel):
        if _is_component(type(value)):
            return f"`{{name: {value.name}}}`"
        return "see below"
    return f"`{value!r}`" if value is not None else "`null`"

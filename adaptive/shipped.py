"""The recipes that ship with the package: their names, one-line descriptions, and name -> file resolution.

A built wheel carries the checkout's top-level ``recipes/`` as ``adaptive/recipes/`` (``setup.py`` copies it
at build time); a checkout or an editable install reads ``recipes/`` beside the package. A recipe's name is
its path under that folder without ``.yaml`` (``mor_expert``, ``paper/vanilla_135m``); its description is
the first sentence of its leading comment. Nothing here is a fixed list: a new YAML file is a new recipe.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from adaptive.errors import AdaptiveError, RecipeError

SUFFIX = ".yaml"
_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ShippedRecipe:
    name: str
    path: Path
    description: str


def recipes_dir() -> Path | None:
    """The folder of shipped recipes: inside the installed package, else the checkout's ``recipes/``."""
    packaged = _PACKAGE / "recipes"
    if packaged.is_dir():
        return packaged
    checkout = _PACKAGE.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "recipes").is_dir():
        return checkout / "recipes"
    return None


def shipped_recipes() -> list[ShippedRecipe]:
    """Every shipped recipe, sorted by name (top-level ones first, then those in sub-folders)."""
    root = recipes_dir()
    if root is None:
        return []
    paths = [p for p in root.rglob(f"*{SUFFIX}") if p.is_file()]
    paths.sort(key=lambda p: (len(p.relative_to(root).parts), p.relative_to(root).as_posix()))
    return [ShippedRecipe(_name(p, root), p, describe(p)) for p in paths]


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def describe(path: Path) -> str:
    """The first sentence of a recipe's leading ``#`` comment, on one line ("" when it has none)."""
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(part for part in lines if part)
    first = re.match(r"(.+?[.!?])(\s|$)", text)
    return first.group(1) if first else text


def find(name: str) -> ShippedRecipe | None:
    """The shipped recipe called ``name`` (``.yaml`` may be given), or None."""
    wanted = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    return next((r for r in shipped_recipes() if r.name == wanted), None)


def names() -> list[str]:
    return [r.name for r in shipped_recipes()]


def resolve(path: str | Path) -> Path:
    """A recipe argument as a file: an existing path wins, else a shipped recipe's name, else a RecipeError
    (listing the shipped names when the argument looks like a name rather than a file path)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = find(str(path))
    if shipped is not None:
        return shipped.path
    if path.is_absolute() or path.suffix in (SUFFIX, ".yml"):
        raise RecipeError([f"{path}: no such recipe file"], source=str(path))
    known = ", ".join(names()) or "none found"
    raise RecipeError([f"{path}: no such recipe file, nor a shipped recipe name (shipped: {known}; "
                       f"`adaptive recipes` lists them)"], source=str(path))


def copy(name: str, dest: str | Path) -> Path:
    """Copy the shipped recipe ``name`` to ``dest`` (a file, or an existing folder to copy into); never
    overwrites. Returns the written file."""
    shipped = find(name)
    if shipped is None:
        raise AdaptiveError(f"no shipped recipe {name!r} (shipped: {', '.join(names()) or 'none found'})")
    target = Path(dest)
    if target.is_dir():
        target = target / shipped.path.name
    if target.exists():
        raise AdaptiveError(f"{target} already exists; give another destination")
    if not target.parent.is_dir():
        raise AdaptiveError(f"{target.parent}: no such directory")
    shutil.copyfile(shipped.path, target)
    return target

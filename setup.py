"""Build step (everything else is in pyproject.toml): the checkout's top-level ``recipes/`` ships inside the
package as ``adaptive/recipes/``, so ``adaptive recipes`` and ``adaptive train NAME`` work from a built
wheel. An editable install reads ``recipes/`` in place (see ``adaptive/shipped.py``)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "recipes"


class BuildPyWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "adaptive" / "recipes"
        for source in sorted(RECIPES.rglob("*.yaml")):
            copied = target / source.relative_to(RECIPES)
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copied)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        target = Path(self.build_lib) / "adaptive" / "recipes"
        shipped = [str(target / p.relative_to(RECIPES)) for p in sorted(RECIPES.rglob("*.yaml"))]
        return super().get_outputs(include_bytecode) + ([] if self.editable_mode else shipped)


setup(cmdclass={"build_py": BuildPyWithRecipes})

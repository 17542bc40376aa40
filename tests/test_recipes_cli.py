"""Shipped recipes: ``adaptive recipes`` lists them, ``recipes cp`` copies one out, ``train``/``validate`` take a
shipped name as well as a path, and all of it works from a built wheel installed elsewhere (not only from the
checkout). Also ``adaptive --version``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from adaptive import RecipeError, shipped
from test_cli import run_main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TINY_TRAIN = ["train.steps=2", "model.preset=micro", "data.seq_len=32", "train.batch_size=4", "train.tensorboard=false"]


def checkout_recipe_names() -> list[str]:
    return sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*.yaml"))


def leading_comment(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def test_recipes_lists_every_yaml_file_with_its_leading_comment(capsys):
    code, out, _ = run_main(capsys, "recipes", "--json")
    assert code == 0
    listed = json.loads(out)
    assert sorted(r["name"] for r in listed) == checkout_recipe_names()
    assert any(r["name"].startswith("paper/") for r in listed)
    for r in listed:
        comment = leading_comment(RECIPES / f"{r['name']}.yaml")
        assert r["description"] and comment.startswith(r["description"]), r


def test_recipes_table_is_one_line_per_recipe(capsys):
    code, out, _ = run_main(capsys, "recipes")
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == [r.name for r in shipped.shipped_recipes()]
    assert sorted(line.split()[0] for line in lines) == checkout_recipe_names()


def test_description_is_the_first_sentence_of_the_leading_comment(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# Vanilla baseline: every layer\n# its own (v1.2). More detail here.\nname: r\n# not this\n")
    assert shipped.describe(path) == "Vanilla baseline: every layer its own (v1.2)."
    path.write_text("name: r\n")
    assert shipped.describe(path) == ""


def test_recipes_cp_copies_to_a_file_or_into_a_directory_and_never_overwrites(capsys, tmp_path):
    assert run_main(capsys, "recipes", "cp", "mor_expert", str(tmp_path / "mine.yaml"))[0] == 0
    assert (tmp_path / "mine.yaml").read_text() == (RECIPES / "mor_expert.yaml").read_text()
    assert run_main(capsys, "recipes", "cp", "paper/vanilla_135m", str(tmp_path))[0] == 0
    assert (tmp_path / "vanilla_135m.yaml").read_text() == (RECIPES / "paper" / "vanilla_135m.yaml").read_text()
    (tmp_path / "mine.yaml").write_text("edited")
    code, _, err = run_main(capsys, "recipes", "cp", "mor_expert", str(tmp_path / "mine.yaml"))
    assert code == 2 and "already exists" in err and (tmp_path / "mine.yaml").read_text() == "edited"


def test_recipes_cp_of_an_unknown_name_lists_the_shipped_ones(capsys, tmp_path):
    code, _, err = run_main(capsys, "recipes", "cp", "mor_expart", str(tmp_path / "x.yaml"))
    assert code == 2 and "mor_expart" in err and "mor_expert" in err and "Traceback" not in err
    assert not (tmp_path / "x.yaml").exists()


def test_validate_and_train_take_a_shipped_name_from_any_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(capsys, "validate", "mor_token")
    assert code == 0 and "mor_token is valid" in out
    assert run_main(capsys, "validate", "mor_token.yaml")[0] == 0
    code, _, err = run_main(capsys, "train", "vanilla", *TINY_TRAIN, "train.out_dir=run")
    assert code == 0, err
    assert "name: vanilla" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("vanilla").write_text("name: local\n")
    assert shipped.resolve("vanilla") == Path("vanilla")
    assert shipped.resolve("recursive") == shipped.find("recursive").path


def test_an_unknown_recipe_is_one_clean_error_listing_the_shipped_names(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match="no such recipe file") as info:
        shipped.resolve("mor_expart")
    assert all(name in str(info.value) for name in checkout_recipe_names())
    code, _, err = run_main(capsys, "train", "mor_expart")
    assert code == 2 and "mor_expert" in err and "Traceback" not in err
    assert not Path("runs").exists()
    with pytest.raises(RecipeError, match="no such recipe file$"):  # a file path: no list of names
        shipped.resolve("nope.yaml")


def test_version_prints_the_package_metadata_version(capsys):
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"adaptive {version('adaptive-lm')}"


# ------------------------------------------------------------------------- a built wheel, installed elsewhere


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The package built as a wheel (no build isolation) from a copy of the checkout, then pip-installed
    without deps into a folder of its own: not editable, so nothing is read from the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("adaptive", "plugins", "recipes"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
                   check=True, timeout=300, capture_output=True)
    wheels = list((work / "dist").glob("adaptive_lm-*.whl"))
    assert len(wheels) == 1, wheels
    site = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheels[0])], check=True, timeout=300,
                   capture_output=True)
    return site


def run_installed(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    env.update(PYTHONPATH=str(site), COLUMNS="200")
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_an_installed_wheel_lists_copies_and_trains_a_shipped_recipe_by_name(wheel_site, tmp_path):
    where = run_installed(wheel_site, tmp_path, "-c", "import adaptive, adaptive.shipped as s; "
                          "print(adaptive.__file__); print(s.recipes_dir())")
    package, recipes = where.stdout.split()
    assert Path(package).is_relative_to(wheel_site) and Path(recipes) == wheel_site / "adaptive" / "recipes"

    listed = run_installed(wheel_site, tmp_path, "-m", "adaptive", "recipes", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(r["name"] for r in json.loads(listed.stdout)) == checkout_recipe_names()

    copied = run_installed(wheel_site, tmp_path, "-m", "adaptive", "recipes", "cp", "mor_expert", "mine.yaml")
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "mine.yaml").read_text() == (RECIPES / "mor_expert.yaml").read_text()

    trained = run_installed(wheel_site, tmp_path, "-m", "adaptive", "train", "mor_expert", *TINY_TRAIN,
                            "train.out_dir=run")
    assert trained.returncode == 0, trained.stderr
    assert "name: mor_expert" in (tmp_path / "run" / "recipe.yaml").read_text()
    assert (tmp_path / "run" / "checkpoints").is_dir()

    shown = run_installed(wheel_site, tmp_path, "-m", "adaptive", "--version")
    assert shown.stdout.strip() == f"adaptive {version('adaptive-lm')}"

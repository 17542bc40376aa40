"""The command line, in-process through ``adaptive.cli.main`` and, where a real process matters (installed
plugins, exit codes, no traceback), through subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from adaptive import RecipeError, hookimpl
from adaptive.cli import main
from adaptive.errors import PluginWarning
from adaptive.plugins import register_plugin
from test_plugins import BROKEN_IMPORT, DUPLICATE_ALL, MISSPELLED_HOOK

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "adaptive-example-router"
BAD_RECIPE = ROOT / "tests" / "data" / "bad_many_problems.yaml"
MICRO = "model: {preset: micro, num_layers: 4, num_recursions: 2, sharing: {name: cycle}, router: {name: all}}\n"


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*argv: str, pythonpath: Path | str | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    environ.update(env, COLUMNS="200")
    if pythonpath is not None:
        environ["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-m", "adaptive", *argv], capture_output=True, text=True, env=environ,
                          cwd=ROOT, timeout=120)


@pytest.fixture
def micro(tmp_path) -> Path:
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO)
    return path


# ------------------------------------------------------------------------------------------ in-process


def test_plugins_json_lists_name_version_hooks_and_error(capsys):
    code, out, _ = run_main(capsys, "plugins", "--json")
    base = {p["name"]: p for p in json.loads(out)}["adaptive_base"]
    assert code == 0 and base["version"] and base["error"] is None and "register_routers" in base["hooks"]


def test_components_json_for_one_kind(capsys):
    code, out, _ = run_main(capsys, "components", "sharing_scheme", "--json")
    rows = json.loads(out)
    assert code == 0 and {r["kind"] for r in rows} == {"sharing_scheme"}
    cycle = {r["name"]: r for r in rows}["cycle"]
    assert cycle["plugin"] == "adaptive_base" and "on_indivisible" in cycle["config"]


def test_components_table_names_the_providing_plugin(capsys):
    code, out, _ = run_main(capsys, "components", "router")
    assert code == 0 and "all" in out and "adaptive_base" in out


def test_unknown_component_kind_is_a_clean_error(capsys):
    code, out, err = run_main(capsys, "components", "routers")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: unknown component kind 'routers'; did you mean 'router'? (valid: sharing_scheme, router")


def test_validate_prints_a_summary(capsys, micro):
    code, out, _ = run_main(capsys, "validate", str(micro), "model.num_recursions=4", "model.num_layers=8")
    assert code == 0 and "is valid" in out and "4 steps" in out


def test_validate_bad_recipe_prints_one_line_per_problem_and_exits_2(capsys):
    code, out, err = run_main(capsys, "validate", str(BAD_RECIPE))
    lines = err.splitlines()
    assert code == 2 and out == "" and lines[0].startswith("error: 6 problem(s) in ")
    assert len(lines) == 7 and "  train.lr: must be greater than 0 (got -0.001)" in lines


def test_debug_shows_the_exception_instead(capsys):
    with pytest.raises(RecipeError):
        main(["--debug", "validate", str(BAD_RECIPE)])


def test_usage_errors_exit_2(capsys):
    assert run_main(capsys, "no-such-command")[0] == 2
    assert run_main(capsys, "validate")[0] == 2


def test_register_commands_adds_a_subcommand(capsys):
    class Greeter:
        @hookimpl
        def register_commands(self, cli):
            @cli.command("greet")
            def greet(who: str = typer.Argument("world")) -> None:
                """Say hello."""
                print(f"hello {who}")

    register_plugin(Greeter(), "greeter")
    assert run_main(capsys, "greet", "plugin")[:2] == (0, "hello plugin\n")
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "greet" in out


def test_register_commands_cannot_shadow_a_builtin_command(capsys, micro):
    class Shadow:
        @hookimpl
        def register_commands(self, cli):
            cli.command("validate")(lambda: print("shadowed"))

    register_plugin(Shadow(), "shadow")
    with pytest.warns(PluginWarning, match="shadow.*already taken: validate"):
        code, out, _ = run_main(capsys, "validate", str(micro))
    assert code == 0 and "is valid" in out


# ----------------------------------------------------------------------------------------- subprocesses


@pytest.fixture(scope="session")
def example_installed(tmp_path_factory) -> Path:
    """The example plugin, pip-installed (no deps, no build isolation) into a folder of its own."""
    work = tmp_path_factory.mktemp("example")
    source = shutil.copytree(EXAMPLE, work / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(source)], check=True, timeout=300)
    return target


@pytest.fixture
def broken_site(fake_dist) -> Path:
    fake_dist("broken_plugin", BROKEN_IMPORT)
    fake_dist("typo_plugin", MISSPELLED_HOOK)
    return fake_dist("dup_plugin", DUPLICATE_ALL)


@pytest.mark.xdist_group("example_plugin")
def test_installed_plugin_is_listed_and_broken_ones_warn_without_stopping_the_cli(example_installed, broken_site):
    result = run_cli("plugins", "--json", pythonpath=f"{example_installed}{os.pathsep}{broken_site}")
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert result.returncode == 0
    assert plugins["adaptive_example_router"] == {
        "name": "adaptive_example_router", "version": "0.1.0", "distribution": "adaptive-example-router",
        "hooks": ["register_routers"], "error": None}
    assert plugins["broken_plugin"]["error"].startswith("import failed: RuntimeError")
    assert plugins["typo_plugin"]["error"].startswith("unknown hook 'register_routerz'")
    assert plugins["dup_plugin"]["error"].startswith("register_routers failed: router 'all' is registered twice")
    assert plugins["adaptive_base"]["error"] is None
    assert result.stderr.count("warning: plugin ") == 3 and "Traceback" not in result.stderr


@pytest.mark.xdist_group("example_plugin")
def test_recipe_can_name_the_installed_example_router(example_installed, micro):
    result = run_cli("validate", str(micro), "model.router.name=linear_threshold", "model.router.alpha=0.1",
                     pythonpath=example_installed)
    assert result.returncode == 0, result.stderr
    assert "linear_threshold (adaptive_example_router) alpha=0.1" in result.stdout


def test_strict_mode_makes_a_broken_plugin_a_clean_error_exit_2(broken_site):
    result = run_cli("plugins", "--json", pythonpath=broken_site, ADAPTIVE_STRICT_PLUGINS="1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: plugin ") and "Traceback" not in result.stderr

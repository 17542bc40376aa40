"""The ``adaptive`` command line: a thin typer layer over the modules that do the work.

User errors (bad recipe, missing file, unknown name) print a clean message and exit 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from adaptive.errors import AdaptiveError, PluginWarning

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Adaptive-computation language models from parts.")
console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}

RecipeArg = typer.Argument(..., help="recipe YAML file", show_default=False)
OverridesArg = typer.Argument(None, help="key=value overrides (~key deletes)", show_default=False)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks for user errors")) -> None:
    STATE["debug"] = debug


def host():
    from adaptive.plugins import get_host

    return get_host()


@app.command("plugins")
def plugins_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List loaded plugins: name, version, hooks, and the load error of any that failed."""
    infos = [info.as_dict() for info in host().plugins.values()]
    if as_json:
        print(json.dumps(infos, indent=2))
        return
    table = Table("plugin", "version", "hooks", "error")
    for info in infos:
        table.add_row(info["name"], info["version"] or "", ", ".join(info["hooks"]), info["error"] or "")
    console.print(table)


@app.command("components")
def components_cmd(
    kind: Optional[str] = typer.Argument(None, help="only this kind (router, kv_policy, ...)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """List registered components by kind, with the plugin that provides each."""
    from adaptive.interfaces import KINDS

    if kind is not None and kind not in KINDS:
        raise AdaptiveError(f"unknown component kind {kind!r} (valid: {', '.join(KINDS)})")
    entries = host().registry.entries(kind)
    if as_json:
        rows = [{"kind": e.kind, "name": e.name, "plugin": e.plugin, "summary": e.summary,
                 "config": e.cls.Config.model_json_schema().get("properties", {})} for e in entries]
        print(json.dumps(rows, indent=2))
        return
    table = Table("kind", "name", "plugin", "summary")
    for e in entries:
        table.add_row(e.kind, e.name, e.plugin, e.summary)
    console.print(table)


@app.command("validate")
def validate_cmd(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Validate a recipe (with overrides) and print a one-screen summary."""
    from adaptive import recipe as recipes
    from adaptive.summary import recipe_summary

    loaded = recipes.load(recipe, overrides or [], host().registry)
    console.print(recipe_summary(loaded, host().registry))
    console.print(f"[green]ok[/green]: {recipe} is valid")


@app.command("train")
def train_cmd(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="continue the run in train.out_dir from its last checkpoint"),
) -> None:
    """Train a model from a recipe."""
    from adaptive import recipe as recipes
    from adaptive.train.loop import train

    loaded = recipes.load(recipe, overrides or [], host().registry)
    train(loaded, host().registry, resume=resume, recipe_path=str(recipe))


def _register_plugin_commands() -> None:
    """Let plugins add sub-commands; a plugin whose hook fails is reported, the CLI goes on."""
    h = host()
    for impl in h.pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=app)
        except Exception as exc:  # a broken plugin must not take the CLI down
            h.plugins[impl.plugin_name].error = f"register_commands failed: {exc}"
            warnings.warn(f"plugin {impl.plugin_name!r}: register_commands failed: {exc}", PluginWarning)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    warnings.formatwarning = _format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        _register_plugin_commands()
        app(args=argv, standalone_mode=False)
    except AdaptiveError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and aborts
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise

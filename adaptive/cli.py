"""The ``adaptive`` command line: a thin typer layer over the modules that do the work.

User errors (bad recipe, missing file, unknown name) print a clean message and exit 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import difflib
import json
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from adaptive.errors import AdaptiveError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Adaptive-computation language models from parts.")
console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}

RecipeArg = typer.Argument(..., help="recipe YAML file, or a shipped recipe's name (see `adaptive recipes`)",
                           show_default=False)
OverridesArg = typer.Argument(None, help="key=value overrides (~key deletes)", show_default=False)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from adaptive import __version__
        from adaptive.plugins import BUILTIN_DISTRIBUTION

        try:
            print(f"adaptive {version(BUILTIN_DISTRIBUTION)}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            print(f"adaptive {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="show tracebacks for user errors"),
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="print the package version and exit"),
) -> None:
    STATE["debug"] = debug


recipes_app = typer.Typer(help="List the recipes shipped with the package, one line each; `recipes cp NAME DEST` "
                                "copies one out. `train`, `validate`, `flops` and `bench` take a shipped name.")
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List the shipped recipes, one line each; `adaptive train NAME` trains one, `recipes cp` copies one out."""
    if ctx.invoked_subcommand is not None:
        return
    from adaptive.shipped import shipped_recipes

    found = shipped_recipes()
    if as_json:
        print(json.dumps([{"name": r.name, "path": str(r.path), "description": r.description} for r in found],
                         indent=2))
        return
    width = max((len(r.name) for r in found), default=0)
    for r in found:  # one line per recipe (the terminal may fold a long one)
        console.print(Text(r.name.ljust(width), style="bold") + Text(f"  {r.description}"), soft_wrap=True,
                      highlight=False)


@recipes_app.command("cp")
def recipes_cp_cmd(
    name: str = typer.Argument(..., help="a shipped recipe's name (see `adaptive recipes`)", show_default=False),
    dest: Path = typer.Argument(..., help="file to write, or an existing directory to copy into", show_default=False),
) -> None:
    """Copy a shipped recipe out, to edit it (never overwrites a file)."""
    from adaptive.shipped import copy

    written = copy(name, dest)
    console.print(Text("ok", style="green") + Text(f": wrote {written}"), soft_wrap=True, highlight=False)


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
    """List registered components by kind, with the plugin (and its version) that provides each."""
    from adaptive.interfaces import KINDS

    if kind is not None and kind not in KINDS:
        close = difflib.get_close_matches(kind, list(KINDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise AdaptiveError(f"unknown component kind {kind!r}{hint} (valid: {', '.join(KINDS)})")
    entries = host().registry.entries(kind)
    plugins = host().plugins
    version = lambda e: plugins[e.plugin].version if e.plugin in plugins else None  # noqa: E731
    if as_json:
        rows = [{"kind": e.kind, "name": e.name, "plugin": e.plugin, "version": version(e), "summary": e.summary,
                 "config": e.cls.Config.model_json_schema().get("properties", {})} for e in entries]
        print(json.dumps(rows, indent=2))
        return
    table = Table("kind", "name", "plugin", "version", "summary")
    for e in entries:
        table.add_row(e.kind, e.name, e.plugin, version(e) or "", e.summary)
    console.print(table)


@app.command("validate")
def validate_cmd(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Validate a recipe (with overrides) and print a one-screen summary; refuses what `train` would."""
    from adaptive import recipe as recipes
    from adaptive.summary import recipe_summary
    from adaptive.train.preflight import preflight

    loaded = recipes.load(recipe, overrides or [], host().registry)
    preflight(loaded, host().registry, source=str(recipe))
    console.print(recipe_summary(loaded, host().registry))
    console.print(Text("ok", style="green") + Text(f": {recipe} is valid"), soft_wrap=True)


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
    result = train(loaded, host().registry, resume=resume, recipe_path=str(recipe))
    if result.stopped_by is not None:  # saved, yet not finished: a scheduler must tell the two apart
        raise SystemExit(128 + getattr(signal.Signals, result.stopped_by, signal.SIGINT).value)


from adaptive import cli_serving  # noqa: E402,F401  (registers generate, bench and serve here, in this order)


@app.command("flops")
def flops_cmd(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="sequence length (default: the recipe's data.seq_len)"),
    kv_bytes: int = typer.Option(2, "--kv-bytes", min=1, help="bytes per cached key/value element (2: bf16, 4: float32)"),
) -> None:
    """Count unique parameters, FLOPs per token (forward, training) and KV-cache bytes per token."""
    from adaptive import recipe as recipes
    from adaptive.flops import count_flops

    loaded = recipes.load(recipe, overrides or [], host().registry)
    try:
        report = count_flops(loaded.model, host().registry, seq_len or loaded.data.seq_len, _vocab_size(loaded),
                             kv_bytes_per_element=kv_bytes)
    except ValueError as exc:
        raise AdaptiveError(f"{recipe}: {exc}") from None
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    table = Table("segment", "layers", "active", "writes kv", "keys", "FLOPs/token", "kv bytes/token")
    for part in report.breakdown:
        table.add_row(part.name, str(part.layers), f"{part.active_fraction:.3f}", f"{part.write_fraction:.3f}",
                      f"{part.keys:.0f}", f"{part.flops_per_token:.4g}", f"{part.kv_bytes_per_token:.0f}")
    console.print(table)
    console.print(f"unique parameters      {report.params_unique:,} (total)\n"
                  f"active parameters      {report.params_active_per_token:,} per token\n"
                  f"forward FLOPs/token    {report.flops_per_token_forward:.4g}\n"
                  f"training FLOPs/token   {report.flops_per_token_train:.4g}\n"
                  f"KV-cache bytes/token   {report.kv_bytes_per_token:,.0f} ({kv_bytes} bytes per element)\n"
                  f"sequence length        {report.seq_len}", highlight=False)


@app.command("eval")
def eval_cmd(
    runs: list[Path] = typer.Argument(..., help="run or checkpoint directories (several: a comparison table)",
                                      show_default=False),
    as_json: bool = typer.Option(False, "--json", help="print JSON (an object per run; a list for several)"),
    data: Optional[Path] = typer.Option(None, "--data",
                                        help="a .txt/.jsonl/.parquet file instead of the held-out split"),
    rows: Optional[int] = typer.Option(None, "--rows", min=1, help="evaluate the first N rows only (default: all)"),
    tasks: str = typer.Option("lambada,description", "--tasks", help="comma-separated zero-shot tasks, or none"),
    items: Optional[int] = typer.Option(None, "--items", min=1, help="items per task (default: all)"),
    seed: int = typer.Option(0, "--seed", help="seed of the task construction"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="rows per batch (default: train.batch_size)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
) -> None:
    """Validation loss and perplexity, offline zero-shot tasks and routing statistics, in inference mode."""
    from adaptive.eval.report import EvalOptions, describe_routing, evaluate_run, progress_bar, table_rows

    names = [] if tasks.strip() == "none" else [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        options = EvalOptions(data_file=None if data is None else str(data), max_rows=rows, tasks=names,
                              task_items=items, seed=seed, batch_size=batch_size, device=_device(device))
    except ValueError as exc:
        raise AdaptiveError(f"--tasks: {exc}") from None
    with progress_bar() as stage:
        results = [evaluate_run(run, host().registry, options, stage) for run in runs]
    if as_json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return
    headers, cells = table_rows(results)
    table = Table(*headers)
    for row in cells:
        table.add_row(*row)
    console.print(table)
    for result in results:
        console.print(f"{result['recipe']}: {result['data']}\n  {describe_routing(result['routing'])}",
                      highlight=False, soft_wrap=True)


@app.command("inspect")
def inspect_cmd(
    run: Path = typer.Argument(..., help="run directory (or checkpoint directory with --text)", show_default=False),
    text: Optional[str] = typer.Option(None, "--text", help="text whose per-token recursion depth to show"),
    out: Path = typer.Option(..., "--out", help="--text: an .html or .png file; --training-curves: a directory"),
    curves: bool = typer.Option(False, "--training-curves",
                                help="plot loss, validation loss and depth from metrics.jsonl"),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N"),
) -> None:
    """Routing analysis: per-token depth of a text (HTML or PNG), or the training curves of a run."""
    if curves == (text is not None):
        raise AdaptiveError("inspect: give either --text TEXT (with --out FILE.html|.png) or --training-curves "
                            "(with --out DIR)")
    if curves:
        from adaptive.eval.curves import training_curves

        written = training_curves(run, out)
    else:
        from adaptive.eval.depthmap import token_depths, write
        from adaptive.serving.loading import load_run

        loaded = load_run(run, host().registry, device=_device(device))
        written = [write(token_depths(loaded, text, run.name), out)]
    for path in written:
        console.print(Text("wrote ", style="green") + Text(str(path)), highlight=False, soft_wrap=True)


def _device(device: str) -> str:
    """``--device`` checked and resolved (``auto``: CUDA when there is one), or a clean error."""
    from adaptive.serving.generate import resolve_device

    try:
        return str(resolve_device(device))
    except ValueError as exc:
        raise AdaptiveError(str(exc)) from None


def _vocab_size(loaded) -> int:
    """The vocabulary the trainer builds the model with (the rule is in ``adaptive.vocab``)."""
    from adaptive.vocab import resolved_vocab_size

    try:
        return resolved_vocab_size(loaded)
    except ValueError as exc:
        raise AdaptiveError(str(exc)) from None


convert_app = typer.Typer(no_args_is_help=True, help="Import checkpoints from other formats.")
app.add_typer(convert_app, name="convert")


@convert_app.command("hf-llama")
def convert_hf_llama_cmd(
    src: Path = typer.Argument(..., help="Hugging Face Llama directory (config.json + safetensors)", show_default=False),
    out: Path = typer.Argument(..., help="output directory (model.safetensors + recipe.yaml)", show_default=False),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="uptrain: build this recipe's recursive or MoR model "
                                         "(shape from the checkpoint) initialised from the vanilla weights"),
    init: Optional[str] = typer.Option(None, "--init", help="with --recipe: select (stepwise, the default) or average"),
) -> None:
    """Import a local Hugging Face Llama checkpoint as a vanilla model (sharing none), or with --recipe as
    a recursive model initialised from it."""
    from adaptive.convert import convert_hf_llama

    if init is not None and init not in ("select", "average"):
        raise AdaptiveError(f"--init {init!r} is not one of select, average")
    if recipe is None and init is not None:
        raise AdaptiveError("--init needs --recipe (the recursive model to initialise)")
    path = convert_hf_llama(src, out, recipe=recipe, init=init or "select", registry=host().registry)
    console.print(f"[green]ok[/green]: wrote {path / 'model.safetensors'} and {path / 'recipe.yaml'}", highlight=False)


export_app = typer.Typer(no_args_is_help=True, help="Export models to other formats.")
app.add_typer(export_app, name="export")


@export_app.command("hf-llama")
def export_hf_llama_cmd(
    run: Path = typer.Argument(..., help="run directory, checkpoint directory or converted model", show_default=False),
    out: Path = typer.Argument(..., help="output directory (config.json + model.safetensors + tokenizer.json)",
                               show_default=False),
) -> None:
    """Write a vanilla model, or a recursive one with full depth (unrolled), as a Hugging Face Llama directory."""
    from adaptive.export import export_hf_llama

    path = export_hf_llama(run, out, host().registry)
    console.print(f"[green]ok[/green]: wrote {path / 'config.json'} and {path / 'model.safetensors'}", highlight=False)


def _register_plugin_commands() -> None:
    """Let plugins add sub-commands. A plugin whose hook fails, or whose command would shadow an existing
    one, is reported (an error when strict) and the CLI goes on without its commands."""
    h = host()
    for impl in h.pm.hook.register_commands.get_hookimpls():
        before = list(app.registered_commands), list(app.registered_groups)
        taken = _command_names(app)
        try:
            impl.function(cli=app)
            clash = _command_names(app, skip=before) & taken
            if clash:
                raise AdaptiveError(f"command name(s) already taken: {', '.join(sorted(clash))}")
        except Exception as exc:  # a broken plugin must not take the CLI down
            app.registered_commands[:], app.registered_groups[:] = before
            h.fail(impl.plugin_name, f"register_commands failed: {' '.join(str(exc).split())}", exc)


def _command_names(cli: typer.Typer, skip: tuple[list, list] = ([], [])) -> set[str]:
    """The sub-command names of ``cli``, leaving out the command and group infos listed in ``skip``."""
    from typer.main import get_command_name

    commands = [c for c in cli.registered_commands if not any(c is s for s in skip[0])]
    groups = [g for g in cli.registered_groups if not any(g is s for s in skip[1])]
    names = {c.name or get_command_name(c.callback.__name__) for c in commands if c.name or c.callback}
    return names | {g.name or g.typer_instance.info.name for g in groups} - {None}


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    warnings.formatwarning = _format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    builtin = list(app.registered_commands), list(app.registered_groups)
    try:
        _register_plugin_commands()
        code = app(args=argv, standalone_mode=False)  # typer turns Ctrl-C into Exit(130) and returns its code
        if isinstance(code, int) and not isinstance(code, bool) and code:
            if code == 130:
                err_console.print("interrupted")
            sys.exit(code)
    except AdaptiveError as exc:
        if debug:
            raise
        _print_error(exc)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # typer/click usage errors, --help exits and aborts
        _exit_for_click(exc)
        raise
    finally:  # plugin commands are added per call, so in-process calls (tests) never accumulate them
        app.registered_commands[:], app.registered_groups[:] = builtin


def _print_error(exc: AdaptiveError) -> None:
    """``error: <message>`` on stderr, never re-wrapped (one problem per line) nor read as rich markup."""
    err_console.print(Text("error: ", style="red") + Text(str(exc)), soft_wrap=True, highlight=False)


def _exit_for_click(exc: Exception) -> None:
    """Exit like click's standalone mode would for its own exceptions (typer may vendor click)."""
    if isinstance(exc, (typer.Exit, *_click_types("Exit"))):
        sys.exit(exc.exit_code)
    if isinstance(exc, (typer.Abort, *_click_types("Abort"))):
        sys.exit(130)
    if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
        exc.show()
        sys.exit(exc.exit_code)


def _click_types(name: str) -> tuple[type, ...]:
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)

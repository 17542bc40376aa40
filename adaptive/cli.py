"""The ``adaptive`` command line: a thin typer layer over the modules that do the work.

User errors (bad recipe, missing file, unknown name) print a clean message and exit 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import difflib
import json
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
        close = difflib.get_close_matches(kind, list(KINDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise AdaptiveError(f"unknown component kind {kind!r}{hint} (valid: {', '.join(KINDS)})")
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
    train(loaded, host().registry, resume=resume, recipe_path=str(recipe))


@app.command("generate")
def generate_cmd(
    run: Path = typer.Argument(..., help="run directory or checkpoint directory", show_default=False),
    prompt: list[str] = typer.Option(..., "--prompt", help="prompt text (repeat for a batch)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    greedy: bool = typer.Option(False, "--greedy", help="argmax decoding instead of sampling"),
    temperature: float = typer.Option(0.8, "--temperature"),
    top_k: int = typer.Option(50, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    show_depth: bool = typer.Option(False, "--show-depth", help="print the recursion depth of each generated token"),
) -> None:
    """Continue prompts with a trained model, decoding with its KV cache."""
    from adaptive.serving.generate import SamplingConfig, generate
    from adaptive.serving.loading import load_run

    loaded = load_run(run, host().registry)
    tok = loaded.tokenizer
    prompts = [[tok.separator_id, *tok.tok.encode(text, add_special_tokens=False).ids] for text in prompt]
    cfg = SamplingConfig(max_new_tokens, greedy, temperature, top_k, eos_id=tok.separator_id, seed=seed)
    result = generate(loaded.model, prompts, cfg, pad_id=tok.separator_id)
    for i, (text, ids) in enumerate(zip(prompt, result.tokens)):
        body = [t for t in ids if t != tok.separator_id]
        console.print(Text(text, style="bold") + Text(tok.decode(body)))
        if show_depth and result.depths:
            console.print(f"depths: {result.depths[i][:len(body)]}", highlight=False)


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
    console.print(f"unique parameters      {report.params_unique:,}\n"
                  f"forward FLOPs/token    {report.flops_per_token_forward:.4g}\n"
                  f"training FLOPs/token   {report.flops_per_token_train:.4g}\n"
                  f"KV-cache bytes/token   {report.kv_bytes_per_token:,.0f} ({kv_bytes} bytes per element)\n"
                  f"sequence length        {report.seq_len}", highlight=False)


def _vocab_size(loaded) -> int:
    """The model's vocabulary: ``model.vocab_size``, else the tokenizer file's, else the BPE size."""
    if loaded.model.vocab_size is not None:
        return loaded.model.vocab_size
    tok = loaded.tokenizer
    if tok.kind == "file" and tok.path:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(tok.path).get_vocab_size()
        except Exception as exc:  # tokenizers raises its own exception type
            raise AdaptiveError(f"tokenizer.path: cannot read {tok.path} ({exc})") from None
    return tok.vocab_size


convert_app = typer.Typer(no_args_is_help=True, help="Import checkpoints from other formats.")
app.add_typer(convert_app, name="convert")


@convert_app.command("hf-llama")
def convert_hf_llama_cmd(
    src: Path = typer.Argument(..., help="Hugging Face Llama directory (config.json + safetensors)", show_default=False),
    out: Path = typer.Argument(..., help="output directory (model.safetensors + recipe.yaml)", show_default=False),
) -> None:
    """Import a local Hugging Face Llama checkpoint as a vanilla model (sharing none)."""
    from adaptive.convert import convert_hf_llama

    path = convert_hf_llama(src, out)
    console.print(f"[green]ok[/green]: wrote {path / 'model.safetensors'} and {path / 'recipe.yaml'}", highlight=False)


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
        app(args=argv, standalone_mode=False)
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

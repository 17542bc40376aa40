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
    run: Path = typer.Argument(..., help="run directory, checkpoint directory or converted model", show_default=False),
    prompt: list[str] = typer.Option(..., "--prompt", help="prompt text (repeat for several requests)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="most tokens to generate per prompt"),
    greedy: bool = typer.Option(False, "--greedy", help="argmax decoding (the same as --temperature 0)"),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="sampling temperature; 0 = greedy"),
    top_k: int = typer.Option(50, "--top-k", min=0, help="sample among the k most likely tokens; 0 = all"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass in (0, 1]; 1 = all"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="seed of the samples (each prompt gets seed + i)"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop string (repeatable); the text ends before it"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16, float16"),
    batch: int = typer.Option(32, "--batch", min=1, help="most requests decoded at once"),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they are generated"),
    show_depth: bool = typer.Option(False, "--show-depth", help="print the recursion depth behind each generated token"),
) -> None:
    """Continue prompts with a trained model on the serving engine (paged KV, depth-wise batching)."""
    import time

    from pydantic import ValidationError

    from adaptive.serving.generate import LLM
    from adaptive.serving.sampling import SamplingParams
    from adaptive.serving.scheduler import EngineConfig

    try:
        llm = LLM.from_run(run, device=device, dtype=dtype, config=EngineConfig(max_batch=batch))
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_k=top_k,
                                 top_p=top_p, stop=tuple(stop or ()),
                                 seed=None if seed is None else seed + i) for i in range(len(prompt))]
    except ValidationError as exc:
        raise AdaptiveError("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                                      for e in exc.errors())) from None
    except ValueError as exc:
        raise AdaptiveError(str(exc)) from None
    start = time.perf_counter()
    if stream:
        completions = _stream_completions(llm, prompt, params)
    else:
        completions = llm.generate(prompt, params)
    elapsed = time.perf_counter() - start
    for text, c in zip(prompt, completions):
        if not stream:
            console.print(Text(text, style="bold") + Text(c.text or ""), soft_wrap=True)
        if show_depth:  # one entry per generated token, in order
            pieces = [llm.tokenizer.decode([t]) for t in c.tokens]
            console.print(f"tokens: {json.dumps(pieces)}\ndepths: {json.dumps(c.depths)}", highlight=False,
                          soft_wrap=True, markup=False)
    generated = sum(len(c.tokens) for c in completions)
    err_console.print(f"{generated} tokens in {elapsed:.2f} s ({generated / max(elapsed, 1e-9):.1f} tokens/s; "
                      f"{llm.engine.batching})", highlight=False, soft_wrap=True)


def _stream_completions(llm, prompts: list[str], params) -> list:
    """Print each request's text as its tokens arrive (one request after another when there are several)."""
    ids = [llm.engine.add_request(llm.encode(p), s) for p, s in zip(prompts, params)]
    shown = {i: False for i in ids}
    for event in llm.engine.run():
        if len(ids) == 1:
            if not shown[event.request_id]:
                console.print(Text(prompts[0], style="bold"), end="")
                shown[event.request_id] = True
            console.print(Text(event.text), end="")
    if len(ids) == 1:
        console.print()
    completions = [llm.engine.completions.pop(i) for i in ids]
    if len(ids) > 1:
        for text, c in zip(prompts, completions):
            console.print(Text(text, style="bold") + Text(c.text or ""), soft_wrap=True)
    return completions


@app.command("bench")
def bench_cmd(
    target: str = typer.Argument(..., help="run directory, checkpoint directory or recipe file", show_default=False),
    num_prompts: int = typer.Option(64, "--num-prompts", min=1, help="requests in the workload"),
    prompt_len: str = typer.Option("64", "--prompt-len", help="prompt tokens: N, or LO:HI drawn uniformly"),
    max_new_tokens: str = typer.Option("192:256", "--max-new-tokens", help="tokens generated per request: N or LO:HI"),
    rate: float = typer.Option(float("inf"), "--rate", help="requests per second (Poisson arrivals); inf = all at once"),
    batch: int = typer.Option(32, "--batch", min=1, help="most requests decoded at once"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="interleaved repetitions of each side"),
    seed: int = typer.Option(0, "--seed", help="seed of the workload and of the vanilla counterpart's weights"),
    block_size: int = typer.Option(16, "--block-size", min=1, help="entries per KV block"),
    stop_at_eos: bool = typer.Option(False, "--stop-at-eos", help="end a request at the end-of-text token (the two "
                                     "sides then generate different lengths)"),
    prompt_source: str = typer.Option("auto", "--prompt-source", help="auto (corpus for a trained run, else random), corpus, random"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="a trained vanilla run to compare with (default: "
                                            "the same-shape vanilla model, randomly initialised)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Benchmark generation: the model and its vanilla counterpart on one workload, side by side."""
    from adaptive.serving.bench import BenchOptions, bench, load_target
    from adaptive.serving.generate import resolve_device, resolve_dtype
    from adaptive.serving.loading import load_run

    if prompt_source not in ("auto", "corpus", "random"):
        raise AdaptiveError(f"--prompt-source {prompt_source!r} is not one of auto, corpus, random")
    opts = BenchOptions(num_prompts, prompt_len, max_new_tokens, rate, batch, block_size, repeats, seed, stop_at_eos,
                        prompt_source)
    try:
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        model, tokenizer, corpus = load_target(target, host().registry, dev, torch_dtype, prompt_source)
        base = None
        if baseline is not None:
            base = load_run(baseline, host().registry, device=str(dev)).model.to(dtype=torch_dtype)
        eos = tokenizer.separator_id if tokenizer is not None else None
        log = (lambda line: err_console.print(line, highlight=False)) if as_json else (lambda line: console.print(line, highlight=False))
        report = bench(model, opts, host().registry, corpus=corpus, eos_id=eos, baseline=base, log=log)
    except ValueError as exc:
        raise AdaptiveError(str(exc)) from None
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_bench(report)


def _print_bench(report: dict) -> None:
    ours, theirs = report["model"], report["baseline"]
    table = Table("", "model", "vanilla", "ratio")
    rows = [("tokens/s (median)", "tokens_per_s", "{:,.1f}"), ("requests/s", "requests_per_s", "{:.2f}"),
            ("TTFT p50 s", "ttft_p50_s", "{:.3f}"), ("TTFT p99 s", "ttft_p99_s", "{:.3f}"),
            ("ITL p50 ms", "itl_p50_s", "{:.2f}"), ("ITL p99 ms", "itl_p99_s", "{:.2f}"),
            ("peak KV bytes in use", "kv_bytes", "{:,}"), ("peak KV bytes reserved", "kv_bytes_reserved", "{:,}"),
            ("mean recursion depth", "mean_depth", "{:.2f}")]
    for label, key, fmt in rows:
        scale = 1e3 if key.startswith("itl") else 1
        a, b = ours[key] * scale, theirs[key] * scale
        ratio = f"{a / b:.2f}x" if b else ""
        table.add_row(label, fmt.format(a), fmt.format(b), ratio)
    console.print(table)
    if ours["block_kv_fraction"] is not None:
        console.print(f"recursion-block KV in use: {ours['block_kv_fraction']:.3f} of full caching's "
                      f"(routed fraction, mean depth / N_r: {ours['routed_fraction']:.3f})", highlight=False,
                      soft_wrap=True)
    lo, hi = report["speedup_spread"]
    console.print(f"speedup over vanilla {report['speedup']:.2f}x (spread {lo:.2f}-{hi:.2f} over "
                  f"{report['workload']['repeats']} interleaved repeats); FLOP-bound speedup at the observed depths "
                  f"{report['flop_bound_speedup']:.2f}x\n{report['batching']}", highlight=False, soft_wrap=True)


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

"""The serving commands of the ``adaptive`` CLI: ``generate``, ``bench`` and ``serve``, all on the serving
engine (``adaptive.serving``). Registered on ``adaptive.cli.app`` when that module is imported."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from adaptive.cli import app, console, err_console, host
from adaptive.errors import AdaptiveError


@app.command("generate")
def generate_cmd(
    run: Path = typer.Argument(..., help="run directory, checkpoint directory or converted model", show_default=False),
    prompt: list[str] = typer.Option(..., "--prompt", help="prompt text (repeat for several requests)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, show_default=False,
                                                 help="most tokens to generate per prompt [default: 64]; capped at "
                                                 "the room the model's context leaves (a warning when given)"),
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
        caps = [_capped_new_tokens(max_new_tokens or 64, len(llm.encode(p)), llm.engine.max_len,
                                   warn=max_new_tokens is not None) for p in prompt]
        params = [SamplingParams(max_tokens=cap, temperature=0.0 if greedy else temperature, top_k=top_k,
                                 top_p=top_p, stop=tuple(stop or ()),
                                 seed=None if seed is None else seed + i) for i, cap in enumerate(caps)]
    except ValidationError as exc:
        raise AdaptiveError("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                                      for e in exc.errors())) from None
    except ValueError as exc:
        raise AdaptiveError(str(exc)) from None
    start = time.perf_counter()
    try:
        completions = _stream_completions(llm, prompt, params) if stream else llm.generate(prompt, params)
    except ValueError as exc:  # a request the engine refuses (e.g. more KV blocks than its pool)
        raise AdaptiveError(str(exc)) from None
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


def _capped_new_tokens(requested: int, prompt_len: int, context: int, warn: bool = True) -> int:
    """``--max-new-tokens`` capped at the room the model's context leaves after the prompt (with a warning)."""
    room = context - prompt_len
    if room < 1:
        raise ValueError(f"--prompt: {prompt_len} tokens (with the document separator) fill the model's context of "
                         f"{context} tokens; shorten the prompt")
    if requested > room and warn:
        warnings.warn(f"--max-new-tokens {requested}: capped at {room}, the room the model's context of {context} "
                      f"tokens leaves after a prompt of {prompt_len} tokens")
    return min(requested, room)


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
    paged_attention: str = typer.Option("auto", "--paged-attention", help="auto (flex on CUDA, else gather), gather "
                                        "(copy each row's blocks, then attend), flex (FlexAttention in place over the pool)"),
    compile_: bool = typer.Option(False, "--compile", help="run the decode calls as graphs compiled by torch.compile "
                                  "(CUDA graphs on CUDA; EngineConfig.compile); graphs are built before the timed runs"),
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
    if paged_attention not in ("auto", "gather", "flex"):
        raise AdaptiveError(f"--paged-attention {paged_attention!r} is not one of auto, gather, flex")
    if compile_ and paged_attention == "flex":
        raise AdaptiveError("--compile reads the pages through the gather path: drop --paged-attention flex "
                            "(or use --paged-attention gather)")
    opts = BenchOptions(num_prompts, prompt_len, max_new_tokens, rate, batch, block_size, repeats, seed, stop_at_eos,
                        prompt_source, paged_attention=paged_attention, compile=compile_)
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
                  f"{report['flop_bound_speedup']:.2f}x\n{report['batching']}"
                  + ("; decode calls as compiled graphs (--compile)" if report["workload"].get("compile") else ""),
                  highlight=False, soft_wrap=True)


@app.command("serve")
def serve_cmd(
    run: Path = typer.Argument(..., help="run directory, checkpoint directory or converted model", show_default=False),
    host_: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback by default; 0.0.0.0 exposes it)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="port to listen on (0: any free port)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16, float16"),
    batch: int = typer.Option(32, "--max-batch", min=1, help="requests decoded at once"),
    max_queued: int = typer.Option(256, "--max-queued", min=0, help="requests waiting beyond the batch; more get 429"),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", min=0.0, help="seconds in-flight requests get after SIGTERM"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="ADAPTIVE_API_KEY",
                                          help="require `Authorization: Bearer KEY` (all endpoints but /health)"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="the name clients pass as `model` "
                                             "(default: the run directory's name)"),
    compile_: bool = typer.Option(False, "--compile", help="run the decode calls as graphs compiled by torch.compile "
                                  "(CUDA graphs on CUDA; EngineConfig.compile); the first requests build them"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level: critical, error, warning, info, debug"),
) -> None:
    """Serve a trained model over an OpenAI-compatible HTTP API (POST /v1/completions, GET /v1/models,
    /health, /metrics) on the serving engine. Needs the `serve` extra. SIGTERM drains, then exits 0."""
    from adaptive.serving.generate import LLM
    from adaptive.serving.scheduler import EngineConfig

    try:
        from adaptive.serving.server import ServerSettings, serve
    except ImportError as exc:
        raise AdaptiveError(str(exc)) from None
    try:
        settings = ServerSettings(host=host_, port=port, model_name=model_name or Path(run).resolve().name,
                                  max_queued=max_queued, drain_timeout=drain_timeout, api_key=api_key)
        llm = LLM.from_run(run, device=device, dtype=dtype, config=EngineConfig(max_batch=batch, compile=compile_))
    except ValueError as exc:
        raise AdaptiveError(str(exc)) from None
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        err_console.print(f"warning: --host {settings.host} exposes the server beyond this machine without --api-key",
                          highlight=False, soft_wrap=True)
    err_console.print(f"serving {settings.model_name} on http://{settings.host}:{settings.port} "
                      f"({llm.engine.batching})", highlight=False, soft_wrap=True)
    serve(llm, settings, log_level=log_level)

"""``adaptive bench``: a generation workload on the serving engine, for a model and its vanilla counterpart
(same width, same unrolled depth) in one process, repetitions interleaved (A B A B ...).

Reported per side: generated tokens/s, requests/s, time to first token and inter-token latency (p50/p99),
peak KV bytes in use and reserved, the routing depths observed; and the ratio to vanilla next to its
ceiling, the FLOP-bound speedup at the observed depths. Timings include every KV update.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adaptive.flops import count_flops
from adaptive.model.config import ModelConfig
from adaptive.model.transformer import AdaptiveLM, build_model
from adaptive.registry import ComponentSpec, Registry
from adaptive.serving.engine import ServingEngine, batching_mode
from adaptive.serving.sampling import SamplingParams
from adaptive.serving.scheduler import EngineConfig


@dataclass
class BenchOptions:
    num_prompts: int = 64
    prompt_len: str = "64"  # N, or LO:HI (uniform)
    max_new_tokens: str = "192:256"  # N, or LO:HI (uniform): ~256 new tokens with early stops
    rate: float = math.inf  # requests per second (Poisson arrivals); inf = all at once
    batch: int = 32
    block_size: int = 16
    repeats: int = 3
    seed: int = 0
    stop_at_eos: bool = False  # False: each request generates its drawn length (the same work for both sides)
    prompt_source: str = "auto"  # auto | corpus | random
    max_tokens_per_iteration: int = 512
    paged_attention: str = "auto"  # EngineConfig.paged_attention: auto | gather | flex
    compile: bool = False  # EngineConfig.compile: decode calls as compiled graphs (CUDA graphs on CUDA)


@dataclass
class Workload:
    prompts: list[list[int]]
    new_tokens: list[int]
    arrivals: list[float]  # seconds after the start


@dataclass
class RunResult:
    wall_s: float
    tokens: int
    requests: int
    ttft_s: list[float]
    itl_s: list[float]
    kv_bytes: int
    kv_bytes_reserved: int
    mean_depth: float
    step_fractions: list[float]
    block_kv_fraction: float | None
    routed_fraction: float
    preemptions: int
    iterations: int


@dataclass
class Side:
    name: str
    model: AdaptiveLM
    runs: list[RunResult] = field(default_factory=list)


def parse_range(text: str, name: str) -> tuple[int, int]:
    """``"64"`` -> (64, 64); ``"32:128"`` -> (32, 128)."""
    try:
        lo, _, hi = text.partition(":")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise ValueError(f"{name}: expected N or LO:HI (integers), got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"{name}: need 1 <= LO <= HI, got {text!r}")
    return bounds


def make_workload(opts: BenchOptions, vocab: int, corpus: np.ndarray | None) -> Workload:
    rng = random.Random(opts.seed)
    p_lo, p_hi = parse_range(opts.prompt_len, "--prompt-len")
    n_lo, n_hi = parse_range(opts.max_new_tokens, "--max-new-tokens")
    prompts, new, arrivals, t = [], [], [], 0.0
    for _ in range(opts.num_prompts):
        n = rng.randint(p_lo, p_hi)
        if corpus is not None and len(corpus) > n:
            start = rng.randrange(len(corpus) - n)
            prompts.append([int(x) for x in corpus[start:start + n]])
        else:
            prompts.append([rng.randrange(vocab) for _ in range(n)])
        new.append(rng.randint(n_lo, n_hi))
        arrivals.append(t)
        if math.isfinite(opts.rate):
            t += rng.expovariate(opts.rate)
    return Workload(prompts, new, arrivals)


def vanilla_counterpart(cfg: ModelConfig, num_logical: int) -> ModelConfig:
    """The same width and unrolled depth, every layer its own weights, every token every layer."""
    keep = cfg.model_dump(exclude={"preset", "sharing", "router", "kv_policy", "depth_scheduler", "num_recursions",
                                   "num_layers", "per_step_norms"})
    return ModelConfig(**keep, num_layers=num_logical, num_recursions=1, sharing=ComponentSpec(name="none"),
                       router=ComponentSpec(name="all"), kv_policy=ComponentSpec(name="full"))


def run_once(model: AdaptiveLM, work: Workload, opts: BenchOptions, eos_id: int | None) -> RunResult:
    max_len = max(len(p) + n for p, n in zip(work.prompts, work.new_tokens))
    config = EngineConfig(max_batch=opts.batch, block_size=opts.block_size, max_len=max_len,
                          max_tokens_per_iteration=opts.max_tokens_per_iteration, paged_attention=opts.paged_attention,
                          compile=opts.compile)
    engine = ServingEngine(model, config, eos_id=eos_id)
    start = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=not opts.stop_at_eos),
                              arrival=start + a) for p, n, a in zip(work.prompts, work.new_tokens, work.arrivals)]
    for _ in engine.run():
        pass
    wall = time.perf_counter() - start
    done = [engine.completions[i] for i in ids]
    stats = engine.stats.as_dict(opts.block_size)
    return RunResult(wall, sum(len(c.tokens) for c in done), len(done), [c.ttft_s for c in done if c.ttft_s is not None],
                     [x for c in done for x in c.inter_token_s], stats["peak_kv_bytes_in_use"],
                     stats["peak_kv_bytes_reserved"], stats["mean_depth"], stats["step_fractions"],
                     stats["block_kv_fraction"], stats["routed_fraction"], stats["preemptions"], stats["iterations"])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(side: Side) -> dict:
    tps = [r.tokens / r.wall_s for r in side.runs]
    last = side.runs[-1]
    return {"tokens_per_s": statistics.median(tps), "tokens_per_s_spread": [min(tps), max(tps)],
            "requests_per_s": statistics.median(r.requests / r.wall_s for r in side.runs),
            "ttft_p50_s": statistics.median(percentile(r.ttft_s, 50) for r in side.runs),
            "ttft_p99_s": statistics.median(percentile(r.ttft_s, 99) for r in side.runs),
            "itl_p50_s": statistics.median(percentile(r.itl_s, 50) for r in side.runs),
            "itl_p99_s": statistics.median(percentile(r.itl_s, 99) for r in side.runs),
            "kv_bytes": max(r.kv_bytes for r in side.runs), "kv_bytes_reserved": max(r.kv_bytes_reserved for r in side.runs),
            "mean_depth": last.mean_depth, "step_fractions": last.step_fractions,
            "block_kv_fraction": last.block_kv_fraction, "routed_fraction": last.routed_fraction,
            "preemptions": sum(r.preemptions for r in side.runs), "iterations": last.iterations,
            "generated_tokens": last.tokens}


def flop_bound(model: AdaptiveLM, baseline: AdaptiveLM, fractions: list[float], work: Workload,
               registry: Registry) -> float:
    """Baseline FLOPs per token over the model's, with the model's steps at the observed fractions."""
    seq = int(np.mean([len(p) + n / 2 for p, n in zip(work.prompts, work.new_tokens)]))
    ours = count_flops(model.config, registry, seq, model.vocab_size, active_fractions=fractions or None)
    theirs = count_flops(baseline.config, registry, seq, baseline.vocab_size)
    return theirs.flops_per_token_forward / ours.flops_per_token_forward


def warm_up_workload(work: Workload, opts: BenchOptions) -> Workload:
    """Two short requests; with ``compile``, a full batch of the workload's longest, so that the graphs of
    every batch-size bucket and every sequence length are built before the timed runs."""
    if not opts.compile:
        return Workload(work.prompts[:2], [4, 4], [0.0, 0.0])
    longest = sorted(range(len(work.prompts)), key=lambda i: -len(work.prompts[i]) - work.new_tokens[i])
    n = min(opts.batch, len(longest))
    return Workload([work.prompts[i] for i in longest[:n]], [work.new_tokens[i] for i in longest[:n]], [0.0] * n)


def bench(model: AdaptiveLM, opts: BenchOptions, registry: Registry, *, corpus: np.ndarray | None = None,
          eos_id: int | None = None, baseline: AdaptiveLM | None = None, log=print) -> dict:
    """Run the workload on ``model`` and its vanilla counterpart, interleaved; return the report."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    if baseline is None:
        torch.manual_seed(opts.seed)
        baseline = build_model(vanilla_counterpart(model.config, model.plan.num_logical), registry, model.vocab_size)
        baseline.to(device=device, dtype=dtype)
    model.eval(), baseline.eval()
    work = make_workload(opts, model.vocab_size, corpus)
    sides = [Side("model", model), Side("vanilla", baseline)]
    warm = warm_up_workload(work, opts)
    for side in sides:  # first calls allocate, (on a GPU) pick kernels and (compile) build graphs: not timed
        run_once(side.model, warm, opts, eos_id)
    for rep in range(opts.repeats):
        for side in sides:
            side.runs.append(run_once(side.model, work, opts, eos_id))
            r = side.runs[-1]
            log(f"repeat {rep + 1}/{opts.repeats} {side.name:8s} {r.tokens / r.wall_s:10.1f} tokens/s  "
                f"({r.tokens} tokens in {r.wall_s:.2f} s)")
    ours, theirs = summarize(sides[0]), summarize(sides[1])
    ratios = [a.tokens / a.wall_s / (b.tokens / b.wall_s) for a, b in zip(sides[0].runs, sides[1].runs)]
    return {"tokens_per_s": ours["tokens_per_s"], "baseline_tokens_per_s": theirs["tokens_per_s"],
            "speedup": statistics.median(ratios), "speedup_spread": [min(ratios), max(ratios)],
            "flop_bound_speedup": flop_bound(model, baseline, ours["step_fractions"], work, registry),
            "kv_bytes": ours["kv_bytes"], "baseline_kv_bytes": theirs["kv_bytes"],
            "ttft_p50_s": ours["ttft_p50_s"], "itl_p50_s": ours["itl_p50_s"], "mean_depth": ours["mean_depth"],
            "model": ours, "baseline": theirs,
            "workload": {"num_prompts": opts.num_prompts, "prompt_len": opts.prompt_len,
                         "max_new_tokens": opts.max_new_tokens, "rate": opts.rate, "batch": opts.batch,
                         "repeats": opts.repeats, "prompt_source": "corpus" if corpus is not None else "random",
                         "compile": opts.compile,
                         "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                         "threads": torch.get_num_threads()},
            "batching": batching_mode(model)}


def load_target(target: str, registry: Registry, device: torch.device, dtype: torch.dtype, prompt_source: str):
    """(model, tokenizer or None, corpus token stream or None) for a run/checkpoint directory or a recipe."""
    from adaptive import recipe as recipes
    from adaptive.serving.loading import load_run
    from adaptive.vocab import resolved_vocab_size

    path = Path(target)
    if path.is_dir():
        run = load_run(path, registry, device=str(device))
        model, tokenizer, recipe = run.model, run.tokenizer, run.recipe
    elif path.is_file() or not path.exists():  # a recipe file, or a shipped recipe's name
        recipe = recipes.load(path, registry=registry)
        torch.manual_seed(recipe.seed)
        model, tokenizer = build_model(recipe.model, registry, resolved_vocab_size(recipe)).to(device), None
    else:
        raise ValueError(f"{target}: neither a run directory, a checkpoint nor a recipe file")
    model.to(dtype=dtype)
    corpus = None
    if prompt_source == "corpus" and tokenizer is None:
        raise ValueError("--prompt-source corpus needs a trained run (with its tokenizer); got a recipe")
    if prompt_source in ("auto", "corpus") and tokenizer is not None:
        corpus = corpus_stream(recipe, tokenizer, registry, required=prompt_source == "corpus")
    return model, tokenizer, corpus


def corpus_stream(recipe, tokenizer, registry: Registry, required: bool) -> np.ndarray | None:
    """The run's validation documents as one token stream (each opened by the separator)."""
    from adaptive.errors import DataError
    from adaptive.train.data import build_source

    try:
        docs = build_source(recipe.data, registry).documents("validation")
    except (DataError, ValueError) as exc:
        if required:
            raise ValueError(f"--prompt-source corpus: {exc}") from None
        return None
    stream, _ = tokenizer.encode_documents(docs[:2000])
    return stream.astype(np.int64)

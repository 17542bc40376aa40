"""Where the serving engine's time goes as the batch grows: milliseconds per engine iteration, iterations per
generated token, and tokens/s, for a model and its vanilla counterpart, interleaved at each batch size.

A vanilla iteration runs every layer once for every running request; a depth-wise MoR iteration runs the
prelude for the tokens entering, one call of the shared block (every item at its own step), and the coda
for the tokens leaving, so each generated token takes about its depth in iterations. Per-call costs that
do not shrink with the batch (op dispatch, the KV gather) therefore weigh on MoR at small batches.

    python benchmarks/serving_batch.py RUN [--batches 1,8,32,128] [--new-tokens 64] [--threads N] [--compile off|on|both]
        [--profile]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from adaptive.plugins import get_registry
from adaptive.serving.bench import (
    BenchOptions,
    load_target,
    make_workload,
    run_once,
    vanilla_counterpart,
    warm_up_workload,
)


def profile_run(run) -> str:
    """The top operators of ``run()`` (``generate_hf.profile_ops``), then the cumulative milliseconds of the
    serving engine's main functions (cProfile, a second run)."""
    import cProfile
    import pstats

    from generate_hf import profile_ops  # this directory's other benchmark script

    ops = profile_ops(run, top=4, counts=True)
    ops.pop("total")
    profiler = cProfile.Profile()
    profiler.runcall(run)
    stats = pstats.Stats(profiler).stats
    wanted = {("engine.py", "generate"), ("engine.py", "run"), ("engine.py", "_finish"), ("scheduler.py", "plan"),
              ("model_runner.py", "_call"), ("model_runner.py", "route"), ("model_runner.py", "_run_tokens"),
              ("compiled.py", "run"), ("model_runner.py", "block_calls")}
    funcs = [f"{Path(file).name}:{fn} {cum * 1e3:.0f} ms" for (file, _, fn), (_, _, _, cum, _) in stats.items()
             if "adaptive/serving" in file and (Path(file).name, fn) in wanted]
    return "; ".join(f"{op} {v}" for op, v in ops.items()) + " | cProfile: " + ", ".join(sorted(funcs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--prompt-len", default="64")
    parser.add_argument("--new-tokens", default="64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--paged-attention", default="auto", choices=["auto", "gather", "flex"])
    parser.add_argument("--profile", action="store_true", help="after the timed runs at each batch size, profile one "
                        "run of each side: its top operators (torch.profiler) and the engine's functions (cProfile)")
    parser.add_argument("--compile", default="off", choices=["off", "on", "both"],
                        help="EngineConfig.compile (decode calls as compiled graphs); both: eager and compiled sides, "
                        "interleaved")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = get_registry()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, tokenizer, corpus = load_target(args.run, registry, device, dtype, "auto")
    torch.manual_seed(0)
    from adaptive.model import build_model

    vanilla = build_model(vanilla_counterpart(model.config, model.plan.num_logical), registry, model.vocab_size)
    vanilla = vanilla.to(device=device, dtype=dtype).eval()
    print(f"{device} {args.dtype}, threads {torch.get_num_threads()}, paged attention {args.paged_attention}, "
          f"compile {args.compile}; prompts {args.prompt_len} tokens, {args.new_tokens} new tokens each")
    print(f"{'batch':>5} {'side':17} {'ms/iter':>8} {'iter/token':>10} {'tokens/s':>9} {'spread':>15} {'vs vanilla':>10}")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    sides = [(f"{name}{' compiled' if c else ''}", m, c) for name, m in (("model", model), ("vanilla", vanilla))
             for c in modes]
    for batch in [int(b) for b in args.batches.split(",")]:
        options = {c: BenchOptions(num_prompts=batch, prompt_len=args.prompt_len, max_new_tokens=args.new_tokens,
                                   batch=batch, paged_attention=args.paged_attention, compile=c) for c in modes}
        work = make_workload(options[modes[0]], model.vocab_size, corpus)
        runs: dict[str, list] = {name: [] for name, _, _ in sides}
        for name, m, c in sides:
            run_once(m, warm_up_workload(work, options[c]), options[c], None)
        for _ in range(args.repeats):  # interleaved: A B C D A B C D ...
            for name, m, c in sides:
                runs[name].append(run_once(m, work, options[c], None))
        rates = {name: [r.tokens / r.wall_s for r in rs] for name, rs in runs.items()}
        medians = {name: statistics.median(v) for name, v in rates.items()}
        base = medians.get("vanilla", medians.get("vanilla compiled"))
        for name, rs in runs.items():
            r = sorted(rs, key=lambda r: r.tokens / r.wall_s)[len(rs) // 2]
            spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
            print(f"{batch:>5} {name:17} {r.wall_s / r.iterations * 1e3:8.2f} {r.iterations * batch / r.tokens:10.2f} "
                  f"{medians[name]:9.1f} {spread:>15} {medians[name] / base:9.2f}x")
        if args.profile:
            for name, m, c in sides:
                print(f"  profile, batch {batch}, {name}: {profile_run(lambda: run_once(m, work, options[c], None))}")


if __name__ == "__main__":
    main()

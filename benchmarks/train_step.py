"""Training-step throughput of several recipes side by side: vanilla, recursive, MoR N_r = 2/3/4.

All variants share the width of the preset and its unrolled depth (logical layers); MoR-N_r with the
middle-cycle scheme needs ``L - 2`` divisible by N_r, so a variant gets the fewest extra layers that make
it so (as the paper does for its 34-layer MoR-4), and the table says how many it ran. The step is the
trainer's: forward under autocast (bf16 on GPU), cross-entropy + auxiliary losses, backward, clipping,
AdamW, ``after_optimizer_step``, on random tokens.

Each variant lives in a worker process of its own (clean peak-memory figures), built once. The timing is
interleaved: in every round each worker in turn runs one untimed step and then ``--steps`` timed steps while
the others wait (ABCDE, BCDEA, ...: the order rotates), so load that comes and goes hits every variant
alike. Reported per variant: the median tokens/s over ``--repeats`` rounds with its spread (min-max), and
the ratio to vanilla taken within each round (median and spread).

    python benchmarks/train_step.py                      # CPU: tiny shapes
    python benchmarks/train_step.py --threads 1          # CPU, one thread per worker (a busy machine)
    python benchmarks/train_step.py --preset smollm-360m --batch 8 --seq 2048   # GPU: the SPEC's shape

Also reported: peak memory (CUDA: max allocated; CPU: peak RSS growth over the worker's footprint before
the model was built), and on GPU the MFU from the FLOP accountant's training FLOPs per token over
``--peak-tflops`` (989 = H100 SXM dense bf16). On GPU a waiting worker empties its allocator cache, so
only the running variant holds activations.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def layers_for(base: int, recursions: int) -> int:
    """The fewest logical layers >= base that middle-cycle sharing can split into ``recursions`` steps."""
    layers = max(base, recursions + 2)
    while (layers - 2) % recursions:
        layers += 1
    return layers


def variants(base_layers: int) -> dict[str, dict]:
    mor = dict(sharing={"name": "middle_cycle"}, router={"name": "expert_choice"}, kv_policy={"name": "recursion_wise"})
    out = {"vanilla": dict(num_layers=base_layers),
           "recursive-3": dict(num_layers=layers_for(base_layers, 3), num_recursions=3, sharing={"name": "middle_cycle"})}
    for n in (2, 3, 4):
        out[f"mor-{n}"] = dict(num_layers=layers_for(base_layers, n), num_recursions=n, **mor)
    return out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------- the worker process


def worker(name: str, args) -> None:
    """Build one variant, then serve the parent: ``run`` times a turn and answers its seconds; ``done``
    answers the peak memory and exits. Every answer is one JSON line on stdout."""
    from adaptive.flops import count_flops
    from adaptive.model import PRESETS, build_model
    from adaptive.plugins import get_registry
    from adaptive.recipe import validate

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = get_registry()
    spec = variants(PRESETS[args.preset]["num_layers"])[name]
    recipe = validate({"name": name, "model": {"preset": args.preset, **spec}}, registry)
    vocab = recipe.model.vocab_size
    torch.manual_seed(0)
    before = rss_mib()
    model = build_model(recipe.model, registry, vocab_size=vocab).to(device)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda" or None)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            out = step_model(tokens[:, :-1], progress=0.5)
            loss = F.cross_entropy(out.logits_BTV.flatten(0, 1).float(), tokens[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_optimizer_step(out.stats)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    report = count_flops(recipe.model, registry, seq_len=args.seq, vocab_size=vocab)
    answer({"name": name, "layers": recipe.model.num_layers, "params_unique": report.params_unique,
            "train_flops_per_token": report.flops_per_token_train, "device": str(device)})
    for command in sys.stdin:
        if command.strip() == "done":
            break
        step()  # untimed: caches and allocator warm again after another worker's turn
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        answer({"seconds": time.perf_counter() - start})
        if device.type == "cuda":
            torch.cuda.empty_cache()  # let the next worker have the memory of this one's activations
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mib() - before
    answer({"peak_mib": peak})


def answer(message: dict) -> None:
    print(json.dumps(message), flush=True)


# ------------------------------------------------------------------------------------- the parent process


class Worker:
    """One variant's process, driven a line at a time."""

    def __init__(self, name: str, args):
        flags = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
                 str(args.steps), "--warmup", str(args.warmup), "--device", args.device] + \
                (["--compile"] if args.compile else []) + (["--threads", str(args.threads)] if args.threads else [])
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, *flags], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the worker exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def finish(self) -> dict:
        result = self.send("done")
        self.proc.wait()
        return result


def interleaved(names: list[str], args) -> list[dict]:
    """Start every worker, then ``args.repeats`` rounds of one turn each (rotating order); one row each."""
    workers = [Worker(name, args) for name in names]
    seconds = {w.name: [] for w in workers}
    try:
        for round_index in range(args.repeats):
            shift = round_index % len(workers)
            for w in workers[shift:] + workers[:shift]:
                seconds[w.name].append(w.send("run")["seconds"])
    finally:
        peaks = {w.name: w.finish()["peak_mib"] for w in workers if w.proc.poll() is None}
    tokens = args.batch * args.seq * args.steps
    rows = []
    for w in workers:
        row = {**w.info, "tok_per_s_runs": [tokens / s for s in seconds[w.name]], "peak_mib": peaks[w.name]}
        row["tok_per_s"] = statistics.median(row["tok_per_s_runs"])
        if row["device"].startswith("cuda"):
            row["mfu"] = row["tok_per_s"] * row["train_flops_per_token"] / (args.peak_tflops * 1e12)
        rows.append(row)
    base = next((r for r in rows if r["name"] == "vanilla"), None)
    for row in rows:
        if base is not None:  # the ratio within each round, where both saw the same load
            ratios = [a / b for a, b in zip(row["tok_per_s_runs"], base["tok_per_s_runs"])]
            row["vs_vanilla"], row["vs_vanilla_spread"] = statistics.median(ratios), [min(ratios), max(ratios)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="model shape (default: tiny on CPU, smollm-360m on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256 on CPU, 2048 on GPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per turn")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (one turn of each variant each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after building the model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 bf16 dense)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one variant's process
    parser.add_argument("--variants", default="vanilla,recursive-3,mor-2,mor-3,mor-4")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.preset = args.preset or ("smollm-360m" if gpu else "tiny")
    args.batch = args.batch or 8
    args.seq = args.seq or (2048 if gpu else 256)
    if args.worker:
        worker(args.worker, args)
        return
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    print_table(interleaved(args.variants.split(","), args), args)


def print_table(rows: list[dict], args) -> None:
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    gpu = any(r["device"].startswith("cuda") for r in rows)
    table = Table(title=f"training step, {args.preset}, batch {args.batch} x {args.seq}, "
                        f"{rows[0]['device'] if rows else '?'}{', compiled' if args.compile else ''}"
                        f"{f', {args.threads} threads' if args.threads else ''}; "
                        f"median (min-max) of {args.repeats} interleaved rounds of {args.steps} steps")
    columns = ["variant", "layers", "unique params", "tokens/s", "vs vanilla", "peak MiB"] + (["MFU"] if gpu else [])
    for col in columns:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        runs = r["tok_per_s_runs"]
        ratio = (f"{r['vs_vanilla']:.2f}x ({r['vs_vanilla_spread'][0]:.2f}-{r['vs_vanilla_spread'][1]:.2f})"
                 if "vs_vanilla" in r else "-")
        cells = [r["name"], str(r["layers"]), f"{r['params_unique'] / 1e6:.2f}M",
                 f"{r['tok_per_s']:,.0f} ({min(runs):,.0f}-{max(runs):,.0f})", ratio, f"{r['peak_mib']:,.0f}"]
        if gpu:
            cells.append(f"{100 * r['mfu']:.1f}%")
        table.add_row(*cells)
    Console().print(table)
    if not gpu:
        Console().print("CPU run: peak MiB is RSS growth over the pre-model footprint; MFU is reported on GPU only.")


if __name__ == "__main__":
    main()

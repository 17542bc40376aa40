"""Training-step throughput of several recipes side by side: vanilla, recursive, MoR N_r = 2/3/4.

All variants share the width of the preset and its unrolled depth (logical layers); MoR-N_r with the
middle-cycle scheme needs ``L - 2`` divisible by N_r, so a variant gets the fewest extra layers that make
it so (as the paper does for its 34-layer MoR-4), and the table says how many it ran. Each variant runs
in its own process (clean peak-memory figures) on random tokens, with the trainer's step: forward under
autocast (bf16 on GPU), cross-entropy + auxiliary losses, backward, clipping, AdamW,
``after_optimizer_step``.

    python benchmarks/train_step.py                      # CPU: tiny shapes
    python benchmarks/train_step.py --preset smollm-360m --batch 8 --seq 2048   # GPU: the SPEC's shape

Reported: tokens/s, the ratio to vanilla, peak memory (CUDA: max allocated; CPU: peak RSS growth over
the process's footprint before the model was built), and on GPU the MFU from the FLOP accountant's
training FLOPs per token over ``--peak-tflops`` (989 = H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import json
import resource
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


def measure(name: str, args) -> dict:
    """Time training steps of one variant in this process; returns one result row."""
    from adaptive.flops import count_flops
    from adaptive.model import PRESETS, build_model
    from adaptive.plugins import get_registry
    from adaptive.recipe import validate

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
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

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tok_s = args.batch * args.seq * args.steps / seconds
    report = count_flops(recipe.model, registry, seq_len=args.seq, vocab_size=vocab)
    row = {"name": name, "layers": recipe.model.num_layers, "params_unique": report.params_unique,
           "tok_per_s": tok_s, "train_flops_per_token": report.flops_per_token_train, "device": str(device)}
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["mfu"] = tok_s * report.flops_per_token_train / (args.peak_tflops * 1e12)
    else:
        row["peak_mib"] = rss_mib() - before
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="model shape (default: tiny on CPU, smollm-360m on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256 on CPU, 2048 on GPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 bf16 dense)")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--variants", default="vanilla,recursive-3,mor-2,mor-3,mor-4")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.preset = args.preset or ("smollm-360m" if gpu else "tiny")
    args.batch = args.batch or 8
    args.seq = args.seq or (2048 if gpu else 256)
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    rows = []
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--only", name] + [a for a in sys.argv[1:] if not a.startswith("--variants")]
        cmd += ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print_table(rows, args)


def print_table(rows: list[dict], args) -> None:
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    base = next((r["tok_per_s"] for r in rows if r["name"] == "vanilla"), None)
    gpu = any(r["device"].startswith("cuda") for r in rows)
    table = Table(title=f"training step, {args.preset}, batch {args.batch} x {args.seq}, "
                        f"{rows[0]['device'] if rows else '?'}{', compiled' if args.compile else ''}")
    for col in ["variant", "layers", "unique params", "tokens/s", "vs vanilla", "peak MiB"] + (["MFU"] if gpu else []):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        cells = [r["name"], str(r["layers"]), f"{r['params_unique'] / 1e6:.2f}M", f"{r['tok_per_s']:,.0f}",
                 f"{r['tok_per_s'] / base:.2f}x" if base else "-", f"{r['peak_mib']:,.0f}"]
        if gpu:
            cells.append(f"{100 * r['mfu']:.1f}%")
        table.add_row(*cells)
    Console().print(table)
    if not gpu:
        Console().print("CPU run: peak MiB is RSS growth over the pre-model footprint; MFU is reported on GPU only.")


if __name__ == "__main__":
    main()

"""Training tokens/s of whole recipes against vanilla.yaml, in one interleaved run.

Default recipes: vanilla, mod, and moe when ``recipes/moe.yaml`` exists (any recipe files or shipped names
may be given). Each recipe's ``model`` section is built as it stands (the shipped ones share the tiny
preset's width); the batch is the recipe's ``train.batch_size`` x ``data.seq_len`` unless ``--batch`` /
``--seq`` say otherwise, and must be the same for every recipe. The step is the trainer's: forward (under
bf16 autocast on GPU) at training progress 0.5, cross-entropy plus the auxiliary losses, backward, gradient
clipping, AdamW, ``after_optimizer_step``; on random tokens of the recipe's vocabulary.

Every model lives in this one process. The timing interleaves: each round runs, for every recipe in turn,
one untimed step and then ``--steps`` timed ones (the order rotates each round: AB.., B..A, ...), so load
that comes and goes hits every recipe alike. Reported per recipe: the median tokens/s over ``--repeats``
rounds with its spread (min-max), the ratio to vanilla taken within each round (median, min-max), and the
FLOP accountant's forward FLOPs per token.

    python benchmarks/train_plugins.py                                  # vanilla, mod (, moe)
    python benchmarks/train_plugins.py recipes/vanilla.yaml recipes/mod_recursive.yaml --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def default_recipes() -> list[str]:
    names = ["vanilla", "mod"] + (["moe"] if (RECIPES / "moe.yaml").exists() else [])
    return [str(RECIPES / f"{name}.yaml") for name in names]


class Variant:
    """One recipe's model, optimiser and random batch, and its timed turns."""

    def __init__(self, path: str, args, registry, device: torch.device):
        from adaptive.flops import count_flops
        from adaptive.model import build_model
        from adaptive.recipe import load_raw, validate

        recipe = validate(load_raw(path), registry, source=path)
        self.name = recipe.name
        self.batch = args.batch or recipe.train.batch_size
        self.seq = args.seq or recipe.data.seq_len
        vocab = recipe.model.vocab_size or recipe.tokenizer.vocab_size
        torch.manual_seed(0)
        self.model = build_model(recipe.model, registry, vocab_size=vocab).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        self.tokens = torch.randint(0, vocab, (self.batch, self.seq + 1), device=device)
        self.device = device
        self.flops = count_flops(recipe.model, registry, seq_len=self.seq, vocab_size=vocab).flops_per_token_forward
        self.seconds: list[float] = []

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(self.tokens[:, :-1], progress=0.5)
            ce = F.cross_entropy(out.logits_BTV.flatten(0, 1).float(), self.tokens[:, 1:].flatten())
        (ce + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step(out.stats)

    def turn(self, steps: int) -> None:
        self.step()  # untimed: caches warm again after another recipe's turn
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)

    def tokens_per_s(self, steps: int) -> list[float]:
        return [self.batch * self.seq * steps / s for s in self.seconds]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(paths: list[str], args) -> list[dict]:
    from adaptive.plugins import get_registry

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    registry = get_registry()
    variants = [Variant(p, args, registry, device) for p in paths]
    shapes = {(v.batch, v.seq) for v in variants}
    if len(shapes) > 1:
        raise SystemExit(f"the recipes train on different batches {sorted(shapes)}; give --batch and --seq")
    for v in variants:
        for _ in range(args.warmup):
            v.step()
    for round_index in range(args.repeats):
        shift = round_index % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.turn(args.steps)
    rows = [{"name": v.name, "device": str(device), "batch": v.batch, "seq": v.seq, "flops_per_token": v.flops,
             "tok_per_s_runs": v.tokens_per_s(args.steps)} for v in variants]
    base = next((r for r in rows if r["name"] == "vanilla"), None)
    for row in rows:
        row["tok_per_s"] = statistics.median(row["tok_per_s_runs"])
        if base is not None:  # the ratio within each round, where both saw the same load
            ratios = [a / b for a, b in zip(row["tok_per_s_runs"], base["tok_per_s_runs"])]
            row["vs_vanilla"], row["vs_vanilla_spread"] = statistics.median(ratios), [min(ratios), max(ratios)]
    return rows


def print_rows(rows: list[dict], args) -> None:
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    r0 = rows[0]
    print(f"training step, batch {r0['batch']} x {r0['seq']}, {r0['device']}; median (min-max) of {args.repeats} "
          f"interleaved rounds of {args.steps} steps")
    print(f"{'recipe':<16}{'fwd GFLOP/token':>16}{'tokens/s':>26}{'vs vanilla':>24}")
    for r in rows:
        runs = r["tok_per_s_runs"]
        speed = f"{r['tok_per_s']:,.0f} ({min(runs):,.0f}-{max(runs):,.0f})"
        ratio = (f"{r['vs_vanilla']:.2f}x ({r['vs_vanilla_spread'][0]:.2f}-{r['vs_vanilla_spread'][1]:.2f})"
                 if "vs_vanilla" in r else "-")
        print(f"{r['name']:<16}{r['flops_per_token'] / 1e9:>16.4f}{speed:>26}{ratio:>24}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", help="recipe files or shipped names (default: vanilla, mod, moe)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the recipes')")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the recipes')")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per turn")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (one turn of each recipe each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after building the models")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print_rows(run(args.recipes or default_recipes(), args), args)


if __name__ == "__main__":
    main()

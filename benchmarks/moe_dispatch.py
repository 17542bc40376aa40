"""MoE dispatch: our sort-by-expert dispatch against a naive Python loop over experts, interleaved.

Times the routed experts of one ``moe`` FFN (forward, or forward + backward with ``--backward``) on the
same tokens and top-k choices, alternating the methods ABAB... so that machine load hits both alike, and
prints the median and spread (min–max) of each, and the ratio loop / ours (> 1: ours is faster).

* CPU: ``batched`` (block-padded bmm; what ``dispatch: auto`` uses off the GPU) against ``loop``.
* ``--cpu-grouped-mm``: ``grouped_mm`` on the CPU too (float32), where torch has a CPU kernel for it.
* On a CUDA GPU where ``grouped_mm_supported`` holds (compute capability >= 9.0, bf16): ``grouped_mm``
  (``torch._grouped_mm``) and ``batched`` against ``loop``, all in bf16. Elsewhere the grouped path is
  skipped, with the reason printed.

    python benchmarks/moe_dispatch.py                         # CPU, tiny shape: 2048 tokens, E=8, top-2
    python benchmarks/moe_dispatch.py --backward
    python benchmarks/moe_dispatch.py --device cuda --tokens 16384 --d-model 960 --d-expert 1280
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adaptive_moe.dispatch import ExpertWeights, expert_outputs, grouped_mm_supported, loop_expert_outputs


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per call (tiny recipe: 16 x 128)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-expert", type=int, default=172, help="expert width (moe.yaml: d_ffn 344 / top_k 2)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (each runs every method once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-grouped-mm", action="store_true",
                    help="also time torch._grouped_mm on the CPU (float32), which `dispatch: auto` does not use there")
    return ap.parse_args()


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(args.seed)
    E, D, F_ = args.experts, args.d_model, args.d_expert
    x_ND = torch.randn(args.tokens, D, generator=g).to(device, dtype)
    weights = ExpertWeights((0.02 * torch.randn(E, 2 * F_, D, generator=g)).to(device, dtype),
                            (0.02 * torch.randn(E, D, F_, generator=g)).to(device, dtype))
    logits_NE = torch.randn(args.tokens, E, generator=g).to(device)
    expert_NK = torch.topk(logits_NE, args.top_k, dim=-1).indices
    if args.backward:
        for t in (x_ND, weights.gate_up_EOD, weights.down_EDF):
            t.requires_grad_(True)
    return x_ND, expert_NK, weights


def runner(method: str, x_ND, expert_NK, weights, backward: bool):
    def run() -> None:
        if method == "loop":
            y = loop_expert_outputs(x_ND, expert_NK, weights)
        else:
            y = expert_outputs(x_ND, expert_NK, weights, method)
        if backward:
            y.float().square().mean().backward()
    return run


def timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x_ND, expert_NK, weights = make_inputs(args, device, dtype)
    methods = ["batched", "loop"]
    if grouped_mm_supported(x_ND, weights) or (args.cpu_grouped_mm and device.type == "cpu"):
        methods.insert(0, "grouped_mm")
    else:
        print("grouped_mm skipped: torch._grouped_mm needs a CUDA GPU of compute capability >= 9.0 and bf16 "
              f"(here: {device.type}, {dtype})")
    ref = loop_expert_outputs(x_ND, expert_NK, weights).float()
    for method in methods[:-1]:
        err = (expert_outputs(x_ND, expert_NK, weights, method).float() - ref).abs().max().item()
        print(f"{method}: max |difference| from the loop {err:.3g}")
    runs = {m: runner(m, x_ND, expert_NK, weights, args.backward) for m in methods}
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):  # interleaved: A B (C) A B (C) ...
        for m, run in runs.items():
            times[m].append(timed(run, device))
    what = "forward+backward" if args.backward else "forward"
    print(f"{what}, {args.tokens} tokens x top-{args.top_k} of {args.experts} experts, d_model {args.d_model}, "
          f"d_expert {args.d_expert}, {device.type} {dtype}, threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved rounds")
    loop_median = statistics.median(times["loop"])
    for m, ts in times.items():
        median = statistics.median(ts)
        print(f"  {m:10s} median {1e3 * median:8.2f} ms  spread {1e3 * min(ts):.2f}-{1e3 * max(ts):.2f} ms  "
              f"loop/{m} = {loop_median / median:.2f}x")


if __name__ == "__main__":
    main()

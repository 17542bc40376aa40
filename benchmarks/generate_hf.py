"""Our serving engine against Hugging Face ``generate`` on the same weights, side by side in one process.

A random ``LlamaForCausalLM`` of the requested shape is saved with ``save_pretrained`` and converted with
``adaptive convert hf-llama``, so both sides run identical weights. The workload is ``--batch`` prompts of
``--prompt-len`` random tokens, each continued greedily by exactly ``--new-tokens`` tokens (no early stop).
Repetitions are interleaved (HF, ours, HF, ours, ...); the median and the spread of tokens/s are printed,
with the share of requests whose greedy tokens agree (float rounding may flip a near-tie).

    python benchmarks/generate_hf.py                      # tiny shape, batch 32, 64 + 128 tokens, CPU
    python benchmarks/generate_hf.py --compile            # and ours with compiled decode graphs
    python benchmarks/generate_hf.py --preset smollm-360m --batch 256 --prompt-len 128 --new-tokens 256 \\
        --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def hf_model(preset: str, seed: int, out: Path):
    import transformers

    from adaptive.model.config import PRESETS

    shape = PRESETS[preset]
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["d_ffn"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"], max_position_embeddings=shape["max_seq_len"],
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.02)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    return model


def time_hf(model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                             pad_token_id=0)
    if prompts.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, out[:, prompts.shape[1]:].tolist()


def time_ours(model, prompts: torch.Tensor, new_tokens: int, block_size: int, compile: bool = False
              ) -> tuple[float, list[list[int]]]:
    from adaptive.serving import EngineConfig, SamplingParams, ServingEngine

    B, P = prompts.shape
    config = EngineConfig(max_batch=B, max_len=P + new_tokens, block_size=block_size, max_tokens_per_iteration=B * P,
                          compile=compile)
    engine = ServingEngine(model, config)
    start = time.perf_counter()
    done = engine.generate(prompts.tolist(), SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    elapsed = time.perf_counter() - start
    return elapsed, [c.tokens for c in done]


def profile_ops(run, top: int = 6, counts: bool = False) -> dict[str, float | str]:
    """Self CPU milliseconds of the ``top`` operators of one run, and the total; with ``counts``, each as
    "MS ms (CALLS calls)". A compiled graph's own kernels are named "compiled graph"."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    ops: dict[str, float | str] = {}
    for e in events[:top]:
        name = "compiled graph" if e.key.startswith("## Call CompiledFxGraph") else e.key
        ms = e.self_cpu_time_total / 1e3
        ops[name if name not in ops else f"{name} ({len(ops)})"] = f"{ms:.0f} ms ({e.count} calls)" if counts else ms
    ops["total"] = sum(e.self_cpu_time_total for e in events) / 1e3
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add a third side: ours with EngineConfig.compile "
                        "(decode calls as compiled graphs; built in an untimed run of the whole workload)")
    parser.add_argument("--profile", action="store_true", help="after the timed runs, profile one run of each side "
                        "and print where its CPU time goes (torch.profiler, top operators)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from adaptive.convert import convert_hf_llama, load_pretrained

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(args.preset, args.seed, Path(tmp) / "hf").to(device=args.device, dtype=dtype)
        ours = load_pretrained(convert_hf_llama(Path(tmp) / "hf", Path(tmp) / "ours")).to(device=args.device, dtype=dtype)
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(1, vocab, (args.batch, args.prompt_len), generator=g).to(args.device)
    sides = {"hf": lambda: time_hf(hf, prompts, args.new_tokens),
             "ours": lambda: time_ours(ours, prompts, args.new_tokens, args.block_size)}
    if args.compile:
        sides["ours_compiled"] = lambda: time_ours(ours, prompts, args.new_tokens, args.block_size, compile=True)
        sides["ours_compiled"]()  # builds the graphs of every batch size and length: untimed
    time_hf(hf, prompts[:2, :8], 4), time_ours(ours, prompts[:2, :8], 4, args.block_size)  # warm-up, untimed
    runs: dict[str, list[float]] = {name: [] for name in sides}
    outputs = {}
    for rep in range(args.repeats):
        for name, fn in sides.items():  # interleaved: HF, ours, (ours compiled,) HF, ...
            elapsed, outputs[name] = fn()
            runs[name].append(args.batch * args.new_tokens / elapsed)
            if not args.json:
                print(f"repeat {rep + 1}/{args.repeats} {name:13s} {runs[name][-1]:10.1f} tokens/s")
    report = {"preset": args.preset, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads()}
    for name in sides:
        ratios = [a / b for a, b in zip(runs[name], runs["hf"])]
        report[f"{name}_tokens_per_s"] = statistics.median(runs[name])
        report[f"{name}_spread"] = [min(runs[name]), max(runs[name])]
        if name != "hf":
            prefix = "" if name == "ours" else "compiled_"
            report[f"{prefix}speedup"] = statistics.median(ratios)
            report[f"{prefix}speedup_spread"] = [min(ratios), max(ratios)]
            report[f"{prefix}greedy_agreement"] = sum(a == b for a, b in zip(outputs["hf"], outputs[name])) / args.batch
    if args.profile:
        report["profile_ms"] = {name: profile_ops(fn) for name, fn in sides.items()}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, ops in report.get("profile_ms", {}).items():
        print(f"{name}: " + ", ".join(f"{op} {ms:.0f} ms" for op, ms in ops.items()))
    for name in sides:
        if name == "hf":
            continue
        prefix = "" if name == "ours" else "compiled_"
        lo, hi = report[f"{prefix}speedup_spread"]
        print(f"HF generate (static cache) {report['hf_tokens_per_s']:,.1f} tokens/s, {name} "
              f"{report[f'{name}_tokens_per_s']:,.1f} tokens/s: {report[f'{prefix}speedup']:.2f}x (spread {lo:.2f}-"
              f"{hi:.2f}); greedy outputs agree for {report[f'{prefix}greedy_agreement']:.0%} of requests")


if __name__ == "__main__":
    main()

"""A bounded load test of `adaptive serve`: concurrent streaming clients against a real server on loopback.

    python benchmarks/serve_load.py RUN_DIR [--baseline VANILLA_RUN] [--requests 256] [--concurrency 64]

For the model and its same-shape vanilla counterpart (``--baseline``, or the counterpart randomly
initialised and written to a temporary directory), each through its own `adaptive serve` process:

1. Exactness, in float64: every request of the workload is sent by one of ``--concurrency`` streaming
   clients; each response must equal the offline greedy output of its prompt (``LLM.generate`` on the same
   weights), arrive exactly once, be well formed, and end with ``[DONE]``.
2. Throughput, in ``--dtype`` (float32 by default), ``--repeats`` runs per side interleaved (ABAB...):
   tokens/s, requests/s, TTFT and inter-token latency p50/p99, with the same integrity checks (every
   request answered once with the tokens it asked for).
3. After each run the server's /metrics must show no running request and no KV block in use, and its
   resident memory is read before and after (flat: the blocks were all freed).

Prompts are token ids (mixed lengths), outputs mixed lengths with ``ignore_eos`` so both sides do the same
work. Everything is bounded: a fixed number of requests, a per-run timeout, and each server is stopped with
SIGTERM (it must drain and exit 0). Prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from adaptive.convert import save_pretrained
from adaptive.model.transformer import build_model
from adaptive.plugins import get_registry
from adaptive.serving import LLM, EngineConfig, SamplingParams
from adaptive.serving.bench import vanilla_counterpart
from adaptive.serving.loading import load_run, resolve


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]


@dataclass
class RunResult:
    wall_s: float
    outputs: dict[int, list[str]]  # request index -> streamed text pieces
    tokens: dict[int, int]
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rss_before_kb: int = 0
    rss_after_kb: int = 0


def make_workload(n: int, vocab: int, prompt_len: tuple[int, int], new: tuple[int, int], seed: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_len))] for _ in range(n)]
    return Workload(prompts, [rng.randint(*new) for _ in range(n)])


class Server:
    """`adaptive serve DIR` in a subprocess on a free loopback port."""

    def __init__(self, directory: Path, dtype: str, max_batch: int, max_queued: int):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adaptive", "serve", str(directory), "--port", str(self.port), "--device", "cpu",
             "--dtype", dtype, "--max-batch", str(max_batch), "--max-queued", str(max_queued), "--log-level", "warning",
             "--model-name", "m"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0].split("{")[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#") and "outcome" not in line
                and "depth=" not in line}

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


async def one_request(client: httpx.AsyncClient, url: str, i: int, prompt: list[int], max_tokens: int,
                      result: RunResult, gate: asyncio.Semaphore) -> None:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_depths": True}
    async with gate:
        sent, last, pieces, tokens, done = time.perf_counter(), None, [], 0, False
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.problems.append(f"request {i}: HTTP {r.status_code} {await r.aread()!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk or done:
                    result.problems.append(f"request {i}: {chunk if 'error' in chunk else 'data after [DONE]'}")
                    return
                ch = chunk["choices"][0]
                now, got = time.perf_counter(), len(ch["adaptive"]["depths"])
                if got:
                    (result.ttft_s if last is None else result.itl_s).append(now - (sent if last is None else last))
                    last = now
                tokens += got
                pieces.append(ch["text"])
    if not done:
        result.problems.append(f"request {i}: the stream ended without [DONE]")
    if i in result.outputs:
        result.problems.append(f"request {i}: answered twice")
    if tokens != max_tokens:
        result.problems.append(f"request {i}: {tokens} tokens, asked for {max_tokens}")
    result.outputs[i], result.tokens[i] = pieces, tokens


async def drive(url: str, work: Workload, concurrency: int, timeout: float) -> RunResult:
    result = RunResult(0.0, {}, {})
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        tasks = [one_request(client, url, i, p, n, result, gate) for i, (p, n) in enumerate(zip(work.prompts,
                                                                                               work.max_tokens))]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        result.wall_s = time.perf_counter() - start
    lost = set(range(len(work.prompts))) - set(result.outputs)
    result.problems += [f"request {i}: lost" for i in sorted(lost)]
    return result


def run_side(server: Server, work: Workload, concurrency: int, timeout: float) -> RunResult:
    before = server.rss_kb()
    result = asyncio.run(drive(server.url, work, concurrency, timeout))
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        if (m["adaptive_kv_blocks_in_use"] == 0 and m["adaptive_requests_running"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if m["adaptive_kv_blocks_in_use"] or m["adaptive_requests_running"]:
        result.problems.append(f"after the run: {m['adaptive_kv_blocks_in_use']:g} KV blocks and "
                               f"{m['adaptive_requests_running']:g} requests still held")
    result.rss_before_kb, result.rss_after_kb = before, server.rss_kb()
    return result


def offline_texts(directory: Path, work: Workload, max_batch: int) -> list[str]:
    llm = LLM.from_run(directory, device="cpu", dtype="float64", config=EngineConfig(max_batch=max_batch))
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.max_tokens]
    return [c.text for c in llm.generate(work.prompts, params)]


def write_counterpart(run_dir: Path, out: Path, seed: int) -> Path:
    run = load_run(run_dir, get_registry())
    cfg = vanilla_counterpart(run.model.config, run.model.plan.num_logical)
    torch.manual_seed(seed)
    model = build_model(cfg, get_registry(), vocab_size=run.model.vocab_size)
    return save_pretrained(out, cfg, model.state_dict(), name="vanilla-counterpart",
                           tokenizer_file=resolve(run_dir)[0] / "tokenizer.json")


def summarize(runs: list[RunResult]) -> dict:
    def med(values):
        return statistics.median(values)

    tps = [sum(r.tokens.values()) / r.wall_s for r in runs]
    ttft = [x for r in runs for x in r.ttft_s]
    itl = [x for r in runs for x in r.itl_s]
    return {"tokens_per_s": med(tps), "tokens_per_s_spread": [min(tps), max(tps)],
            "requests_per_s": med([len(r.outputs) / r.wall_s for r in runs]),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "itl_p50_s": float(np.percentile(itl, 50)), "itl_p99_s": float(np.percentile(itl, 99)),
            "rss_growth_kb": [r.rss_after_kb - r.rss_before_kb for r in runs],
            "rss_after_kb": [r.rss_after_kb for r in runs],
            "memory_flat": runs[-1].rss_after_kb <= 1.05 * runs[0].rss_after_kb,
            "problems": sum(len(r.problems) for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a trained recursive or MoR run (e.g. make demo's)")
    ap.add_argument("--baseline", type=Path, help="a vanilla run of the same shape (default: the counterpart, "
                    "randomly initialised)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt-len", default="8:64")
    ap.add_argument("--max-tokens", default="16:128")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    span = lambda text: tuple(int(x) for x in (text.split(":") * 2)[:2])  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        baseline = args.baseline or write_counterpart(args.run, Path(tmp) / "vanilla", args.seed)
        sides = {"model": args.run, "vanilla": baseline}
        vocab = load_run(args.run, get_registry()).model.vocab_size
        work = make_workload(args.requests, vocab, span(args.prompt_len), span(args.max_tokens), args.seed)
        report: dict = {"requests": args.requests, "concurrency": args.concurrency, "max_batch": args.max_batch,
                        "dtype": args.dtype, "repeats": args.repeats, "exact": {}, "exit_codes": {}}
        for name, directory in sides.items():  # 1. exactness, float64
            expected = offline_texts(directory, work, args.max_batch)
            server = Server(directory, "float64", args.max_batch, args.requests)
            r = run_side(server, work, args.concurrency, args.timeout)
            wrong = [i for i, text in enumerate(expected) if "".join(r.outputs.get(i, [])) != text]
            report["exact"][name] = {"requests": len(expected), "equal_to_offline": len(expected) - len(wrong),
                                     "problems": r.problems[:5] + [f"request {i}: differs from offline" for i in wrong[:5]]}
            report["exit_codes"][f"{name}_float64"] = server.stop()
        servers = {name: Server(d, args.dtype, args.max_batch, args.requests) for name, d in sides.items()}
        runs: dict[str, list[RunResult]] = {name: [] for name in sides}
        for _ in range(args.repeats):  # 2. throughput, interleaved
            for name, server in servers.items():
                runs[name].append(run_side(server, work, args.concurrency, args.timeout))
        for name, server in servers.items():
            report["exit_codes"][name] = server.stop()
        for name in sides:
            report[name] = summarize(runs[name])
        report["speedup"] = report["model"]["tokens_per_s"] / report["vanilla"]["tokens_per_s"]
        report["pass"] = (all(v["equal_to_offline"] == v["requests"] and not v["problems"] for v in report["exact"].values())
                          and all(report[n]["problems"] == 0 and report[n]["memory_flat"] for n in sides)
                          and all(code == 0 for code in report["exit_codes"].values()))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.requests} requests, {args.concurrency} concurrent streaming clients, max batch {args.max_batch}, "
          f"{args.dtype}, {args.repeats} interleaved runs per side")
    for name, v in report["exact"].items():
        print(f"exactness ({name}, float64): {v['equal_to_offline']}/{v['requests']} equal to offline greedy; "
              f"problems: {v['problems'] or 'none'}")
    print(f"{'':24}{'model':>14}{'vanilla':>14}{'ratio':>9}")
    for key, label, scale in (("tokens_per_s", "tokens/s (median)", 1), ("requests_per_s", "requests/s", 1),
                              ("ttft_p50_s", "TTFT p50 s", 1), ("ttft_p99_s", "TTFT p99 s", 1),
                              ("itl_p50_s", "ITL p50 ms", 1e3), ("itl_p99_s", "ITL p99 ms", 1e3)):
        a, b = report["model"][key] * scale, report["vanilla"][key] * scale
        print(f"{label:24}{a:>14.3f}{b:>14.3f}{a / b:>8.2f}x")
    for name in sides:
        v = report[name]
        print(f"{name}: tokens/s spread {[round(x, 1) for x in v['tokens_per_s_spread']]}, RSS after each run (KiB) "
              f"{v['rss_after_kb']} (flat: {v['memory_flat']}), integrity problems {v['problems']}")
    print(f"servers drained and exited with {report['exit_codes']}; pass: {report['pass']}")


if __name__ == "__main__":
    main()

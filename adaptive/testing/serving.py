"""Serving consistency: the batched serving engine gives every request what decoding it alone gives.

The reference decodes one request at a time with the model's own cache (``AdaptiveLM.new_cache``): the
prompt in one forward, then one token per forward, greedy. The engine runs all requests together under a
``Schedule``: when each request arrives (the engine iteration at which it is added), the batch and token
limits, the block size and the pool size (a small pool forces preemption and recomputation). Tokens and
routing depths must be identical, and the logits each token was chosen from equal within tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaptive.model.transformer import AdaptiveLM
from adaptive.registry import Registry
from adaptive.testing.compare import ATOL, RTOL
from adaptive.testing.models import ModelLike, as_model, single_threaded

Tensor = torch.Tensor


@dataclass
class Reference:
    tokens: list[int]
    depths: list[int]  # recursion steps of the position each token was chosen from
    logits: list[Tensor]


@dataclass
class Schedule:
    """How the engine is run: request i is added before iteration ``arrivals[i]`` (in the given order)."""

    arrivals: list[int] = field(default_factory=list)
    max_batch: int = 4
    max_tokens_per_iteration: int = 16
    block_size: int = 4
    num_blocks: int | None = None
    paged_attention: str = "auto"  # EngineConfig.paged_attention: gather, or flex (in place over the pool)
    compile: bool = False  # EngineConfig.compile: decode calls through compiled graphs


@torch.no_grad()
def decode_alone(model: AdaptiveLM, prompt: list[int], max_tokens: int) -> Reference:
    """Greedy decoding of one request with the model's cache: prefill, then one token per forward."""
    cache = model.new_cache(1, len(prompt) + max_tokens)
    device = model.embed.weight.device
    out = model(torch.tensor([prompt], device=device), cache=cache)
    tokens, depths, logits = [], [], []
    for i in range(max_tokens):
        last = out.logits_BTV[0, -1]
        depth = out.stats.depth_BT[0, -1] if out.stats.depth_BT is not None else torch.zeros((), dtype=torch.long)
        tokens.append(int(last.argmax()))
        depths.append(int(depth))
        logits.append(last)
        if i + 1 < max_tokens:
            out = model(torch.tensor([[tokens[-1]]], device=device), cache=cache)
    return Reference(tokens, depths, logits)


@single_threaded
def check_serving_consistency(model_or_config: ModelLike, *, prompts: list[list[int]] | None = None,
                              max_tokens: int = 6, schedule: Schedule | None = None, seed: int = 0,
                              capacities: list[float] | None = None, registry: Registry | None = None,
                              atol: float = ATOL, rtol: float = RTOL, device: str = "cpu",
                              dtype: torch.dtype = torch.float64) -> None:
    """Raise AssertionError when the serving engine's output for a request differs from decoding it alone
    (the model in ``dtype`` on ``device``: float64 on the CPU unless a GPU path is checked)."""
    from adaptive.serving import EngineConfig, SamplingParams, ServingEngine

    model = as_model(model_or_config, registry=registry, seed=seed, capacities=capacities, dtype=dtype).to(device)
    if prompts is None:
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, model.vocab_size, (int(n),), generator=g).tolist()
                   for n in torch.randint(1, 12, (3,), generator=g)]
    schedule = schedule or Schedule(arrivals=[0] * len(prompts))
    arrivals = schedule.arrivals or [0] * len(prompts)
    config = EngineConfig(max_batch=schedule.max_batch, max_tokens_per_iteration=schedule.max_tokens_per_iteration,
                          block_size=schedule.block_size, num_blocks=schedule.num_blocks,
                          max_len=max(len(p) for p in prompts) + max_tokens, paged_attention=schedule.paged_attention,
                          compile=schedule.compile)
    engine = ServingEngine(model, config)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, return_logits=True)
    ids: dict[int, str] = {}
    iteration = 0
    while len(ids) < len(prompts) or engine.has_unfinished():
        for i in sorted(range(len(prompts)), key=lambda i: arrivals[i]):
            if i not in ids and arrivals[i] <= iteration:
                ids[i] = engine.add_request(prompts[i], params)
        engine.step()
        iteration += 1
        assert iteration < 10_000, "the engine stopped making progress"
    assert engine.blocks.blocks_in_use == 0, f"{engine.blocks.blocks_in_use} KV blocks still held after every request finished"
    for i, prompt in enumerate(prompts):
        want, got = decode_alone(model, prompt, max_tokens), engine.completions[ids[i]]
        where = f"serving consistency (request {i}, prompt length {len(prompt)}, {schedule})"
        if got.tokens != want.tokens:
            at = next(t for t, (a, b) in enumerate(zip(want.tokens, got.tokens + [None] * max_tokens)) if a != b)
            raise AssertionError(f"{where}: token {at} is {got.tokens[at:at + 1]}, decoding alone gives "
                                 f"{want.tokens[at]} (tokens {got.tokens} vs {want.tokens})")
        if got.depths != want.depths:
            raise AssertionError(f"{where}: recursion depths {got.depths}, decoding alone gives {want.depths}")
        for t, (a, b) in enumerate(zip(want.logits, got.logits)):
            error = float((a - b).abs().max())
            if error > atol + rtol * float(a.abs().max()):
                raise AssertionError(f"{where}: the logits of token {t} differ by {error:.3e}")

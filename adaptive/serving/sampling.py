"""Sampling parameters per request, and one batched sampler for every row that samples in an iteration.

Randomness is counter-based: the uniform noise of row r at vocabulary entry v is a hash of (the request's
seed, the index of the token being sampled, v). A request's samples therefore depend on its seed alone,
never on its batch-mates, the arrival order or a preemption that recomputes it; and sampling needs no
Python loop over rows (one generator per request would). Sampling draws argmax(logits / T + Gumbel noise)
over the entries that survive top-k and top-p, which is a draw from softmax(logits / T) restricted to them.

Shape legend: F rows that sample, V vocabulary.
"""

from __future__ import annotations

import random

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

Tensor = torch.Tensor
_MASK32 = 0xFFFFFFFF


class SamplingParams(BaseModel):
    """How one request is continued. ``temperature=0`` is greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=64, ge=1, description="most tokens to generate")
    temperature: float = Field(default=1.0, ge=0, description="softmax temperature; 0 = greedy (argmax)")
    top_k: int = Field(default=0, ge=0, description="sample among the k most likely tokens; 0 = all")
    top_p: float = Field(default=1.0, gt=0, le=1, description="sample among the smallest set of tokens whose "
                         "probability reaches top_p (nucleus); 1 = all")
    seed: int | None = Field(default=None, ge=0, description="seed of this request's samples; unset: drawn at random")
    stop_token_ids: tuple[int, ...] = Field(default=(), description="token ids that end the request (not emitted)")
    stop: tuple[str, ...] = Field(default=(), description="strings that end the request (the text stops before them)")
    ignore_eos: bool = Field(default=False, description="keep going past the end-of-text token")
    return_logits: bool = Field(default=False, description="keep the logits each generated token was sampled from")

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def draw_seed() -> int:
    return random.SystemRandom().getrandbits(31)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (values in [0, 2^32), int64 arithmetic that never overflows)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seed_F: Tensor, counter_F: Tensor, vocab: int) -> Tensor:
    """Uniform (0, 1) noise, float64, (F, V): a pure function of (seed, counter, vocabulary index)."""
    key_F = _mix32(_mix32(seed_F & _MASK32) ^ ((seed_F >> 32) & _MASK32))
    key_F = _mix32((key_F + _mix32(counter_F & _MASK32)) & _MASK32)
    v_V = torch.arange(vocab, device=seed_F.device, dtype=torch.long)
    bits_FV = _mix32(key_F[:, None] ^ _mix32(v_V)[None])
    return (bits_FV.double() + 0.5) / 2.0**32


class SamplingBatch:
    """Per-row settings of the rows that sample in one iteration, as device tensors."""

    def __init__(self, params: list[SamplingParams], seeds: list[int], counters: list[int], device: torch.device):
        self.greedy_all = all(p.greedy for p in params)
        self.filtered = any((p.top_k > 0 or p.top_p < 1.0) and not p.greedy for p in params)
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        self.greedy_F = as_tensor([p.greedy for p in params], torch.bool)
        self.temperature_F = as_tensor([p.temperature if not p.greedy else 1.0 for p in params], torch.float64)
        self.top_k_F = as_tensor([p.top_k for p in params], torch.long)
        self.top_p_F = as_tensor([p.top_p for p in params], torch.float64)
        self.seed_F = as_tensor(seeds, torch.long)
        self.counter_F = as_tensor(counters, torch.long)


def sample(logits_FV: Tensor, batch: SamplingBatch) -> Tensor:
    """The next token of every row: argmax for greedy rows, a seeded draw for the others."""
    best_F = logits_FV.argmax(-1)
    if batch.greedy_all:
        return best_F
    F, V = logits_FV.shape
    scaled_FV = logits_FV.double() / batch.temperature_F[:, None]
    if batch.filtered:
        scaled_FV = _top_k_top_p(scaled_FV, batch.top_k_F, batch.top_p_F)
    gumbel_FV = -torch.log(-torch.log(uniform_noise(batch.seed_F, batch.counter_F, V)))
    drawn_F = (scaled_FV + gumbel_FV).argmax(-1)
    return torch.where(batch.greedy_F, best_F, drawn_F)


def _top_k_top_p(scaled_FV: Tensor, top_k_F: Tensor, top_p_F: Tensor) -> Tensor:
    """Set to -inf every entry outside the row's top-k (0: no limit) and outside its top-p nucleus (the
    most likely entries whose probabilities, most likely first, sum to top_p; the first always stays)."""
    V = scaled_FV.shape[-1]
    sorted_FV, order_FV = scaled_FV.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=scaled_FV.device)
    k_F = torch.where(top_k_F > 0, top_k_F, V)
    probs_FV = torch.softmax(sorted_FV, dim=-1)
    before_FV = probs_FV.cumsum(-1) - probs_FV  # probability of the entries ranked above
    drop_FV = (rank_V[None] >= k_F[:, None]) | ((before_FV >= top_p_F[:, None]) & (top_p_F[:, None] < 1.0))
    drop_FV[:, 0] = False
    dropped_FV = torch.zeros_like(drop_FV).scatter(1, order_FV, drop_FV)
    return scaled_FV.masked_fill(dropped_FV, float("-inf"))

"""Requests, the work groups they send through the model, and what the engine hands back.

A request's *columns* are its token positions: the prompt, then each generated token. A *group* is a run
of consecutive columns of one request that goes through the model together: a prefill chunk, or one
decode token. Its tokens run the prelude, then the recursion steps their routers pick (all of a group's
still-running tokens are at the same step, so a group is one row of a block call), then the coda and, for
the group that ends with the request's newest token, the head and sampling. A request has at most one
group in flight: token t+1 starts after token t is sampled.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from adaptive.serving.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenEvent:
    """One generated token, as streamed: its id, the text it adds, the recursion depth that produced it."""

    request_id: str
    token: int | None  # None: the request ended without a new token (a stop string cut it, or it was aborted)
    text: str
    depth: int | None
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class Completion:
    """A finished request."""

    request_id: str
    prompt: list[int]
    tokens: list[int]  # generated ids (a stop token id is not included)
    text: str | None  # decoded text (with a tokenizer), cut before a stop string
    finish_reason: str  # "stop" (end of text, a stop id or string) | "length" (max_tokens or the context)
    #                     | "abort" (``ServingEngine.abort``) | "error" (its own host-side work failed: ``error``)
    depths: list[int]  # recursion steps run by the position each generated token was sampled from
    arrival_s: float
    token_times_s: list[float]  # when each token reached the host (time.perf_counter())
    stop_reason: int | str | None = None
    logits: list[torch.Tensor] | None = None  # per token, with SamplingParams.return_logits
    preemptions: int = 0
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def inter_token_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:])]


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    arrival: float
    on_token: Callable[[TokenEvent], None] | None = None
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)  # generated ids whose values the host knows
    num_sampled: int = 0  # generated ids, including one still on the device
    depths: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    row: int | None = None  # batch row while running
    done_cols: int = 0  # columns whose keys/values every layer has stored
    group: "Group | None" = None  # the group in flight
    next_group: "Group | None" = None  # admitted in this iteration while ``group`` finishes
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    preemptions: int = 0
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + self.num_sampled

    @property
    def pending(self) -> bool:
        """The newest token is sampled but its value has not reached the host yet."""
        return self.num_sampled > len(self.output)

    def token_at(self, col: int) -> int:
        return self.prompt[col] if col < len(self.prompt) else self.output[col - len(self.prompt)]


@dataclass
class Group:
    request: Request
    start: int  # first column
    length: int
    arena: np.ndarray  # the hidden-state arena row of each token
    samples: bool  # ends with the request's newest token: its logits are sampled
    from_device: bool  # its one input token is the sampled token still on the device
    step: int = 0  # the step its running tokens run next
    live: np.ndarray | None = None  # offsets of the tokens still running; None: decided on the device only
    depth_T: np.ndarray | None = None  # steps each token ran so far
    exits: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (offsets, step) that exited, to fill
    finished: bool = False  # every token has left the recursion: coda, head and sampling are next
    cancelled: bool = False
    step_runs: dict[int, int] = field(default_factory=dict)  # tokens that ran each step (independent routing)

    def __post_init__(self) -> None:
        self.depth_T = np.zeros(self.length, dtype=np.int64)
        self.live_mask = np.ones(self.length, dtype=bool)  # still running (until a decision says otherwise)

    def running(self) -> np.ndarray:
        """Offsets of the tokens that run the group's next step (all, when the device decided)."""
        return np.arange(self.length) if self.live is None else self.live

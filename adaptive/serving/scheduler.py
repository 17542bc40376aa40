"""The scheduler: which work runs in each engine iteration, and who is preempted when blocks run out.

Each iteration it plans, in priority order, reserving KV blocks for everything the iteration will write:

1. groups whose every token left the recursion (fill owed keys/values, coda, head, sampling);
2. groups still in the recursion (their step's slots; the coda too if this is their last step);
3. new groups under the per-iteration token budget: the next decode token of each running request first,
   then the next prefill chunk of running requests, then new requests while batch rows are free.

A reservation that does not fit preempts the running request that arrived last: its blocks and arena rows
are freed, its group is dropped, and it waits at the head of the queue to be recomputed from its prompt
and the tokens it had generated (recomputation gives the same keys/values, so its output does not change).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adaptive.serving.block_manager import BlockManager, OutOfBlocks
from adaptive.serving.paged_flex import flex_available
from adaptive.serving.sequence import Group, Request, Status


class EngineConfig(BaseModel):
    """Limits of the serving engine (``adaptive generate``/``bench``/``serve`` options map onto these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch: int = Field(default=32, ge=1, description="requests running at once (batch rows)")
    max_tokens_per_iteration: int = Field(default=512, ge=1, description="token budget: tokens that enter the "
                                          "model per iteration (decode tokens and prefill chunks)")
    block_size: int = Field(default=16, ge=1, description="entries per KV block")
    num_blocks: int | None = Field(default=None, ge=1, description="blocks in the KV pool; unset: room for "
                                   "max_batch full-length sequences in every slot")
    max_len: int | None = Field(default=None, ge=1, description="context length (prompt + generated); unset: "
                                "the model's max_seq_len")
    paged_attention: Literal["auto", "gather", "flex"] = Field(
        default="auto", description="how attention reads the pages: `gather` copies each row's blocks out of the "
        "pool, then calls the model's attention backend; `flex` runs FlexAttention in place over the pool with a "
        "block mask of each row's pages (compiled on CUDA, eager on the CPU); `auto`: flex on CUDA unless "
        "`compile` is set, else gather")
    compile: bool = Field(default=False, description="run the decode calls (one token per row: the shared block, "
                          "prelude and coda) as graphs compiled by `torch.compile`: CUDA graphs on CUDA, padded to "
                          "bucketed batch sizes; shape-dynamic graphs on the CPU. Needs the gather attention path; "
                          "the first requests build the graphs")

    @model_validator(mode="after")
    def _compile_needs_gather(self) -> "EngineConfig":
        if self.compile and self.paged_attention == "flex":
            raise ValueError("compile: the compiled decode graphs read the pages through the gather path; "
                             "set paged_attention to 'gather' or 'auto', or compile to false")
        return self

    def attention_path(self, device: torch.device) -> str:
        """The paged-attention path on ``device`` (``auto`` resolved)."""
        if self.paged_attention != "auto":
            return self.paged_attention
        return "flex" if device.type == "cuda" and not self.compile and flex_available(device) else "gather"


@dataclass
class IterationPlan:
    fills: list[tuple[Group, np.ndarray, int]] = field(default_factory=list)  # (group, offsets, first step)
    finishing: list[Group] = field(default_factory=list)
    continuing: list[Group] = field(default_factory=list)
    admitted: list[tuple[Group, list[int]]] = field(default_factory=list)  # with the host-known token ids
    preempted: list[Request] = field(default_factory=list)

    def drop(self, q: Request) -> None:
        self.fills = [f for f in self.fills if f[0].request is not q]
        self.finishing = [g for g in self.finishing if g.request is not q]
        self.continuing = [g for g in self.continuing if g.request is not q]
        self.admitted = [a for a in self.admitted if a[0].request is not q]

    @property
    def empty(self) -> bool:
        return not (self.fills or self.finishing or self.continuing or self.admitted)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, runner, num_steps: int,
                 step_slots: list[list[int]], prelude: tuple[int, ...], coda: tuple[int, ...], writes: list[str]):
        self.config, self.blocks, self.runner = config, blocks, runner
        self.num_steps, self.writes = num_steps, writes
        self.step_slots = [np.asarray(s, dtype=np.int64) for s in step_slots]
        self.prelude, self.coda = np.asarray(prelude, dtype=np.int64), np.asarray(coda, dtype=np.int64)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_rows = list(range(config.max_batch - 1, -1, -1))

    @property
    def max_len(self) -> int:
        return self.blocks.max_len

    # ------------------------------------------------------------------ planning

    def plan(self, now: float) -> IterationPlan:
        plan = IterationPlan()
        self.short_of_blocks = False
        self._plan_in_flight(plan)
        self._plan_admissions(now, plan)
        if plan.empty and self.short_of_blocks and self.running:  # every running request waits for blocks the others hold
            self.preempt(max(self.running, key=lambda q: q.arrival), plan)
            self._plan_admissions(now, plan)
        return plan

    def _plan_in_flight(self, plan: IterationPlan) -> None:
        """Groups in flight go on (all at once when the blocks suffice, else one by one, preempting)."""
        flying = sorted((q for q in self.running if q.group is not None), key=lambda q: q.arrival)
        needs = [self._in_flight_need(q.group) for q in flying]
        together = self._reserve_bulk([q.row for q in flying], needs)
        for q, need in zip(flying, needs):
            if q.status is Status.RUNNING and (together or self._reserve(q, need, plan, may_wait=False)):
                g = q.group
                plan.fills += [(g, t, first) for t, first in g.exits]
                g.exits = []
                (plan.finishing if g.finished else plan.continuing).append(g)

    def _in_flight_need(self, g: Group) -> list[tuple[np.ndarray, int]]:
        need = [(self.step_slots[step], len(t)) for t, first in g.exits for step in self._owed_steps(first)
                if self.writes[step] == "all"]
        if g.finished:
            need.append((self.coda, g.length))
        elif self.writes[g.step] != "none":
            need.append((self.step_slots[g.step], len(g.running())))
        return need

    def _owed_steps(self, first: int) -> range:
        """Steps whose ``writes="all"`` keys/values tokens that left at ``first`` still owe: every deeper step
        when they exited (hierarchical routing), ``first`` alone when they skipped it (independent routing)."""
        return range(first, self.num_steps if self.runner.hierarchical else first + 1)

    def _plan_admissions(self, now: float, plan: IterationPlan) -> None:
        """Next groups of running requests (decode tokens first), then new requests, under the budget."""
        budget, arena = self.config.max_tokens_per_iteration, len(self.runner.free_arena)
        finishing = {id(g.request) for g in plan.finishing}
        ready = [q for q in self.running if q.status is Status.RUNNING and q.next_group is None
                 and (q.group is None or id(q) in finishing)]
        spans = {id(q): self._remaining(q) for q in ready}
        ready.sort(key=lambda q: (spans[id(q)][1] - spans[id(q)][0] > 1, q.arrival))  # decodes first
        proposals: list[tuple[Request, int, int, int]] = []  # (request, batch row, first column, tokens)
        for q in ready:
            done, n = self._next_span(q, min(budget, arena))
            if n:
                proposals.append((q, q.row, done, n))
                budget, arena = budget - n, arena - n
        rows = list(self.free_rows)
        for q in self.waiting:
            if budget <= 0 or not rows or q.arrival > now or q.pending:
                break
            done, n = self._next_span(q, min(budget, arena))
            if not n:
                break
            proposals.append((q, rows.pop(), done, n))
            budget, arena = budget - n, arena - n
        needs = [self._admission_need(n) for _, _, _, n in proposals]
        if self._reserve_bulk([row for _, row, _, _ in proposals], needs):
            for (q, row, done, n), need in zip(proposals, needs):
                if q.row is None:
                    self._run(q, row)
                self._start_group(q, done, n, plan)
            return
        budget = self.config.max_tokens_per_iteration
        for q, row, _, _ in proposals:  # short of blocks: one by one, preempting later arrivals
            fresh = q.row is None
            if fresh:
                if q.status is not Status.WAITING or not self.free_rows or q is not self.waiting[0]:
                    break
                self._run(q, self.free_rows[-1])
            elif q.status is not Status.RUNNING or q.row != row:
                continue  # preempted by an earlier admission
            done, n = self._next_span(q, min(budget, len(self.runner.free_arena)))
            if n and self._reserve(q, self._admission_need(n), plan, may_wait=True):
                budget -= n
                self._start_group(q, done, n, plan)
            elif fresh:  # no room yet: back to the head of the queue
                if q.status is Status.RUNNING:
                    self._unrun(q)
                    self.waiting.appendleft(q)
                break

    def _run(self, q: Request, row: int) -> None:
        self.waiting.remove(q)
        self.free_rows.remove(row)
        q.row, q.status = row, Status.RUNNING
        self.running.append(q)

    def _remaining(self, q: Request) -> tuple[int, int]:
        """(first column of ``q``'s next group, columns known by then), counting the group that finishes now."""
        done, total = q.done_cols, q.num_tokens
        if q.group is not None:
            done, total = q.group.start + q.group.length, total + q.group.samples
        return done, total

    def _next_span(self, q: Request, budget: int) -> tuple[int, int]:
        """(first column, tokens) of ``q``'s next group within ``budget`` tokens; 0 tokens: none now."""
        done, total = self._remaining(q)
        if total - len(q.prompt) >= q.params.max_tokens or done >= total or done >= self.max_len:
            return done, 0  # the request ends when its newest token reaches the host
        return done, max(0, min(total, done + budget) - done)

    def _admission_need(self, n: int) -> list[tuple[np.ndarray, int]]:
        need = [(self.prelude, n)]
        if self.num_steps and self.writes[0] != "none":
            need.append((self.step_slots[0], n))
        return need

    def _start_group(self, q: Request, done: int, n: int, plan: IterationPlan) -> None:
        _, total = self._remaining(q)
        samples = done + n == total
        from_device = samples and (q.pending or (q.group is not None and q.group.samples))
        g = Group(q, done, n, self.runner.take_arena(n), samples, from_device)
        ids = [] if from_device else [q.token_at(c) for c in range(done, done + n)]
        plan.admitted.append((g, ids))
        if q.group is None:
            q.group = g
        else:  # the group in flight finishes in this iteration, before this one starts
            q.next_group = g

    # ------------------------------------------------------------------ blocks and preemption

    def _reserve_bulk(self, rows: list[int], needs: list[list[tuple[np.ndarray, int]]]) -> bool:
        """Reserve everything at once when the pool has room for all of it (the common case)."""
        extra = np.zeros((self.config.max_batch, self.blocks.num_slots), dtype=np.int64)
        pairs = [(np.full(len(slots), row), slots, np.full(len(slots), n))
                 for row, need in zip(rows, needs) for slots, n in need if len(slots)]
        if pairs:
            r, sl, n = (np.concatenate(parts) for parts in zip(*pairs))
            np.add.at(extra, (r, sl), n)
        try:
            self.blocks.reserve_all(extra)
            return True
        except OutOfBlocks:
            self.short_of_blocks = True
            return False

    def _reserve(self, q: Request, need: list[tuple[list[int], int]], plan: IterationPlan, may_wait: bool) -> bool:
        """Reserve blocks for ``need`` ((slots, entries) pairs) of ``q``, preempting the latest-arrived
        request while short. False: nothing reserved (``q`` itself was preempted, or waits)."""
        extra = np.zeros(self.blocks.num_slots, dtype=np.int64)
        for slots, n in need:
            extra[slots] += n  # (the slots of one entry are distinct)
        slots = np.flatnonzero(extra)
        if not len(slots):
            return True
        extra = extra[slots]
        while True:
            try:
                self.blocks.reserve(q.row, slots, extra)
                return True
            except OutOfBlocks:
                self.short_of_blocks = True
                victim = max((r for r in self.running if r.status is Status.RUNNING), key=lambda r: r.arrival)
                if victim is q or (may_wait and victim.arrival <= q.arrival):
                    if not may_wait:
                        self.preempt(q, plan)
                    return False
                self.preempt(victim, plan)

    def preempt(self, q: Request, plan: IterationPlan) -> None:
        """Free ``q``'s blocks and arena rows and queue it for recomputation."""
        self._release_groups(q)
        plan.drop(q)
        self._unrun(q)
        q.preemptions += 1
        q.done_cols = 0
        self.waiting.appendleft(q)
        plan.preempted.append(q)

    def finish(self, q: Request) -> None:
        """``q`` is done: its row, blocks and arena rows are reused at once."""
        self._release_groups(q)
        self._unrun(q)
        q.status = Status.FINISHED

    def _release_groups(self, q: Request) -> None:
        for g in (q.group, q.next_group):
            if g is not None and not g.cancelled:
                g.cancelled = True
                self.runner.give_arena(g.arena)

    def _unrun(self, q: Request) -> None:
        if q.row is not None:
            self.blocks.release(q.row)
            self.free_rows.append(q.row)
        q.row, q.group, q.next_group, q.status = None, None, None, Status.WAITING
        if q in self.running:
            self.running.remove(q)

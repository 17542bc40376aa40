"""The serving engine: requests in, tokens out, one iteration at a time.

``ServingEngine(model)`` serves any ``AdaptiveLM``. Vanilla models get continuous (sequence) batching:
each iteration runs every layer for the new tokens of all running requests, prefill chunks mixed in under
the token budget. Recursive and MoR models get continuous *depth-wise* batching: an iteration runs one call
of the shared block over work items at different recursion steps; a token that exits goes on to the coda,
head and sampling, and its place is taken by another request's next token entering after the prelude.

Outputs equal decoding each request alone (greedy; tests/test_serving.py checks it in float64), whatever
the arrival order, batch limits, block size or preemptions.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from adaptive.model.transformer import AdaptiveLM
from adaptive.serving.block_manager import BlockManager
from adaptive.serving.compiled import DecodeGraphs
from adaptive.serving.kv_pool import KVPool
from adaptive.serving.model_runner import ModelRunner
from adaptive.serving.sampling import SamplingParams, draw_seed
from adaptive.serving.scheduler import EngineConfig, IterationPlan, Scheduler
from adaptive.serving.sequence import Completion, Group, Request, Status, TokenEvent
from adaptive.serving.stats import EngineStats
from adaptive.serving.text import TextTracker


def batching_mode(model: AdaptiveLM) -> str:
    """How the engine batches ``model``, in words (and why it falls back to per-step batching)."""
    if not model.plan.steps:
        return "continuous sequence batching (no recursion steps)"
    groups, note = model.engine.shared_step_groups()
    if note is None:
        return "continuous depth-wise batching: every recursion step shares one call of the block"
    return f"per-step batching ({len(groups)} calls per iteration): {note}"


class ServingEngine:
    def __init__(self, model: AdaptiveLM, config: EngineConfig | None = None, *, tokenizer=None,
                 eos_id: int | None = None):
        self.config = config = config or EngineConfig()
        self.model = model.eval()
        plan, mc = model.plan, model.config
        self.max_len = config.max_len or mc.max_seq_len
        num_slots = plan.num_logical
        bs = config.block_size
        num_blocks = config.num_blocks or config.max_batch * -(-self.max_len // bs) * num_slots
        self.blocks = BlockManager(num_blocks, bs, config.max_batch, num_slots, self.max_len)
        device, dtype = model.embed.weight.device, model.embed.weight.dtype
        self.pool = KVPool(num_blocks, bs, mc.num_kv_heads, mc.head_dim, dtype, device)
        arena = config.max_batch + config.max_tokens_per_iteration * (plan.num_steps + 1)
        self.attention_path = config.attention_path(device)
        graphs = DecodeGraphs(model.engine, self.pool, config.max_batch, self.blocks.max_blocks, self.max_len) \
            if config.compile else None
        self.runner = ModelRunner(model, self.blocks, self.pool, config.max_batch, arena, self.attention_path,
                                  chosen=config.paged_attention == "flex", graphs=graphs)
        r = self.runner
        self.scheduler = Scheduler(config, self.blocks, r, plan.num_steps, [list(l) for l in model.engine.step_layers],
                                   r.prelude, r.coda, r.writes)
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.requests: dict[str, Request] = {}
        self.completions: dict[str, Completion] = {}
        self.texts: dict[str, TextTracker] = {}
        self.stats = EngineStats(plan.num_steps, self.pool.bytes_per_entry, model.engine.step_layers)
        self._ids = itertools.count()

    @property
    def batching(self) -> str:
        return batching_mode(self.model)

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt: list[int], params: SamplingParams | None = None, *, request_id: str | None = None,
                    arrival: float | None = None, on_token: Callable[[TokenEvent], None] | None = None) -> str:
        """Queue a request (``arrival``: when it may start, ``time.perf_counter()`` clock; default now)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        self.check_request(prompt, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        q = Request(request_id, prompt, params, params.seed if params.seed is not None else draw_seed(),
                    time.perf_counter() if arrival is None else arrival, on_token)
        self.requests[request_id] = q
        if self.tokenizer is not None:
            self.texts[request_id] = TextTracker(self.tokenizer, params.stop)
        waiting = self.scheduler.waiting
        waiting.insert(next((i for i, w in enumerate(waiting) if w.arrival > q.arrival and not w.preemptions),
                            len(waiting)), q)
        return request_id

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` naming the field when the engine could never serve this request (reads only
        the engine's fixed limits, so any thread may call it)."""
        vocab = self.model.vocab_size
        if not prompt:
            raise ValueError("prompt: a request needs at least one token")
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt: token ids must be in [0, {vocab}) (the model's vocabulary)")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt: {len(prompt)} tokens leave no room in the context of {self.max_len} tokens "
                             f"(prompt + max_tokens must fit)")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"max_tokens: a prompt of {len(prompt)} tokens plus max_tokens={params.max_tokens} "
                             f"exceeds the context of {self.max_len} tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need the engine's tokenizer (use stop_token_ids without one)")
        worst = -(-(len(prompt) + params.max_tokens) // self.blocks.block_size) * self.blocks.num_slots
        if worst > self.blocks.num_blocks:
            raise ValueError(f"max_tokens: the request may need {worst} KV blocks at full depth, more than the pool's "
                             f"{self.blocks.num_blocks}; raise num_blocks or shorten it")

    def abort(self, request_id: str) -> None:
        """Stop a request now (between iterations): its blocks are freed, its tokens so far kept."""
        q = self.requests.get(request_id)
        if q is None or q.status is Status.FINISHED:
            return
        if q in self.scheduler.waiting:
            self.scheduler.waiting.remove(q)
        self._complete(q, "abort")

    def pop_finished(self, request_id: str) -> Completion:
        """Hand back a finished request's completion and forget the request (a long-running server calls
        this for every request, so the engine holds nothing of finished work)."""
        self.requests.pop(request_id)
        return self.completions.pop(request_id)

    def has_unfinished(self) -> bool:
        return any(q.status is not Status.FINISHED for q in self.requests.values())

    def next_arrival(self) -> float | None:
        waiting = [q.arrival for q in self.scheduler.waiting]
        return min(waiting) if waiting else None

    # ------------------------------------------------------------------ one iteration

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        plan = self.scheduler.plan(time.perf_counter())
        runner = self.runner
        runner.fill(plan.fills)
        self._finish(plan.finishing)
        admitted = [g for g, _ in plan.admitted]
        runner.admit(admitted, [ids for _, ids in plan.admitted])
        if self.model.plan.steps:
            last = runner.block_calls(plan.continuing + admitted)
        else:
            last = admitted
        results = runner.sync()
        events = self._update(plan, last, results)
        self.blocks.trim_reserved()
        self.stats.iteration(self.blocks, len(plan.preempted))
        return events

    def _finish(self, groups: list[Group]) -> None:
        self.runner.finish(groups)
        for g in groups:
            g.request.num_sampled += g.samples

    def _update(self, plan: IterationPlan, last: list[Group], results) -> list[TokenEvent]:
        now = time.perf_counter()
        done = plan.finishing
        for g in last:  # ran their last step: coda, head and sampling at the start of the next iteration
            g.finished = True
        self.step0_commits: list[tuple[int, int]] = []
        for kind, meta, values in results:  # routing first: a group's depths are final before its token
            if kind == "selected":
                self._routed(*meta, values)
        if self.step0_commits:
            rows, counts = np.array(self.step0_commits, dtype=np.int64).T
            slots = np.asarray(self.model.engine.step_layers[0], dtype=np.int64)
            self.blocks.commit(np.repeat(rows, len(slots)), np.tile(slots, len(rows)), np.repeat(counts, len(slots)))
        for g in done:
            if not g.cancelled:
                self.stats.group_done(g)
        events: list[TokenEvent] = []
        for kind, meta, values in results:
            if kind == "sampled":
                events += [self._sampled(g, token, now) for g, token in zip(meta, values)
                           if g.request.status is not Status.FINISHED]
        for g in done:
            self._group_done(g)
        return events

    def _routed(self, step: int, rows: list[tuple[Group, np.ndarray]], flags: list[int]) -> None:
        """Take the decisions at ``step`` for the tokens ``rows`` (group, offsets): who runs it, who exited."""
        flags_N = np.asarray(flags, dtype=bool)
        commit_step0 = step == 0 and self.runner.writes[0] == "selected"  # written on the device, counted now
        start = 0
        for g, offsets in rows:
            f = flags_N[start:start + len(offsets)]
            start += len(offsets)
            if g.cancelled:
                continue
            live = offsets[f]
            if self.runner.hierarchical:
                was = g.live_mask[offsets]
                gone_mask = was & ~f
                if gone_mask.any():  # exited at ``step``; step 0's keys/values were written in its block call
                    g.exits.append((offsets[gone_mask], step if step > 0 else 1))
                g.live_mask[offsets] = f
                g.depth_T[live] = step + 1
            else:  # independent routing: a token skipped at ``step`` owes only its keys/values there, and goes on
                if step > 0 and not f.all():
                    g.exits.append((offsets[~f], step))
                g.depth_T[live] += 1
                g.step_runs[step] = g.step_runs.get(step, 0) + len(live)
            if commit_step0:
                self.step0_commits.append((g.request.row, len(live)))
            g.live, g.step = live, step
            if not len(live) and (self.runner.hierarchical or step + 1 == self.runner.num_steps):
                g.finished = True

    def _sampled(self, g: Group, token: int, now: float) -> TokenEvent:
        q = g.request
        q.token_times.append(now)
        depth = int(g.depth_T[-1])
        reason = self._stop_reason(q, token)
        emitted = token if reason is None else None
        if emitted is not None:
            q.output.append(token)
            q.depths.append(depth)
        try:  # host-side work of this request alone: a failure here fails it, not its batch-mates
            reason, text = self._text(q, emitted, reason)
            event = TokenEvent(q.id, emitted, text, depth, reason is not None, reason)
            if q.on_token is not None:
                q.on_token(event)
        except Exception as exc:  # noqa: BLE001 - reported as the request's error
            q.error = f"{type(exc).__name__}: {exc}"
            event, reason = TokenEvent(q.id, None, "", depth, True, "error"), "error"
        if reason is not None:
            self._complete(q, reason)
        return event

    def _text(self, q: Request, emitted: int | None, reason: str | None) -> tuple[str | None, str]:
        """The finish reason after ``emitted`` and the text it adds (all held-back text once it finishes)."""
        tracker = self.texts.get(q.id)
        text = tracker.add(emitted) if tracker is not None else ""
        if reason is None and tracker is not None and tracker.stopped is not None:
            reason, q.stop_reason = "stop", tracker.stopped
        if reason is None and len(q.output) >= q.params.max_tokens:
            reason = "length"
        if reason is not None and tracker is not None and emitted is not None:
            text += tracker.add(None)
        return reason, text

    def _stop_reason(self, q: Request, token: int) -> str | None:
        params = q.params
        if token in params.stop_token_ids or (token == self.eos_id and not params.ignore_eos):
            q.stop_reason = token
            return "stop"
        return None

    def _group_done(self, g: Group) -> None:
        q = g.request
        if g.cancelled or q.status is not Status.RUNNING:
            return
        self.runner.give_arena(g.arena)
        g.cancelled = True  # its arena rows are back in the pool
        q.done_cols = g.start + g.length
        if q.group is g:
            q.group, q.next_group = q.next_group, None

    def _complete(self, q: Request, reason: str) -> None:
        self.scheduler.finish(q)
        q.status, q.finish_reason = Status.FINISHED, reason
        text = self.texts.pop(q.id).text if q.id in self.texts else None
        self.completions[q.id] = Completion(q.id, q.prompt, list(q.output), text, reason, list(q.depths), q.arrival,
                                            list(q.token_times), q.stop_reason,
                                            [t.cpu() for t in q.logits] if q.params.return_logits else None,
                                            q.preemptions, q.error)

    # ------------------------------------------------------------------ whole workloads

    def run(self) -> Iterator[TokenEvent]:
        """Step until every request has finished, yielding tokens as they come (waits for late arrivals)."""
        while self.has_unfinished():
            events = self.step()
            yield from events
            if not events and not self._busy():
                upcoming = self.next_arrival()
                if upcoming is not None:
                    time.sleep(max(0.0, min(upcoming - time.perf_counter(), 0.05)))

    def _busy(self) -> bool:
        return any(q.status is Status.RUNNING for q in self.requests.values())

    def generate(self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run ``prompts`` to completion (all arriving now) and return their completions in order."""
        prompts = list(prompts)
        each = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, s) for p, s in zip(prompts, each)]
        for _ in self.run():
            pass
        return [self.completions.pop(i) for i in ids]

    def stream(self, prompts: Iterable[list[int]], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Run ``prompts`` and yield each token as it is produced."""
        for p in prompts:
            self.add_request(p, params)
        yield from self.run()

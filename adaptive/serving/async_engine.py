"""The serving engine for asyncio callers: one thread steps the engine, coroutines await their tokens.

``ServingEngine`` is synchronous and single-threaded: an iteration plans, runs the model and samples.
``AsyncEngine`` gives it a thread of its own. A coroutine ``submit``s the prompts of one HTTP request and
reads their token events from one ``Exchange``; ``abort`` drops them (a client that went away). Commands reach the engine thread through a
queue and are applied between iterations, so the engine itself is only ever touched by that thread, and
the HTTP server's event loop never waits on the model.

Failures stay as small as they can be:
- a request whose own host-side work fails (detokenising, a stop string) ends with ``finish_reason="error"``
  inside the engine, and its batch-mates carry on;
- an iteration that raises fails the requests in flight, and the engine is rebuilt from the same model for
  the requests still waiting and every later one.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from adaptive.serving.engine import ServingEngine
from adaptive.serving.sampling import SamplingParams
from adaptive.serving.sequence import Completion, Status, TokenEvent


@dataclass
class Failed:
    """The end of a request that could not be served: ``status`` is the HTTP status it maps to."""

    request_id: str
    status: int
    message: str


Item = TokenEvent | Completion | Failed  # each engine request sends token events, then one Completion or Failed


@dataclass
class Exchange:
    """The engine requests of one caller (one per prompt) and the one queue their items arrive on."""

    ids: list[str]
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: set[str] = field(default_factory=set)

    def put(self, item: Item) -> None:  # from the engine thread
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    async def get(self) -> Item:
        item = await self.items.get()
        if isinstance(item, (Completion, Failed)):
            self.ended.add(item.request_id)
        return item

    @property
    def done(self) -> bool:
        return len(self.ended) == len(self.ids)


@dataclass(frozen=True)
class Snapshot:
    """The engine's state after its latest iteration, published for ``/metrics`` (read by any thread)."""

    running: int = 0
    waiting: int = 0
    blocks_in_use: int = 0
    blocks_total: int = 0
    kv_bytes_in_use: int = 0
    kv_bytes_reserved: int = 0
    iterations: int = 0
    preemptions: int = 0
    depth_hist: tuple[int, ...] = ()
    engine_restarts: int = 0


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], ServingEngine]):
        self.make_engine = make_engine
        self.engine = make_engine()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.exchanges: dict[str, Exchange] = {}  # engine request id -> its caller's exchange; engine thread only
        self.snapshot = Snapshot(blocks_total=self.engine.blocks.num_blocks)
        self.restarts = 0
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adaptive-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abort whatever is left, and end the engine thread."""
        self._stop.set()
        self.commands.put(("wake", None))
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ callers (the event loop)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """``ValueError`` naming the field when the engine could never serve this request."""
        self.engine.check_request(prompt, params)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> Exchange:
        base = f"cmpl-{next(self._ids)}-{time.time_ns() % 10**6}"
        exchange = Exchange([f"{base}-{i}" for i in range(len(prompts))], sum(map(len, prompts)),
                            asyncio.get_running_loop())
        for request_id, prompt, p in zip(exchange.ids, prompts, params):
            self.commands.put(("add", (exchange, request_id, prompt, p)))
        return exchange

    def abort(self, exchange: Exchange) -> None:
        for request_id in exchange.ids:
            if request_id not in exchange.ended:
                self.commands.put(("abort", request_id))

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_commands(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished() and not self._stop.is_set():
                self._iterate()
            self._publish()
        for request_id in list(self.exchanges):
            self._fail(request_id, 503, "the server is shutting down")
        self._publish()

    def _take_commands(self, block: bool) -> None:
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
            while True:
                self._apply(*command)
                command = self.commands.get_nowait()
        except queue.Empty:
            return

    def _apply(self, kind: str, payload) -> None:
        if kind == "add":
            exchange, request_id, prompt, params = payload
            try:
                self.engine.add_request(prompt, params, request_id=request_id)
            except ValueError as exc:
                exchange.put(Failed(request_id, 400, str(exc)))
                return
            self.exchanges[request_id] = exchange
        elif kind == "abort" and payload in self.exchanges:
            self.engine.abort(payload)
            self.exchanges.pop(payload)
            self.engine.pop_finished(payload)

    def _iterate(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - the iteration is lost; the server is not
            self._restart(f"{type(exc).__name__}: {exc}")
            return
        for event in events:
            exchange = self.exchanges.get(event.request_id)
            if exchange is None:
                continue
            exchange.put(event)
            if event.finished:
                exchange.put(self.engine.pop_finished(event.request_id))
                del self.exchanges[event.request_id]

    def _restart(self, error: str) -> None:
        """Fail the requests that were running, and carry those still waiting over to a fresh engine."""
        old = self.engine
        waiting = [q for q in old.scheduler.waiting if not q.output and not q.preemptions]
        self.engine = self.make_engine()
        self.restarts += 1
        carried = set()
        for q in waiting:
            self.engine.add_request(q.prompt, q.params, request_id=q.id)
            carried.add(q.id)
        for request_id in [r for r in self.exchanges if r not in carried]:
            self._fail(request_id, 500, f"internal error while serving this request ({error})")

    def _fail(self, request_id: str, status: int, message: str) -> None:
        self.exchanges.pop(request_id).put(Failed(request_id, status, message))

    def _publish(self) -> None:
        engine = self.engine
        blocks, stats = engine.blocks, engine.stats
        entries = int(blocks.lengths.sum())
        running = sum(q.status is Status.RUNNING for q in engine.requests.values())
        self.snapshot = Snapshot(running, len(engine.scheduler.waiting), blocks.blocks_in_use, blocks.num_blocks,
                                 entries * stats.bytes_per_entry,
                                 blocks.blocks_in_use * blocks.block_size * stats.bytes_per_entry,
                                 stats.iterations, stats.preemptions, tuple(int(n) for n in stats.depth_hist),
                                 self.restarts)

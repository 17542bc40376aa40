"""``adaptive serve``: an OpenAI-compatible HTTP server on the serving engine (the optional ``serve`` extra).

Endpoints: ``POST /v1/completions`` (plain or streamed as server-sent events), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text). Every request goes through the one engine and its
scheduler (``AsyncEngine``); this module only speaks HTTP.

Under load and faults:
- at most ``max_batch + max_queued`` engine requests are accepted at once; past that, 429 with a JSON error;
- a client that disconnects cancels its request, and its KV blocks are freed at the next iteration;
- SIGTERM (or Ctrl-C) drains: new requests get 503, those in flight finish (within ``drain_timeout``,
  after which they are cancelled), then the process exits 0; a second signal stops at once;
- a request that fails (bad input: 400 naming the field; an internal error: 500) fails alone.
It binds to 127.0.0.1 unless told otherwise, without auth; ``api_key`` makes every endpoint but
``/health`` require ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import time

from pydantic import BaseModel, ConfigDict, Field

from adaptive.serving.api import (APIError, chunk_body, choice, completion_body, parse_request, prompts_of,
                                  sampling_params, sse, usage)
from adaptive.serving.async_engine import AsyncEngine, Exchange, Failed
from adaptive.serving.engine import ServingEngine
from adaptive.serving.generate import LLM
from adaptive.serving.metrics import ServerMetrics
from adaptive.serving.sequence import Completion, TokenEvent

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("adaptive serve needs the `serve` extra: pip install -e '.[serve]'") from exc


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="address to bind (loopback by default)")
    port: int = Field(default=8000, ge=0, le=65535, description="port (0: any free port)")
    model_name: str = Field(default="adaptive", min_length=1, description="the name /v1/models reports")
    max_queued: int = Field(default=256, ge=0, description="requests waiting beyond the running batch; more get 429")
    drain_timeout: float = Field(default=30.0, ge=0, description="seconds in-flight requests get after SIGTERM")
    api_key: str | None = Field(default=None, min_length=1, description="required as a bearer token, if set")


class Service:
    """The state behind the endpoints: the model's engine, the counters, and whether it is draining."""

    def __init__(self, llm: LLM, settings: ServerSettings):
        self.llm, self.settings = llm, settings
        config, tokenizer, eos = llm.engine.config, llm.tokenizer, llm.engine.eos_id
        self.engine = AsyncEngine(lambda: ServingEngine(llm.model, config, tokenizer=tokenizer, eos_id=eos))
        self.capacity = config.max_batch + settings.max_queued
        self.metrics = ServerMetrics()
        self.draining = False
        self.created = int(time.time())

    # ------------------------------------------------------------------ admission

    def accept(self, raw: bytes) -> tuple[Exchange, bool, bool, bool]:
        """Parse, check and submit a completion request: (its exchange, stream?, depths?, usage in stream?)."""
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests")
        request = parse_request(raw)
        if request.model is not None and request.model != self.settings.model_name:
            raise APIError(404, f"model: {request.model!r} is not served here (this server serves "
                           f"{self.settings.model_name!r})", "model")
        prompts, params = [], []
        listed = prompts_of(request)
        if len(listed) > self.capacity:
            raise APIError(400, f"prompt: {len(listed)} prompts in one request; this server takes at most "
                           f"{self.capacity} at once (--max-batch + --max-queued)", "prompt")
        for i, prompt in enumerate(listed):
            try:
                tokens = self.llm.encode(prompt)
                p = sampling_params(request, i)
                self.engine.check(tokens, p)
            except ValueError as exc:
                field = str(exc).split(":")[0]
                raise APIError(400, str(exc), field if field.isidentifier() else None) from None
            prompts.append(tokens)
            params.append(p)
        if self.metrics.active + len(prompts) > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.capacity} requests running or queued; "
                           f"--max-queued sets the queue); retry later")
        self.metrics.active += len(prompts)
        self.metrics.prompt_tokens += sum(map(len, prompts))
        exchange = self.engine.submit(prompts, params)
        with_usage = request.stream_options is not None and request.stream_options.include_usage
        return exchange, request.stream, request.return_depths, with_usage

    def release(self, exchange: Exchange, outcome: str | None) -> None:
        """The HTTP request is over: cancel what is still running and count it."""
        if not exchange.done:
            self.engine.abort(exchange)
            outcome = outcome or "cancelled"
        self.metrics.active -= len(exchange.ids)
        self.metrics.requests[outcome or "ok"] += 1

    # ------------------------------------------------------------------ results

    async def collect(self, exchange: Exchange, request: Request) -> dict[str, Completion]:
        """Wait for every completion of ``exchange``, or stop when the client goes away."""
        results: dict[str, Completion | Failed] = {}

        async def consume() -> None:
            while not exchange.done:
                item = await exchange.get()
                if isinstance(item, TokenEvent):
                    self.metrics.generation_tokens += item.token is not None
                else:
                    results[item.request_id] = item

        consumer, watcher = asyncio.ensure_future(consume()), asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        for task in (consumer, watcher):
            task.cancel()
        if not exchange.done:
            raise ClientGone()
        return {i: _completed(results[i]) for i in exchange.ids}

    async def events(self, exchange: Exchange, depths: bool, with_usage: bool):
        """Server-sent events of ``exchange``: OpenAI text-completion chunks, then ``[DONE]``."""
        index = {request_id: i for i, request_id in enumerate(exchange.ids)}
        name, cid, generated = self.settings.model_name, exchange.ids[0].rsplit("-", 1)[0], 0
        while not exchange.done:
            item = await exchange.get()
            i = index[item.request_id]
            if isinstance(item, TokenEvent):
                if item.token is None and not item.text:
                    continue
                generated += item.token is not None
                self.metrics.generation_tokens += item.token is not None
                d = [item.depth] if depths and item.token is not None else [] if depths else None
                yield sse(chunk_body(cid, name, [choice(i, item.text, None, d)]))
            else:
                c = _completed(item)
                yield sse(chunk_body(cid, name, [choice(i, "", c.finish_reason, [] if depths else None)]))
        if with_usage:
            yield sse(chunk_body(cid, name, [], usage(exchange.prompt_tokens, generated)))
        yield sse("[DONE]")


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


def _completed(item: Completion | Failed) -> Completion:
    if isinstance(item, Failed):
        raise APIError(item.status, item.message)
    if item.finish_reason == "error":
        raise APIError(500, f"internal error while serving this request ({item.error})")
    return item


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


class EngineStreamResponse(StreamingResponse):
    """A streamed response that always releases its requests, however the stream ends: done, failed, or
    cancelled by a disconnect before or after it started."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    app = FastAPI(title="adaptive", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    settings = service.settings

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        key = settings.api_key
        if key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                if request.url.path == "/v1/completions":
                    service.metrics.requests["invalid"] += 1
                return _error(APIError(401, "authorization: a valid `Authorization: Bearer <api key>` header is "
                                       "required", "authorization"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.get("/health")
    async def health():
        status = "draining" if service.draining else "ok"
        return JSONResponse({"status": status}, status_code=503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(service.engine.snapshot, settings.model_name),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": service.created,
                                            "owned_by": "adaptive", "max_model_len": service.llm.engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            exchange, stream, depths, with_usage = service.accept(await _body(request))
        except APIError as exc:
            service.metrics.requests["invalid" if exc.status < 429 else "rejected"] += 1
            return _error(exc)
        if stream:
            outcome = {"value": None}
            return EngineStreamResponse(_guarded(service.events(exchange, depths, with_usage), outcome),
                                        lambda: service.release(exchange, outcome["value"]))
        outcome = None
        try:
            done = await service.collect(exchange, request)
            return completion_body(exchange.ids[0].rsplit("-", 1)[0], settings.model_name,
                                   [done[i] for i in exchange.ids], depths)
        except APIError as exc:
            outcome = "error"
            return _error(exc)
        except ClientGone:
            outcome = "cancelled"
            return _error(APIError(499, "the client disconnected before the response"))
        finally:
            service.release(exchange, outcome)

    return app


async def _guarded(events, outcome: dict):
    """Stream ``events``; an error mid-stream becomes a final ``{"error": ...}`` event (how OpenAI streams fail)."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        outcome["value"] = "error"
        yield sse(exc.body())


MAX_BODY_BYTES = 4 << 20  # far beyond any prompt that fits a context; a larger body is refused unread


async def _body(request: Request) -> bytes:
    """The request body, read up to ``MAX_BODY_BYTES`` (413 past that, before it is all in memory)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"body: larger than {MAX_BODY_BYTES} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT draining the engine first (a second signal stops at once)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_started is not None:  # a second signal: stop now
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self.service.draining = True
        self.drain_started = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if self.service.metrics.active == 0:
                self.should_exit = True
            elif waited > self.service.settings.drain_timeout:
                self.should_exit = True  # what is left is cancelled by the shutdown
        return await super().on_tick(counter)


def serve(llm: LLM, settings: ServerSettings, *, log_level: str = "info") -> None:
    """Serve ``llm`` until drained by SIGTERM or Ctrl-C."""
    service = Service(llm, settings)
    config = uvicorn.Config(create_app(service), host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingServer(config, service)
    server.run()

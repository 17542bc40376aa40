"""``adaptive serve``: the openai client against a real server on 127.0.0.1, bad requests, disconnects,
capacity, failures that stay with one request, the API key, and SIGTERM draining a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx comes with the `serve` extra's clients")
openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")
import uvicorn  # noqa: E402

from adaptive.serving import LLM, EngineConfig, SamplingParams, ServingEngine  # noqa: E402
from adaptive.serving import text as text_module  # noqa: E402
from adaptive.serving.server import DrainingServer, ServerSettings, Service, create_app  # noqa: E402
from test_cli import run_main  # noqa: E402
from test_generate import trained_run  # noqa: E402,F401  (a fixture: a 3-step MoR-3 run)

pytestmark = pytest.mark.xdist_group("server")  # one file's servers at a time on the 2 CI cores
PROMPTS = ["The history of", "A", "In 1990 the"]


@pytest.fixture(scope="module")
def llm(trained_run) -> LLM:
    return LLM.from_run(trained_run, device="cpu")


def offline(llm: LLM, prompt: str, max_tokens: int) -> str:
    fresh = LLM(llm.model, llm.tokenizer)
    return fresh.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0))[0].text


class Running:
    """A server on 127.0.0.1 (any free port) in a thread of this process."""

    def __init__(self, llm: LLM, max_batch: int | None = None, **settings):
        if max_batch is not None:
            llm = LLM(llm.model, llm.tokenizer, EngineConfig(max_batch=max_batch))
        self.service = Service(llm, ServerSettings(port=0, model_name="test", **settings))
        config = uvicorn.Config(create_app(self.service), host="127.0.0.1", port=0, log_level="warning")
        self.server = DrainingServer(config, self.service)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)

    def metrics(self, headers=None) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=headers).text
        return {line.rsplit(" ", 1)[0].replace('{model="test"}', "").replace('model="test",', ""):
                float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture
def slow_steps(monkeypatch):
    """Each engine iteration takes at least 20 ms, so a request is surely in flight when the test acts."""
    step = ServingEngine.step

    def slow(self):
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(ServingEngine, "step", slow)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- openai client


def test_openai_client_greedy_equals_offline_generate(llm, trained_run, capsys):
    with Running(llm) as s:
        client = s.client()
        assert [m.id for m in client.models.list().data] == ["test"]
        got = client.completions.create(model="test", prompt=PROMPTS, max_tokens=12, temperature=0,
                                        extra_body={"return_depths": True})
        assert [c.index for c in got.choices] == [0, 1, 2]
        assert [c.text for c in got.choices] == [offline(llm, p, 12) for p in PROMPTS]
        depths = [c.model_extra["adaptive"]["depths"] for c in got.choices]
        assert got.usage.completion_tokens == sum(map(len, depths)) > 0
        assert got.usage.prompt_tokens == sum(len(llm.encode(p)) for p in PROMPTS)
        single = client.completions.create(model="test", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    code, out, err = run_main(capsys, "generate", str(trained_run), "--prompt", PROMPTS[0], "--max-new-tokens", "12",
                             "--temperature", "0", "--device", "cpu")
    assert code == 0, err
    assert out.rstrip("\n") == PROMPTS[0] + single.choices[0].text  # the `adaptive generate` line, offline


def test_streamed_chunks_concatenate_to_the_plain_text_and_depths(llm):
    with Running(llm) as s:
        client = s.client()
        body = {"return_depths": True}
        plain = client.completions.create(model="test", prompt=PROMPTS[0], max_tokens=10, temperature=0, extra_body=body)
        chunks = list(client.completions.create(model="test", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                                stream=True, extra_body=body))
    text = "".join(c.choices[0].text for c in chunks)
    depths = [d for c in chunks for d in c.choices[0].model_extra["adaptive"]["depths"]]
    assert text == plain.choices[0].text
    assert depths == plain.choices[0].model_extra["adaptive"]["depths"] and len(depths) == plain.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stop_strings_are_never_streamed_past(llm):
    full = offline(llm, PROMPTS[0], 12)
    stop = full[3:5]
    assert len(stop) == 2, "the greedy text is too short to pick a stop string from"
    with Running(llm) as s:
        client = s.client()
        chunks = list(client.completions.create(model="test", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "x", ', "body"),
    (b'["not", "an", "object"]', "body"),
    (json.dumps({"prompt": "x", "best_of": 2}).encode(), "best_of"),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"prompt": "x", "max_tokens": "8"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "stream": 1}).encode(), "stream"),
    (json.dumps({"prompt": 3}).encode(), "prompt"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": -3}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": 10_000}).encode(), "max_tokens"),
    (json.dumps({"prompt": [1] * 500}).encode(), "prompt"),
    (json.dumps({"prompt": "x", "temperature": -0.5}).encode(), "temperature"),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "x", "n": 2}).encode(), "n"),
    (json.dumps({"prompt": [10**9]}).encode(), "prompt"),
    (json.dumps({"max_tokens": 3}).encode(), "prompt"),
])
def test_a_bad_request_is_a_400_naming_the_field(llm, body, field):
    with Running(llm) as s:
        r = httpx.post(s.url + "/v1/completions", content=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and error["message"].startswith(field), error
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200  # and the server goes on serving


def test_an_oversized_body_and_too_many_prompts_are_refused_before_any_work(llm):
    from adaptive.serving.server import MAX_BODY_BYTES

    with Running(llm, max_queued=2) as s:
        big = httpx.post(s.url + "/v1/completions", content=b'{"prompt": "' + b"x" * (MAX_BODY_BYTES + 1) + b'"}')
        assert big.status_code == 413 and big.json()["error"]["param"] == "body"
        many = httpx.post(s.url + "/v1/completions", json={"prompt": ["x"] * (32 + 2 + 1)})
        assert many.status_code == 400 and many.json()["error"]["param"] == "prompt"
        assert s.metrics()['adaptive_requests_total{outcome="invalid"}'] == 2


def test_an_unknown_model_is_a_404(llm):
    with Running(llm) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": "gpt-5", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# ---------------------------------------------------------------------------------------------- load and faults


def test_a_disconnect_cancels_the_request_and_frees_its_blocks(llm, slow_steps):
    with Running(llm) as s:
        body = {"prompt": "The", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            wait_for(lambda: s.metrics()["adaptive_kv_blocks_in_use"] > 0)
        wait_for(lambda: s.metrics()['adaptive_requests_total{outcome="cancelled"}'] == 1)
        wait_for(lambda: s.metrics()["adaptive_kv_blocks_in_use"] == 0 and s.metrics()["adaptive_requests_running"] == 0)
        processed = sum(v for k, v in s.metrics().items() if k.startswith("adaptive_tokens_by_depth_total"))
        assert processed < 50  # the engine stopped it: run to the end, it would have processed 100+ tokens


def test_past_the_queue_bound_requests_get_429(llm, slow_steps):
    with Running(llm, max_batch=1, max_queued=1) as s:  # one running, one queued
        body = {"prompt": "The", "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as a, \
                httpx.stream("POST", s.url + "/v1/completions", json=body) as b:
            for r in (a, b):
                assert r.status_code == 200
            third = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert third.status_code == 429 and "capacity" in third.json()["error"]["message"]
            assert s.metrics()['adaptive_requests_total{outcome="rejected"}'] == 1
            done = ["".join(line for line in r.iter_lines()) for r in (a, b)]
        assert all(d.endswith("data: [DONE]") for d in done)


def test_a_failing_request_fails_alone(llm, monkeypatch):
    """A request whose own host-side work raises gets a 500; its batch-mate's output is unchanged."""
    add = text_module.TextTracker.add

    def boom(self, token):
        if "BOOM" in self.stops:
            raise RuntimeError("injected detokeniser failure")
        return add(self, token)

    monkeypatch.setattr(text_module.TextTracker, "add", boom)
    expected = offline(llm, PROMPTS[0], 16)
    with Running(llm) as s:
        results = {}

        def send(name, extra):
            results[name] = httpx.post(s.url + "/v1/completions", timeout=60,
                                       json={"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, **extra})

        threads = [threading.Thread(target=send, args=a) for a in (("good", {}), ("bad", {"stop": ["BOOM"]}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["bad"].status_code == 500 and "injected" in results["bad"].json()["error"]["message"]
        assert results["good"].status_code == 200 and results["good"].json()["choices"][0]["text"] == expected
        assert s.metrics()['adaptive_requests_total{outcome="error"}'] == 1


def test_a_failed_iteration_fails_its_requests_and_the_engine_is_rebuilt(llm, monkeypatch):
    step, calls = ServingEngine.step, {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected device error")
        return step(self)

    monkeypatch.setattr(ServingEngine, "step", flaky)
    with Running(llm) as s:
        first = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 8, "temperature": 0})
        assert first.status_code == 500 and "injected device error" in first.json()["error"]["message"]
        again = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == offline(llm, PROMPTS[0], 8)
        assert s.metrics()["adaptive_engine_restarts_total"] == 1


def test_the_api_key_guards_every_endpoint_but_health(llm):
    with Running(llm, api_key="s3cret") as s:
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
            r = httpx.request(method, s.url + path, json={"prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["param"] == "authorization", path
        assert httpx.get(s.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        got = s.client(api_key="s3cret").completions.create(model="test", prompt="x", max_tokens=3, temperature=0)
        assert len(got.choices) == 1


def test_draining_refuses_new_requests_and_finishes_those_in_flight(llm, slow_steps):
    with Running(llm) as s:
        body = {"prompt": "The", "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            s.server.handle_exit(signal.SIGTERM, None)
            refused = httpx.post(s.url + "/v1/completions", json={"prompt": "x"})
            assert refused.status_code == 503 and httpx.get(s.url + "/health").status_code == 503
            rest = [line for line in lines if line.startswith("data:")]
        chunks = [json.loads(line[5:]) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"][0]["finish_reason"] is None) == 40
        s.thread.join(timeout=20)
        assert not s.thread.is_alive()  # drained, then stopped by itself


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_drains_a_real_server_which_then_exits_0(trained_run):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adaptive", "serve", str(trained_run), "--port", str(port),
                             "--device", "cpu", "--max-batch", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(url), timeout=60)
        body = {"prompt": "The", "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_binds_to_loopback_by_default():
    assert ServerSettings().host == "127.0.0.1"


def test_serve_refuses_a_missing_run_with_one_line(capsys, tmp_path):
    code, _, err = run_main(capsys, "serve", str(tmp_path / "nope"))
    assert code == 2 and "neither a run directory" in err and "Traceback" not in err

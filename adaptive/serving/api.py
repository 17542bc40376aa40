"""The OpenAI completions API, as ``adaptive serve`` speaks it: the request body, the responses, the errors.

A request body is checked strictly (unknown fields, wrong types and out-of-range values are a 400 naming
the field), then mapped onto ``SamplingParams``. Responses follow OpenAI's ``text_completion`` objects; a
choice carries a non-standard ``adaptive`` field with the recursion depth behind each generated token when
the request sets ``return_depths``.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adaptive.serving.sampling import SamplingParams
from adaptive.serving.sequence import Completion

PromptType = str | list[str] | list[int] | list[list[int]]
PROMPT_HELP = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. Fields beyond OpenAI's: ``top_k``, ``ignore_eos``, ``return_depths``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(default=None, description="the served model's name (`GET /v1/models`); optional")
    prompt: PromptType = Field(description=PROMPT_HELP + "; text is encoded as in training (separator first)")
    max_tokens: int = Field(default=16, description="most tokens to generate (≥ 1; prompt + max_tokens ≤ context)")
    temperature: float = Field(default=1.0, description="≥ 0; 0 is greedy")
    top_p: float = Field(default=1.0, description="nucleus mass in (0, 1]")
    top_k: int = Field(default=0, description="sample among the k most likely tokens; 0 or -1: all")
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings that end the text")
    seed: int | None = Field(default=None, description="seed of the samples (≥ 0); prompt i uses seed + i")
    n: int = Field(default=1, description="completions per prompt; only 1")
    stream: bool = Field(default=False, description="server-sent events in OpenAI's chunk format")
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="keep going past the end-of-text token")
    return_depths: bool = Field(default=False, description="add `adaptive.depths` to each choice")
    user: str | None = Field(default=None, description="accepted and ignored")


def parse_request(raw: bytes) -> CompletionRequest:
    """The body as a ``CompletionRequest``, or an ``APIError`` (400) naming the field at fault."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"body: malformed JSON ({exc})", "body") from None
    if not isinstance(body, dict):
        raise APIError(400, "body: must be a JSON object", "body")
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise APIError(400, *_describe(exc.errors()[0])) from None
    _check_values(request)
    return request


def _describe(error: dict) -> tuple[str, str | None]:
    field = str(error["loc"][0]) if error["loc"] else "body"
    if error["type"] == "extra_forbidden":
        known = ", ".join(CompletionRequest.model_fields)
        return f"{field}: unknown field (supported: {known})", field
    if field == "prompt":
        return f"prompt: must be {PROMPT_HELP}", field
    return f"{field}: {error['msg'].lower()}", field


def _check_values(r: CompletionRequest) -> None:
    checks = [("max_tokens", r.max_tokens >= 1, "must be at least 1"),
              ("temperature", r.temperature >= 0, "must be ≥ 0 (0 is greedy)"),
              ("top_p", 0 < r.top_p <= 1, "must be in (0, 1]"),
              ("top_k", r.top_k >= -1, "must be ≥ 0 (0 or -1: no limit)"),
              ("seed", r.seed is None or r.seed >= 0, "must be ≥ 0"),
              ("n", r.n == 1, "only n=1 is supported"),
              ("stop", not isinstance(r.stop, list) or len(r.stop) <= 4, "at most 4 stop strings"),
              ("stop", r.stop != "" and "" not in (r.stop or []), "stop strings must be non-empty"),
              ("prompt", r.prompt != [] and r.prompt != "", "must not be empty")]
    for field, ok, message in checks:
        if not ok:
            raise APIError(400, f"{field}: {message}", field)


def prompts_of(r: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, each a string or a list of token ids."""
    p = r.prompt
    if isinstance(p, str):
        return [p]
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def sampling_params(r: CompletionRequest, index: int) -> SamplingParams:
    stops = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    return SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, top_k=max(r.top_k, 0),
                          stop=stops, seed=None if r.seed is None else r.seed + index, ignore_eos=r.ignore_eos)


def choice(index: int, text: str, finish_reason: str | None, depths: list[int] | None) -> dict:
    out = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if depths is not None:
        out["adaptive"] = {"depths": depths}
    return out


def completion_body(request_id: str, model: str, completions: list[Completion], with_depths: bool) -> dict:
    prompt_tokens = sum(len(c.prompt) for c in completions)
    generated = sum(len(c.tokens) for c in completions)
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice(i, c.text or "", c.finish_reason, c.depths if with_depths else None)
                        for i, c in enumerate(completions)],
            "usage": usage(prompt_tokens, generated)}


def chunk_body(request_id: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    out = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | Literal["[DONE]"]) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

"""The ``adaptive`` model of lm-evaluation-harness (the ``eval`` extra).

lm-evaluation-harness finds models only among the modules it has imported, so importing this module
registers the model; run the harness's command line through it::

    python -m adaptive.eval.lm_eval_adapter --model adaptive --model_args path=RUN_DIR --tasks ...

or, from Python, ``import adaptive.eval.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model="adaptive",
model_args="path=RUN_DIR", ...)``. ``model_args``: ``path`` (run, checkpoint or converted directory),
``device`` (auto), ``dtype`` (float32, float64 or bfloat16), ``max_length`` (default: the recipe's
``data.seq_len``), ``batch_tokens`` (tokens per scoring batch, 8192); the harness's ``--batch_size`` is the
number of requests the engine decodes at once.

``loglikelihood`` and ``loglikelihood_rolling`` go through ``adaptive.eval.scoring`` (the same routine as
``adaptive eval``'s tasks, batched by length); ``generate_until`` decodes greedily on the serving
engine (``adaptive.serving``: paged KV, continuous depth-wise batching, ``--batch_size`` requests at once)
and cuts the text at the first stop string.
"""

from __future__ import annotations

import sys
import warnings

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from adaptive.plugins import get_registry
from adaptive.serving.generate import LLM, resolve_device
from adaptive.serving.sampling import SamplingParams
from adaptive.serving.scheduler import EngineConfig
from adaptive.serving.loading import load_run

from adaptive.eval.scoring import encode, loglikelihood, rolling_pairs, score_pairs

DEFAULT_GEN_TOKENS = 256
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class AdaptiveHarnessLM(LM):
    def __init__(self, path: str, device: str | None = "auto", batch_size: int | str | None = None,
                 max_length: int | str | None = None, batch_tokens: int | str = 8192, dtype: str = "float32",
                 **ignored) -> None:
        super().__init__()
        if ignored:
            warnings.warn(f"lm_eval model adaptive ignores {', '.join(sorted(ignored))}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        device = device or "auto"
        if device.startswith("cuda") and not torch.cuda.is_available():  # the harness passes cuda by default
            warnings.warn(f"lm_eval model adaptive: device {device!r} is not available here; running on the CPU")
            device = "cpu"
        loaded = load_run(path, get_registry(), device=str(resolve_device(device)))
        self.model, self.tok, self.recipe = loaded.model.to(DTYPES[dtype]).eval(), loaded.tokenizer, loaded.recipe
        self._device = next(self.model.parameters()).device
        self.max_length = int(max_length) if max_length else loaded.recipe.data.seq_len
        self.batch_tokens = int(batch_tokens)
        auto = batch_size in (None, "auto") or str(batch_size).startswith("auto")
        self.batch_size = 16 if auto else int(batch_size)
        if min(self.max_length, self.batch_tokens, self.batch_size) < 1:
            raise ValueError("max_length, batch_tokens and batch_size must be >= 1")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        scores = loglikelihood(self.model, self.tok, pairs, max_len=self.max_length, batch_tokens=self.batch_tokens)
        out = [(s.logprob, s.is_greedy) for s in scores]
        for pair, result in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows = [rolling_pairs(encode(self.tok, req.args[0]), self.tok.separator_id, self.max_length)
                   for req in requests]
        flat = [pair for per_request in windows for pair in per_request]
        scores = iter(score_pairs(self.model, flat, max_len=self.max_length, batch_tokens=self.batch_tokens))
        out = [sum(next(scores).logprob for _ in per_request) for per_request in windows]
        for req, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(req.args), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params, stops = [], [], []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample"):
                warnings.warn("lm_eval model adaptive decodes greedily; do_sample is ignored")
            until = kwargs.get("until") or []
            stops.append([s for s in ([until] if isinstance(until, str) else until) if s])
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS))
            keep = max(1, self.max_length - max_new)  # the context is cut from the left to leave room
            prompts.append([self.tok.separator_id, *encode(self.tok, context)][-keep:])
            params.append(SamplingParams(max_tokens=max_new, temperature=0.0, stop=tuple(stops[-1])))
        llm = LLM(self.model, self.tok, EngineConfig(max_batch=self.batch_size))
        out = []
        for req, completion, stop in zip(requests, llm.generate(prompts, params), stops):
            out.append(cut_at_stop(completion.text or "", stop))
            self.cache_hook.add_partial("generate_until", tuple(req.args), out[-1])
        return out


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def main(argv: list[str] | None = None) -> None:
    """The lm-evaluation-harness command line, with the ``adaptive`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":  # run as a script: register through the importable module, once
    from adaptive.eval.lm_eval_adapter import main as registered_main

    registered_main()
else:
    register_model("adaptive")(AdaptiveHarnessLM)

"""Generation from Python: ``LLM`` (a trained run, its tokenizer and a serving engine) and ``generate``.

Every path runs on the serving engine (paged KV, continuous depth-wise batching), with each router's
causal inference rule, so the output of a request equals decoding it alone with the model's own cache.

    llm = LLM.from_run("runs/mor_expert-...", device="cpu")
    for c in llm.generate(["The history of"], SamplingParams(max_tokens=40, temperature=0)):
        print(c.text, c.depths)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from adaptive.model.transformer import AdaptiveLM
from adaptive.serving.engine import ServingEngine
from adaptive.serving.loading import load_run
from adaptive.serving.sampling import SamplingParams
from adaptive.serving.scheduler import EngineConfig
from adaptive.serving.sequence import Completion, TokenEvent

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def generate(model: AdaptiveLM, prompts: list[list[int]], params: SamplingParams | None = None, *,
             eos_id: int | None = None, config: EngineConfig | None = None) -> list[Completion]:
    """Continue token-id prompts (all arriving at once) on a fresh engine; completions in prompt order."""
    return ServingEngine(model, config, eos_id=eos_id).generate(prompts, params)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other value must name an available device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (valid: auto, cpu, cuda, cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here (use cpu or auto)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported (valid: auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


class LLM:
    """A model with its tokenizer on a serving engine. Text prompts are encoded the way training saw
    documents: the document separator first, then the text's tokens."""

    def __init__(self, model: AdaptiveLM, tokenizer=None, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        eos = tokenizer.separator_id if tokenizer is not None else None
        self.engine = ServingEngine(model, config, tokenizer=tokenizer, eos_id=eos)

    @classmethod
    def from_run(cls, path: str | Path, *, device: str = "auto", dtype: str = "auto",
                 config: EngineConfig | None = None, registry=None) -> "LLM":
        """Load a run directory, a checkpoint directory or a converted model (no code is executed)."""
        from adaptive.plugins import get_registry

        resolved = resolve_device(device)
        run = load_run(path, registry or get_registry(), device=str(resolved))
        run.model.to(dtype=resolve_dtype(dtype, resolved))
        return cls(run.model, run.tokenizer, config)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids")
            return [self.tokenizer.separator_id, *self.tokenizer.tok.encode(prompt, add_special_tokens=False).ids]
        return list(prompt)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        return self.engine.generate([self.encode(p) for p in prompts], params)

    def stream(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Tokens of every prompt as they are produced (``TokenEvent.request_id`` tells them apart)."""
        yield from self.engine.stream([self.encode(p) for p in prompts], params)

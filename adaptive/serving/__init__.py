"""Inference and serving: loading a trained run, the paged-KV engine with continuous (depth-wise)
batching, sampling, generation and benchmarks.

Layout (after nano-vllm): ``block_manager`` (blocks of the KV pool, per (sequence, slot) tables),
``kv_pool`` (the pooled key/value tensors and attention over them), ``scheduler`` (which work runs each
iteration, preemption), ``model_runner`` (batch assembly; drives the model's own recursion engine
through its step-level entry points), ``engine`` (the loop, requests and streaming), ``generate``
(``LLM``: a run, its tokenizer and an engine), ``bench`` (``adaptive bench``).
"""

from adaptive.serving.engine import ServingEngine, batching_mode
from adaptive.serving.generate import LLM, generate
from adaptive.serving.loading import LoadedRun, load_run, resolve
from adaptive.serving.sampling import SamplingParams
from adaptive.serving.scheduler import EngineConfig
from adaptive.serving.sequence import Completion, TokenEvent

__all__ = ["LLM", "Completion", "EngineConfig", "LoadedRun", "SamplingParams", "ServingEngine", "TokenEvent",
           "batching_mode", "generate", "load_run", "resolve"]

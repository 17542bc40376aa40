"""``GET /metrics``: the server's counters and the engine's latest state, in Prometheus' text format."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from adaptive.serving.async_engine import Snapshot

OUTCOMES = ("ok", "error", "invalid", "rejected", "cancelled")


@dataclass
class ServerMetrics:
    """Counted on the event loop (one thread: no locks)."""

    requests: Counter = field(default_factory=Counter)  # by outcome
    prompt_tokens: int = 0
    generation_tokens: int = 0
    active: int = 0  # accepted HTTP requests' engine requests that have not ended

    def render(self, snap: Snapshot, model: str) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP adaptive_{name} {help_}", f"# TYPE adaptive_{name} {kind}"])
            lines.extend(f"adaptive_{name}{labels} {value:g}" for labels, value in samples)

        tag = f'model="{model}"'
        metric("requests_total", "counter", "Requests by outcome (ok, error, invalid, rejected, cancelled).",
               [(f'{{{tag},outcome="{o}"}}', self.requests[o]) for o in OUTCOMES])
        metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", [(f"{{{tag}}}", self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Generated tokens sent to clients.",
               [(f"{{{tag}}}", self.generation_tokens)])
        metric("requests_running", "gauge", "Requests holding a batch row.", [(f"{{{tag}}}", snap.running)])
        metric("queue_depth", "gauge", "Accepted requests not yet running.",
               [(f"{{{tag}}}", max(self.active - snap.running, 0))])
        metric("kv_blocks_in_use", "gauge", "KV pool blocks held by requests.", [(f"{{{tag}}}", snap.blocks_in_use)])
        metric("kv_blocks_total", "gauge", "KV pool blocks.", [(f"{{{tag}}}", snap.blocks_total)])
        metric("kv_bytes_in_use", "gauge", "Bytes of the keys/values stored.", [(f"{{{tag}}}", snap.kv_bytes_in_use)])
        metric("kv_bytes_reserved", "gauge", "Bytes of the blocks held.", [(f"{{{tag}}}", snap.kv_bytes_reserved)])
        hist = snap.depth_hist
        total = sum(hist)
        mean = sum(d * n for d, n in enumerate(hist)) / total if total else 0.0
        metric("mean_recursion_depth", "gauge", "Mean recursion steps run per token (prompt and generated) since "
               "the engine started.", [(f"{{{tag}}}", mean)])
        metric("tokens_by_depth_total", "counter", "Tokens by the recursion steps they ran.",
               [(f'{{{tag},depth="{d}"}}', n) for d, n in enumerate(hist)])
        metric("engine_iterations_total", "counter", "Engine iterations.", [(f"{{{tag}}}", snap.iterations)])
        metric("preemptions_total", "counter", "Requests preempted for KV blocks.", [(f"{{{tag}}}", snap.preemptions)])
        metric("engine_restarts_total", "counter", "Engines rebuilt after an iteration failed.",
               [(f"{{{tag}}}", snap.engine_restarts)])
        return "\n".join(lines) + "\n"

"""The accountant: unique parameters, FLOPs per token and KV-cache bytes per token of a model section.

Counting rules (``adaptive flops RECIPE``; docs/model.md explains them with an example):

* A matmul costs 2 FLOPs per multiply-add. Embedding lookups, norms, RoPE, softmax and residual adds are
  not counted (O(D) per token each). Routers report their own scoring cost per step
  (``Router.flops_per_token``), counted as a ``router`` segment.
* Per token, forward = Σ over logical layers of that layer's cost + the LM head ``2·D·V``.
* A layer's tokens: prelude and coda layers serve every token. At recursion step r the *active fraction*
  ``a_r`` is the router's ``base_capacities()`` passed through the depth scheduler with
  ``progress=None`` (after training): the share of tokens that run step r (``all`` keeps 1.0).
* A layer costs ``a·(Q and O projections + FFN + attention) + w·(K and V projections)``, with the FFN's
  own ``flops_per_token()`` (an MoE counts only the experts a token visits), and ``w`` the fraction of
  tokens whose fresh keys/values the layer computes: by the KV policy's ``writes(r)``, 1 for ``"all"``
  (exited tokens from their frozen state), ``a_r`` for ``"selected"``, 0 for ``"none"``.
* Attention scores and values: ``2·2·(H·E)`` FLOPs per query per key attended; under causal masking a
  query attends on average ``(n+1)/2`` of the ``n`` keys its step can see. ``n`` is the number of
  distinct tokens stored in the slots the step reads (``reads(r)``): T for a slot written by all tokens,
  ``a_s·T`` for one written by the tokens selected at step s (selections are nested, so a union of slots
  holds as many tokens as its largest slot; a router with ``hierarchical = False`` chooses independently
  at each step, so the union is bounded by the sum of the slots, at most T). Hence: ``full`` T;
  recursion-wise ``a_r·T``; reads of step 0 (recursive sharing) T.
* Training = 3 × forward (backward ≈ 2 × forward).
* KV bytes per token = Σ over logical layers of ``w · 2·G·E·bytes`` (keys and values; bf16 = 2 bytes).
* Unique parameters count every tensor once (shared layers, tied embeddings), routers included: the
  total. Active parameters per token count the same tensors, but each physical layer's FFN only with its
  ``active_params_per_token()`` (an MoE: router, shared experts and the top-k routed experts a token
  visits; a dense FFN: all of it). Depth routing does not reduce them (it shows in the FLOPs).

Only the KVPolicy interface (``writes``/``reads``) and the Router/DepthScheduler/FFN interfaces are used,
so every registered component is covered without special cases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from adaptive.model.config import ModelConfig
from adaptive.registry import Registry


@dataclass
class SegmentFlops:
    """One group of logical layers that run alike: the prelude, a recursion step, the coda, the head."""

    name: str
    layers: int
    active_fraction: float  # share of tokens whose queries (and FFN) run here
    write_fraction: float  # share of tokens whose fresh keys/values are computed and stored here
    keys: float  # distinct keys visible to this segment's queries (before causal masking)
    flops_per_token: float  # forward FLOPs per token of the sequence, whole segment
    kv_bytes_per_token: float


@dataclass
class FlopReport:
    params_unique: int
    flops_per_token_forward: float
    flops_per_token_train: float
    kv_bytes_per_token: float
    seq_len: int
    vocab_size: int
    breakdown: list[SegmentFlops] = field(default_factory=list)
    params_active_per_token: int = 0  # params_unique with each FFN counted by its active_params_per_token()

    def as_dict(self) -> dict:
        return asdict(self)


def count_flops(model_cfg: ModelConfig, registry: Registry, seq_len: int, vocab_size: int | None = None, *,
                kv_bytes_per_element: int = 2, active_fractions: list[float] | None = None) -> FlopReport:
    """Count parameters, FLOPs and KV bytes per token of ``model_cfg`` at sequence length ``seq_len``.

    ``active_fractions`` replaces the scheduled capacities by measured shares of tokens that ran each
    step (``adaptive bench`` counts the FLOPs of the routing it observed)."""
    vocab = vocab_size or model_cfg.vocab_size
    if vocab is None:
        raise ValueError("model.vocab_size is unset: set it or give the tokenizer's vocabulary size")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    model = _meta_model(model_cfg, registry, vocab)
    engine, plan = model.engine, model.plan
    policy = engine.kv_policy
    caps = engine.scheduler.capacities(engine.router.base_capacities(), None) if plan.steps else []
    if active_fractions is not None:
        caps = list(active_fractions)
    if len(caps) != plan.num_steps:
        raise ValueError(f"depth scheduler returned {len(caps)} capacities for {plan.num_steps} steps")
    D, H, G, E, T = model_cfg.d_model, model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim, seq_len
    ffn = engine.layers[0].ffn.flops_per_token()
    qo, kv_proj = 2 * 2 * D * H * E, 2 * 2 * D * G * E
    entry_bytes = 2 * G * E * kv_bytes_per_element

    def layer(active: float, write: float, keys: float) -> float:
        attention = 2 * 2 * H * E * (keys + 1) / 2
        return active * (qo + ffn + attention) + write * kv_proj

    def segment(name: str, n: int, active: float, write: float, keys: float) -> SegmentFlops:
        return SegmentFlops(name, n, active, write, keys, n * layer(active, write, keys), n * write * entry_bytes)

    written = [{"all": 1.0, "selected": float(caps[r]), "none": 0.0}[policy.writes(r)] for r in range(plan.num_steps)]
    parts = []
    if plan.prelude:
        parts.append(segment("prelude" if plan.steps else "layers", len(plan.prelude), 1.0, 1.0, T))
    for r, step in enumerate(plan.steps):
        fractions = [written[s] for s in policy.reads(r)]
        keys = (max(fractions) if engine.router.hierarchical else min(1.0, sum(fractions))) * T
        parts.append(segment(f"step {r}", len(step), float(caps[r]), written[r], keys))
    if plan.coda:
        parts.append(segment("coda", len(plan.coda), 1.0, 1.0, T))
    router_flops = sum(engine.router.flops_per_token(r) for r in range(plan.num_steps))
    if router_flops:
        parts.append(SegmentFlops("router", 0, 1.0, 0.0, 0.0, router_flops, 0.0))
    parts.append(SegmentFlops("lm_head", 0, 1.0, 0.0, 0.0, 2 * D * vocab, 0.0))
    forward = sum(p.flops_per_token for p in parts)
    return FlopReport(
        params_unique=model.num_params(unique=True),
        flops_per_token_forward=forward,
        flops_per_token_train=3 * forward,
        kv_bytes_per_token=sum(p.kv_bytes_per_token for p in parts),
        seq_len=T,
        vocab_size=vocab,
        breakdown=parts,
        params_active_per_token=model.num_params(unique=True) - sum(
            sum(p.numel() for p in layer.ffn.parameters()) - layer.ffn.active_params_per_token() for layer in engine.layers),
    )


def _meta_model(model_cfg: ModelConfig, registry: Registry, vocab: int):
    """The model built on the meta device: shapes and components without allocating weights."""
    from adaptive.model import build_model

    with torch.device("meta"):
        return build_model(model_cfg, registry, vocab)

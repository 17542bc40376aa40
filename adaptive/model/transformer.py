"""AdaptiveLM: a Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU) whose depth the engine routes."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from adaptive.interfaces import Component, ModelOutput, RoutingStats
from adaptive.model.block import Layer, Norms
from adaptive.model.cache import KVCache, KVStore
from adaptive.model.config import ModelConfig
from adaptive.model.engine import Pass, RecursionEngine
from adaptive.model.layers import RMSNorm, Rotary
from adaptive.registry import Registry

Tensor = torch.Tensor


class AdaptiveLM(nn.Module):
    def __init__(self, config: ModelConfig, registry: Registry, vocab_size: int | None = None):
        super().__init__()
        vocab_size = vocab_size or config.vocab_size
        if vocab_size is None:
            raise ValueError("model.vocab_size is unset and no tokenizer vocabulary was given")
        self.config = config
        self.vocab_size = vocab_size
        scheme = registry.build("sharing_scheme", config.sharing)
        self.plan = scheme.plan(config.num_layers, config.num_recursions)
        kv_policy = registry.build("kv_policy", config.kv_policy)
        kv_policy.validate(self.plan.num_steps)
        if not self.plan.steps and config.router.name != "all":
            warnings.warn(f"model.router={config.router.name!r} is ignored: sharing {config.sharing.name!r} has no recursion steps")
        router = registry.build("router", config.router, d_model=config.d_model, num_steps=max(self.plan.num_steps, 1))
        scheduler = registry.build("depth_scheduler", config.depth_scheduler)
        if self.plan.steps and not router.uses_capacity and config.depth_scheduler.name != "constant":
            warnings.warn(f"model.depth_scheduler={config.depth_scheduler.name!r} is ignored: router "
                          f"{config.router.name!r} does not use step capacities")
        backend = registry.build("attention_backend", config.attention)
        layers = nn.ModuleList(
            Layer(config.d_model, config.num_heads, config.num_kv_heads,
                  registry.build("ffn", config.ffn, d_model=config.d_model, d_ffn=config.d_ffn))
            for _ in range(self.plan.num_physical)
        )
        if config.per_step_norms:
            norm_index = list(range(self.plan.num_logical))
        else:
            norm_index = list(self.plan.logical_to_physical)
        norms = nn.ModuleList(Norms(config.d_model, config.norm_eps) for _ in range(max(norm_index) + 1))
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.engine = RecursionEngine(self.plan, layers, norms, norm_index, router, kv_policy, scheduler, backend)
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every linear and embedding; then components (routers, FFNs) that
        define their own ``reset_parameters`` apply it, so their chosen init is never overridden."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, Component) and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    @property
    def router(self):
        return self.engine.router

    def forward(self, tokens_BT: Tensor, *, position_ids_BT: Tensor | None = None, valid_BT: Tensor | None = None,
                doc_ids_BT: Tensor | None = None, cache: KVCache | None = None, progress: float | None = None,
                training_rule: bool | None = None) -> ModelOutput:
        """Logits for every position, plus auxiliary losses and routing statistics.

        ``training_rule`` defaults to ``self.training and cache is None``: top-k style routing in
        training, the causal inference rule in eval mode and whenever a cache is used.
        With a cache that holds ``doc_ids``, a chunk given without them continues each row's last document.
        """
        B, T = tokens_BT.shape
        offset = cache.length if cache is not None else 0
        if cache is not None and offset + T > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} columns; {offset} used and {T} more requested")
        if position_ids_BT is None:
            position_ids_BT = (offset + torch.arange(T, device=tokens_BT.device)).expand(B, T)
        h_BTD = self.embed(tokens_BT)
        cos, sin = self.rotary.cos_sin(position_ids_BT, h_BTD.dtype)
        if doc_ids_BT is None and cache is not None and cache.doc_ids_BS is not None and offset > 0:
            doc_ids_BT = cache.doc_ids_BS[:, offset - 1:offset].expand(B, T)  # continue each row's last document
        store = cache if cache is not None else self._ephemeral_store(B, T)
        if store is not None and doc_ids_BT is not None:
            store.set_doc_ids(doc_ids_BT, offset)
        rule = training_rule if training_rule is not None else (self.training and cache is None)
        p = Pass(position_ids_BT, valid_BT, doc_ids_BT, store, offset, rule, progress, cos, sin)
        h_BTD, aux, stats = self.engine(h_BTD, p)
        if cache is not None:
            cache.length = offset + T
        logits = self.lm_head(self.final_norm(h_BTD))
        return ModelOutput(logits, aux, stats)

    def _ephemeral_store(self, B: int, T: int) -> KVStore | None:
        """A per-forward store for steps that cannot attend among their own tokens alone (slots are
        allocated only when a step writes to one)."""
        if not self.plan.steps:
            return None
        return KVStore(B, T, self.config.num_kv_heads, self.config.head_dim)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(batch, max_len or self.config.max_seq_len, self.config.num_kv_heads, self.config.head_dim)

    def fsdp_units(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """FSDP2 units below the root, each with the methods through which the engine runs it: the
        engine calls a layer's attention projections and FFN directly, never ``Layer.forward``."""
        units = []
        for layer in self.engine.layers:
            units.append((layer.attn, ("queries", "keys_values", "output")))
            units.append((layer.ffn, ("forward",)))
        return units

    def after_optimizer_step(self, stats: RoutingStats) -> None:
        """After each optimizer step: the router's state (balancing), then each FFN's (an MoE's loss-free bias)."""
        self.engine.router.after_optimizer_step(stats)
        self.engine.ffns_after_optimizer_step(stats)

    def num_params(self, unique: bool = True) -> int:
        """Parameter count; shared tensors are counted once (``unique``) or once per logical use: the sum over
        logical layers of their physical layer's and norms' parameters, plus everything else once."""
        total = sum(p.numel() for p in self.parameters())
        if unique:
            return total
        engine = self.engine
        size = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        per_logical = sum(size(engine.layers[phys]) + size(engine.norms[engine.norm_index[l]])
                          for l, phys in enumerate(engine.physical_of))
        return total - size(engine.layers) - size(engine.norms) + per_logical


def next_token_loss(logits_BTV: Tensor, targets_BT: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the (already shifted) next-token targets, computed in float32."""
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), reduction=reduction)


def build_model(config: ModelConfig, registry: Registry, vocab_size: int | None = None) -> AdaptiveLM:
    """Build a model from the recipe's ``model`` section and the registered components."""
    return AdaptiveLM(config, registry, vocab_size)

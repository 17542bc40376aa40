"""The component interfaces that plugins implement, and the result types they return.

Shape legend used throughout the code base:
    B batch, T sequence (time), K tokens selected at a recursion step, D model width,
    H attention heads, G kv heads, E head dim, V vocabulary, S cache length, R recursion steps.

Every component class carries a registered ``name`` and a pydantic ``Config`` (unknown keys forbidden).
The recipe names a component by ``name``; the host validates the rest of the mapping against ``Config``
and builds the component with ``cls.from_config(config, **context)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

Tensor = torch.Tensor


class ComponentConfig(BaseModel):
    """Base of every component's Config: typed, validated, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Component:
    """Mixin that every registered component class carries."""

    name: ClassVar[str]
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    kind: ClassVar[str]  # set on each interface below
    description: ClassVar[str] = ""

    @classmethod
    def from_config(cls, config: ComponentConfig, **context: Any) -> "Component":
        return cls(config, **context)  # type: ignore[call-arg]

    @classmethod
    def incompatible_with(cls, parts: dict[str, type["Component"]]) -> str | None:
        """Why this component cannot serve beside ``parts`` (model recipe key, e.g. ``"router"``, -> the
        class chosen there), or None when it can. The registry-wide property tests skip, with this reason,
        every combination a component declares incompatible."""
        return None


# ----------------------------------------------------------------------------------------------------
# Sharing schemes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepthPlan:
    """Which physical layer block serves at each logical depth.

    ``prelude`` and ``coda`` list the physical layers run once by every token before and after the
    recursion block; ``steps[r]`` lists the physical layers of recursion step r (routing decides per token
    which steps run). Logical layers are numbered prelude first, then steps in order, then coda; every
    logical layer owns its own KV-cache slot even when physical weights repeat.
    """

    num_physical: int
    prelude: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    coda: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def logical_to_physical(self) -> tuple[int, ...]:
        return self.prelude + tuple(p for step in self.steps for p in step) + self.coda

    @property
    def num_logical(self) -> int:
        return len(self.logical_to_physical)

    def __post_init__(self) -> None:
        used = set(self.logical_to_physical)
        assert used == set(range(self.num_physical)), f"plan must use every physical layer: {self}"


class SharingScheme(Component):
    """Maps ``num_layers`` logical layers and ``num_recursions`` steps to a DepthPlan."""

    kind: ClassVar[str] = "sharing_scheme"

    def __init__(self, config: ComponentConfig):
        self.config = config

    def plan(self, num_layers: int, num_recursions: int) -> DepthPlan:
        raise NotImplementedError  # interface: implemented by every registered scheme


# ----------------------------------------------------------------------------------------------------
# Routers
# ----------------------------------------------------------------------------------------------------


@dataclass
class RouteDecision:
    """What a router decides for one recursion step.

    ``selected_BT``: tokens that run this step (the engine ANDs it with the tokens still active, so a
    router cannot revive a token that stopped: hierarchical filtering lives in the engine; a router that
    declares ``hierarchical = False`` sees every token active at every step).
    ``gate_BT``: the gate applied by ``Router.combine`` (1.0 where the router does not gate). It may carry
    trailing channels (B, T, C) that only the router's own ``combine`` reads; the engine gathers them
    along with the tokens.
    ``num_selected``: a per-row count the router guarantees (top-k in training). When set, the engine
    gathers exactly that many tokens per row with static shapes and no host sync.
    ``max_selected``: an upper bound on the per-row count (e.g. top-k within each packed document); the
    engine gathers that many slots per row, the surplus ones masked out, still without a host sync.
    With neither, the engine sizes the gather from the data (one host sync per step).
    ``logits_BT``: optional (B, T) score of each token, higher meaning more inclined to run the step; the
    engine does not route by it, it records it in ``RoutingStats.logits_per_step`` (for
    ``after_optimizer_step``, e.g. balancing) and ``adaptive.testing`` builds adversarial inputs from it.
    ``metrics``: scalar tensors; the engine reports them in ``RoutingStats.metrics`` as
    ``"{name}/step{r}"`` (a stable format: ``after_optimizer_step`` may read it back).
    ``carry``: anything the router needs again at the next step of the same forward (e.g. the depth that
    token-choice assigned at step 0). It lives only for one forward; nothing is kept on the module.
    """

    selected_BT: Tensor
    gate_BT: Tensor
    num_selected: int | None = None
    max_selected: int | None = None
    logits_BT: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    carry: Any = None


@dataclass
class RouteContext:
    """Everything a router may look at besides the hidden states of the current step.

    ``route(hidden_BTD, ctx)`` gets every token of the batch, (B, T, D), never a gathered subset; tokens
    that stopped earlier keep their frozen state and are False in ``active_BT``. ``step`` (0-based) of
    ``num_steps``; ``capacity``: the fraction of the sequence this step may keep (``base_capacities()``
    through the depth scheduler); ``training_rule``: True for the training-time rule, False for the causal
    inference rule; ``active_BT``: tokens that ran the previous step (all True at step 0, and always for a
    router with ``hierarchical = False``); ``valid_BT``: False at padding; ``first_hidden_BTD``: the hidden
    state entering the recursion block; ``carry``: the previous step's ``RouteDecision.carry``;
    ``doc_ids_BT``: the document of each token in a packed row (None: one per row).
    """

    step: int  # 0-based recursion step
    num_steps: int
    capacity: float  # fraction of the sequence this step may keep (from the depth scheduler)
    training_rule: bool  # True: the training-time rule (e.g. top-k); False: the causal inference rule
    active_BT: Tensor  # tokens that reached this step (every token, for a router with hierarchical=False)
    valid_BT: Tensor  # False at padding positions
    first_hidden_BTD: Tensor  # hidden state entering the recursion block (H^1)
    carry: Any = None  # the previous step's RouteDecision.carry
    doc_ids_BT: Tensor | None = None  # document of each token in a packed row (None: one per row)


class Router(Component, nn.Module):
    """Decides, per recursion step, which tokens continue and with what gate.

    ``causal_in_training`` declares whether the training-time rule is causal (expert-choice top-k over the
    sequence is not); the property tests check the inference rule of every router is causal.
    ``hierarchical`` declares how steps relate: True (MoR's hierarchical filtering), a token runs step r
    only if it ran step r-1, so the tokens still active narrow after each step; False (Mixture-of-Depths'
    independent choice), every step chooses among all tokens, and a token skipped at one step may run
    the next.
    """

    kind: ClassVar[str] = "router"
    causal_in_training: ClassVar[bool] = True
    hierarchical: ClassVar[bool] = True
    uses_capacity: ClassVar[bool] = True  # False: RouteContext.capacity is ignored (a schedule has no effect)

    def __init__(self, config: ComponentConfig, *, d_model: int, num_steps: int):
        nn.Module.__init__(self)
        self.config = config
        self.d_model = d_model
        self.num_steps = num_steps

    def base_capacities(self) -> list[float]:
        """The fraction of tokens each step keeps before any schedule is applied. The accountant
        (``adaptive flops``) counts step r as run by this fraction of the sequence, so a router with a
        data-dependent count returns its expected fractions here (default 1.0: every token, every step)."""
        return [1.0] * self.num_steps

    def route(self, hidden_BTD: Tensor, ctx: RouteContext) -> RouteDecision:
        raise NotImplementedError  # interface: implemented by every registered router

    def combine(self, hidden_KD: Tensor, block_out_KD: Tensor, gate_K: Tensor, first_KD: Tensor, step: int) -> Tensor:
        """The new hidden state of the tokens that ran this step (default: gated delta)."""
        return hidden_KD + gate_K.unsqueeze(-1).to(hidden_KD.dtype) * (block_out_KD - hidden_KD)

    def flops_per_token(self, step: int) -> int:
        """Forward FLOPs the router spends at ``step`` per token of the sequence, for the accountant
        (0 by default: override when scoring is not negligible)."""
        return 0

    def after_optimizer_step(self, stats: "RoutingStats") -> None:
        """Hook for state updated outside autograd after each optimizer step (e.g. loss-free bias)."""


# ----------------------------------------------------------------------------------------------------
# KV policies
# ----------------------------------------------------------------------------------------------------


class KVPolicy(Component):
    """What each recursion step caches and what its queries attend to.

    For every logical layer j of recursion step r (0-based) the engine asks:
      * ``writes(r)``: whose fresh keys/values the (r, j) cache slot stores: ``"all"`` tokens (exited
        ones from their frozen hidden state), only the tokens ``"selected"`` at step r, or ``"none"``;
      * ``reads(r)``: the steps whose (·, j) slots the queries of step r attend to, in precedence order
        (a position stored in an earlier listed slot shadows the same position in later ones).
    Queries always come from the tokens selected at step r and attend only to stored entries at earlier
    or equal positions (and, with packing, in the same document). Layers outside the recursion block
    (prelude, coda) always behave as ``writes="all"``, ``reads=(own,)``.
    """

    kind: ClassVar[str] = "kv_policy"

    def __init__(self, config: ComponentConfig):
        self.config = config

    def writes(self, step: int) -> Literal["all", "selected", "none"]:
        raise NotImplementedError  # interface: implemented by every registered policy

    def reads(self, step: int) -> tuple[int, ...]:
        raise NotImplementedError  # interface: implemented by every registered policy

    def validate(self, num_steps: int) -> None:
        """Raise ValueError when the policy cannot serve ``num_steps`` steps (e.g. a read of a slot
        that no step writes)."""
        for step in range(num_steps):
            for source in self.reads(step):
                if not 0 <= source <= step:
                    raise ValueError(f"kv policy {self.name!r}: step {step} reads step {source}, which is not an earlier or the same step")
                if self.writes(source) == "none":
                    raise ValueError(f"kv policy {self.name!r}: step {step} reads step {source}, which writes nothing")


# ----------------------------------------------------------------------------------------------------
# Depth schedulers
# ----------------------------------------------------------------------------------------------------


class DepthScheduler(Component):
    """Turns a router's base capacities into the capacities used at a point of training.

    ``progress`` is the fraction of training done (0..1), passed explicitly into the forward by the
    trainer; ``None`` means "after training" (evaluation, inference).
    """

    kind: ClassVar[str] = "depth_scheduler"

    def __init__(self, config: ComponentConfig):
        self.config = config

    def capacities(self, base: list[float], progress: float | None) -> list[float]:
        raise NotImplementedError  # interface: implemented by every registered scheduler


# ----------------------------------------------------------------------------------------------------
# Attention backends and FFNs (the block's swappable parts)
# ----------------------------------------------------------------------------------------------------


class AttentionBackend(Component):
    """Computes softmax attention of queries against keys, given a boolean mask or a causal flag.

    ``q_BHQE``, ``k_BHSE``, ``v_BHSE``; ``allowed_BQS`` (True = may attend) or ``causal=True`` meaning
    query i attends keys 0..i of an equally long, equally ordered key sequence. Returns ``out_BHQE``.
    Keys may have fewer heads than queries (grouped-query attention). The engine guarantees every query
    row of ``allowed_BQS`` allows at least one key.
    """

    kind: ClassVar[str] = "attention_backend"

    def __init__(self, config: ComponentConfig):
        self.config = config

    def attend(self, q_BHQE: Tensor, k_BHSE: Tensor, v_BHSE: Tensor, *, allowed_BQS: Tensor | None, causal: bool) -> Tensor:
        raise NotImplementedError  # interface: implemented by every registered backend


@dataclass
class FFNOutput:
    """``counts``: tensors the FFN wants back after the optimizer step (e.g. tokens per expert); the engine
    sums them over every call of the same module in a forward, the trainer over micro-batches, and
    ``FFN.after_optimizer_step`` receives the totals. They are not logged."""

    out_BTD: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, Tensor] = field(default_factory=dict)


class FFN(Component, nn.Module):
    """The position-wise feed-forward part of a block (SwiGLU, or a mixture of experts).

    ``takes_valid_mask`` declares that ``forward`` also takes ``valid_N`` (keyword): False at padding and at
    gathered slots of tokens that did not run, None when every token is real, so statistics such as a
    balance loss can leave them out. Other FFNs are called ``forward(x_ND)``.
    """

    kind: ClassVar[str] = "ffn"
    takes_valid_mask: ClassVar[bool] = False

    def __init__(self, config: ComponentConfig, *, d_model: int, d_ffn: int):
        nn.Module.__init__(self)
        self.config = config
        self.d_model = d_model
        self.d_ffn = d_ffn

    def forward(self, x_ND: Tensor) -> FFNOutput:  # N = any number of tokens
        raise NotImplementedError  # interface: implemented by every registered FFN

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token (2 per multiply-add) actually spent, for the accountant."""
        raise NotImplementedError  # interface: implemented by every registered FFN

    def active_params_per_token(self) -> int:
        """Parameters one token's forward uses (default: all of them; an MoE: router, shared and top-k experts)."""
        return sum(p.numel() for p in self.parameters())

    def after_optimizer_step(self, counts: dict[str, Tensor]) -> None:
        """Hook for state updated outside autograd after each optimizer step (e.g. an MoE's loss-free bias).
        ``counts``: this module's ``FFNOutput.counts`` summed over its calls in the step's forwards (every
        logical layer it serves, every micro-batch of this process)."""


# ----------------------------------------------------------------------------------------------------
# Results of a model forward
# ----------------------------------------------------------------------------------------------------


@dataclass
class RoutingStats:
    """Per-forward routing statistics. ``depth_BT``: recursion steps each token ran (0..R)."""

    depth_BT: Tensor | None = None
    selected_per_step: list[Tensor] = field(default_factory=list)  # R tensors of shape (B, T), bool
    logits_per_step: list[Tensor | None] = field(default_factory=list)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    ffn_counts: dict[str, Tensor] = field(default_factory=dict)  # "layer{physical}/{name}": FFNOutput.counts summed


@dataclass
class ModelOutput:
    logits_BTV: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # already scaled by their coefficients
    stats: RoutingStats = field(default_factory=RoutingStats)

    @property
    def aux_loss(self) -> Tensor:
        if not self.aux_losses:
            return self.logits_BTV.new_zeros(())
        return torch.stack([v.float() for v in self.aux_losses.values()]).sum()


KINDS: dict[str, type[Component]] = {
    "sharing_scheme": SharingScheme,
    "router": Router,
    "kv_policy": KVPolicy,
    "depth_scheduler": DepthScheduler,
    "attention_backend": AttentionBackend,
    "ffn": FFN,
}



# ----------------------------------------------------------------------------------------------------
# Data sources
# ----------------------------------------------------------------------------------------------------


class DataSource(Component):
    """A corpus of text documents, split deterministically by document into train and validation."""

    kind: ClassVar[str] = "dataset"

    def __init__(self, config: ComponentConfig, *, validation_fraction: float):
        """``validation_fraction`` (the recipe's ``data.validation_fraction``): the share of documents
        ``documents("validation")`` holds out."""
        self.config = config
        self.validation_fraction = validation_fraction

    def documents(self, split: Literal["train", "validation"]) -> list[str]:
        raise NotImplementedError  # interface: implemented by every registered data source

    def describe(self) -> str:
        """One line naming the corpus and its origin (printed by the trainer, credited in docs)."""
        return self.name


KINDS["dataset"] = DataSource

"""The recursion engine: prelude, routed recursion steps over the shared block, coda.

At each recursion step the engine asks the depth scheduler for the step's capacity and the router for
the tokens that continue (ANDed with the tokens still active: hierarchical filtering lives here, once;
a router that declares ``hierarchical = False`` chooses among every token at every step), gathers those
tokens, runs the step's layers on them with the KV policy's attention rule, and scatters the result back
through ``Router.combine``. Nothing is kept on the module between forwards: auxiliary losses and
statistics are returned.

Static shapes: when the router guarantees a per-row count (top-k in training) the gather has that size
and no host sync happens. Data-dependent routing (the causal inference rule, token-choice) takes one
host sync per step to size the gather at the largest row count; a step no token reaches is skipped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from adaptive.interfaces import (
    AttentionBackend,
    DepthPlan,
    DepthScheduler,
    KVPolicy,
    RouteContext,
    RouteDecision,
    Router,
    RoutingStats,
)
from adaptive.model.block import Layer, Norms
from adaptive.model.cache import KVStore
from adaptive.model.stepwise import StepEntryPoints, TokenKV  # noqa: F401 (TokenKV: re-exported)

Tensor = torch.Tensor


@dataclass
class Pass:
    """What one forward pass is about: positions, padding, documents, the KV store and its offset."""

    position_ids_BT: Tensor
    valid_BT: Tensor | None  # None: no padding
    doc_ids_BT: Tensor | None  # None: one document per row
    store: KVStore | None  # None: no cache and no cross-step reads needed
    offset: int  # columns already in the store
    training_rule: bool
    progress: float | None
    cos_BT: Tensor  # rotary tables at every position of the pass (B 1 T E)
    sin_BT: Tensor
    ffn_counts: dict[str, Tensor] = field(default_factory=dict)  # FFNOutput.counts of this pass (RoutingStats)

    @property
    def length(self) -> int:
        return self.position_ids_BT.shape[1]

    def columns_BT(self) -> Tensor:
        """The store columns of this pass's tokens (they follow the ``offset`` columns already there)."""
        B, T = self.position_ids_BT.shape
        return self.offset + torch.arange(T, device=self.position_ids_BT.device).expand(B, T)


@dataclass
class Selection:
    """The tokens that run a step, gathered in causal (column) order.

    ``rows_R`` (data-dependent routing only) keeps just the batch rows where some token continues;
    ``idx_BK`` and ``qvalid_BK`` then index those rows (B = R).
    """

    idx_BK: Tensor | None  # None: every token, in place
    qvalid_BK: Tensor | None  # None: all K gathered entries are real selections
    size: int
    rows_R: Tensor | None = None  # None: every row

    def rows(self, x_B_: Tensor) -> Tensor:
        return x_B_ if self.rows_R is None else x_B_.index_select(0, self.rows_R)

    def gather(self, x_BT_: Tensor) -> Tensor:
        x_BT_ = self.rows(x_BT_)
        if self.idx_BK is None:
            return x_BT_
        index = self.idx_BK.view(*self.idx_BK.shape, *([1] * (x_BT_.dim() - 2))).expand(-1, -1, *x_BT_.shape[2:])
        return x_BT_.gather(1, index)

    def scatter(self, full_BTD: Tensor, part_BKD: Tensor) -> Tensor:
        if self.idx_BK is None and self.rows_R is None:
            return part_BKD
        kept_BTD = self.rows(full_BTD)
        if self.idx_BK is None:
            kept_BTD = part_BKD
        else:
            kept_BTD = kept_BTD.scatter(1, self.idx_BK[..., None].expand(-1, -1, full_BTD.shape[-1]), part_BKD)
        return kept_BTD if self.rows_R is None else full_BTD.index_copy(0, self.rows_R, kept_BTD)


@dataclass
class StepWiring:
    """How the layers of one step attend: fast compact attention, or through the KV store."""

    sel: Selection
    writes: str  # "all" | "selected" | "none"
    reads: tuple[int, ...]  # steps whose slots are read (same layer index within the step)
    use_store: bool
    cos: Tensor
    sin: Tensor
    compact_allowed: Tensor | None = None  # fast path mask (B K K), None with causal=True
    dense_hidden: Tensor | None = None  # hidden entering the step, for writes="all"


def compact(selected_BT: Tensor, decision: RouteDecision, length: int) -> Selection:
    """Gather indices of the selected tokens, sorted by column; static when the count is known."""
    if decision.num_selected == length:
        return Selection(None, None, length)
    order_BT = torch.sort((~selected_BT).to(torch.uint8), dim=1, stable=True).indices
    if decision.num_selected is not None:
        return Selection(order_BT[:, : decision.num_selected], None, decision.num_selected)
    count_B = selected_BT.sum(1)
    rows_R = None
    if decision.max_selected is not None:
        size = min(decision.max_selected, length)
    else:
        counts = count_B.tolist()  # data-dependent routing: the one host sync per step
        size = max(counts)
        if 0 < size and min(counts) == 0:  # rows where no token continues are not computed at all
            rows_R = torch.tensor([b for b, c in enumerate(counts) if c], device=selected_BT.device)
            order_BT, count_B = order_BT.index_select(0, rows_R), count_B.index_select(0, rows_R)
    arange_K = torch.arange(size, device=selected_BT.device)
    return Selection(order_BT[:, :size], arange_K[None] < count_B[:, None], size, rows_R)


class RecursionEngine(StepEntryPoints, nn.Module):
    def __init__(self, plan: DepthPlan, layers: nn.ModuleList, norms: nn.ModuleList, norm_index: list[int],
                 router: Router, kv_policy: KVPolicy, scheduler: DepthScheduler, backend: AttentionBackend):
        super().__init__()
        self.plan = plan
        self.layers = layers
        self.norms = norms
        self.norm_index = norm_index
        self.router = router
        self.kv_policy = kv_policy
        self.scheduler = scheduler
        self.backend = backend
        self.physical_of = plan.logical_to_physical
        first_step = len(plan.prelude)
        per_step = len(plan.steps[0]) if plan.steps else 0
        self.step_layers = [list(range(first_step + r * per_step, first_step + (r + 1) * per_step)) for r in range(plan.num_steps)]
        self.coda_layers = list(range(first_step + plan.num_steps * per_step, plan.num_logical))

    # ------------------------------------------------------------------ the loop

    def forward(self, h_BTD: Tensor, p: Pass) -> tuple[Tensor, dict[str, Tensor], RoutingStats]:
        aux: dict[str, Tensor] = defaultdict(lambda: h_BTD.new_zeros((), dtype=torch.float32))
        stats = RoutingStats()
        everyone = Selection(None, None, p.length)
        for layer in range(len(self.plan.prelude)):
            h_BTD = self.run_layers([layer], h_BTD, self.wire_full(everyone, p, h_BTD), p, aux)
        if self.plan.steps:
            h_BTD = self.recurse(h_BTD, p, aux, stats)
        for layer in self.coda_layers:
            h_BTD = self.run_layers([layer], h_BTD, self.wire_full(everyone, p, h_BTD), p, aux)
        stats.ffn_counts = p.ffn_counts
        return h_BTD, dict(aux), stats

    def recurse(self, h_BTD: Tensor, p: Pass, aux: dict, stats: RoutingStats) -> Tensor:
        B, T, _ = h_BTD.shape
        capacities = self.scheduler.capacities(self.router.base_capacities(), p.progress)
        assert len(capacities) == self.plan.num_steps, "a depth scheduler must return one capacity per step"
        first_BTD = h_BTD
        active_BT = torch.ones(B, T, dtype=torch.bool, device=h_BTD.device)
        valid_BT = p.valid_BT if p.valid_BT is not None else active_BT
        depth_BT = torch.zeros(B, T, dtype=torch.long, device=h_BTD.device)
        carry = None
        for step in range(self.plan.num_steps):
            ctx = RouteContext(step, self.plan.num_steps, capacities[step], p.training_rule, active_BT, valid_BT,
                               first_BTD, carry, p.doc_ids_BT)
            decision, selected_BT = self.decide(h_BTD, ctx)
            self.record(step, decision, selected_BT, aux, stats)
            carry = decision.carry
            if self.router.hierarchical:  # only the tokens that run this step may run the next
                active_BT = selected_BT
            depth_BT = depth_BT + selected_BT.long()
            sel = compact(selected_BT, decision, T)
            if sel.size == 0 and not torch.is_grad_enabled():  # inference: no token runs this step (nor, when
                # hierarchical, any deeper one), so it is skipped: only the KV a cache is owed is written
                self.write_frozen(range(step, self.plan.num_steps) if self.router.hierarchical else [step], h_BTD, p)
                if self.router.hierarchical:
                    break
                continue
            # with gradients on, an empty step still runs (on zero tokens): every process of a DDP/FSDP
            # run must call the same modules in the same order
            wiring = self.wire_step(step, sel, p, h_BTD, valid_BT)
            old_BKD = sel.gather(h_BTD)
            out_BKD = self.run_layers(self.step_layers[step], old_BKD, wiring, p, aux)
            new_BKD = self.update(step, old_BKD, out_BKD, sel.gather(decision.gate_BT), sel.gather(first_BTD), sel.qvalid_BK)
            h_BTD = sel.scatter(h_BTD, new_BKD)
        stats.depth_BT = depth_BT
        return h_BTD

    def write_frozen(self, steps, h_BTD: Tensor, p: Pass) -> None:
        """``steps``, which no token of this pass runs, still owe a persistent cache the entries their
        policy writes for every token (``writes="all"``: skipped or exited tokens from their frozen state);
        without them a later decode token would not see these columns, unlike the full forward. Within one
        forward only a later step of an independent (non-hierarchical) router can read them."""
        if p.store is None:
            return
        cols_BT = p.columns_BT()
        for step in steps:
            owed = p.store.persistent or (not self.router.hierarchical and self.read_later(step))
            if self.kv_policy.writes(step) != "all" or not owed:
                continue
            for logical in self.step_layers[step]:
                weights: Layer = self.layers[self.physical_of[logical]]
                norms: Norms = self.norms[self.norm_index[logical]]
                k_BGTE, v_BGTE = weights.attn.keys_values(norms.attn_norm(h_BTD), p.cos_BT, p.sin_BT)
                p.store.write(logical, cols_BT, k_BGTE, v_BGTE, p.valid_BT)

    def decide(self, h_BTD: Tensor, ctx: RouteContext) -> tuple[RouteDecision, Tensor]:
        """The router's decision at ``ctx.step`` and the tokens that run it: hierarchical filtering (a token
        runs a step only if it is still active) is applied here, once, for every caller (``ctx.active_BT``
        is every token for a router that declares ``hierarchical = False``)."""
        decision = self.router.route(h_BTD, ctx)
        return decision, decision.selected_BT & ctx.active_BT

    def update(self, step: int, old_BKD: Tensor, out_BKD: Tensor, gate_BK: Tensor, first_BKD: Tensor,
               qvalid_BK: Tensor | None) -> Tensor:
        """The new hidden state of tokens that ran ``step`` (``qvalid_BK`` False: the token did not run and
        keeps its state)."""
        new_BKD = self.router.combine(old_BKD, out_BKD, gate_BK, first_BKD, step)
        return new_BKD if qvalid_BK is None else torch.where(qvalid_BK[..., None], new_BKD, old_BKD)

    @staticmethod
    def record(step: int, decision: RouteDecision, selected_BT: Tensor, aux: dict, stats: RoutingStats) -> None:
        for name, value in decision.aux_losses.items():
            aux[name] = aux[name] + value.float()
        for name, value in decision.metrics.items():
            stats.metrics[f"{name}/step{step}"] = value.detach()
        stats.selected_per_step.append(selected_BT)
        stats.logits_per_step.append(decision.logits_BT)

    # ------------------------------------------------------------------ wiring

    def wire_full(self, sel: Selection, p: Pass, h_BTD: Tensor) -> StepWiring:
        """Prelude and coda layers: every token queries, writes and reads its own layer's slot."""
        persistent = p.store is not None and p.store.persistent
        wiring = StepWiring(sel, "all", (), use_store=persistent, cos=p.cos_BT, sin=p.sin_BT, dense_hidden=h_BTD)
        if not wiring.use_store:
            wiring.compact_allowed = self.compact_mask(sel, p, p.valid_BT)
        return wiring

    def wire_step(self, step: int, sel: Selection, p: Pass, h_BTD: Tensor, valid_BT: Tensor) -> StepWiring:
        writes, reads = self.kv_policy.writes(step), self.kv_policy.reads(step)
        self_contained = reads == (step,) and (writes == "selected" or (writes == "all" and sel.idx_BK is None))
        persistent = p.store is not None and p.store.persistent
        use_store = persistent or not self_contained or self.read_later(step)
        wiring = StepWiring(sel, writes, reads, use_store, sel.gather(p.cos_BT.squeeze(1)).unsqueeze(1),
                            sel.gather(p.sin_BT.squeeze(1)).unsqueeze(1), dense_hidden=h_BTD)
        if not use_store:
            wiring.compact_allowed = self.compact_mask(sel, p, p.valid_BT)
        return wiring

    def read_later(self, step: int) -> bool:
        """Whether a later step's queries read ``step``'s slots."""
        return any(step in self.kv_policy.reads(s) for s in range(step + 1, self.plan.num_steps))

    @staticmethod
    def compact_mask(sel: Selection, p: Pass, valid_BT: Tensor | None) -> Tensor | None:
        """Mask for attention among the gathered tokens (causal in column order); None = plain causal."""
        if sel.qvalid_BK is None and valid_BT is None and p.doc_ids_BT is None:
            return None
        K = sel.size
        device = p.position_ids_BT.device
        allowed_BKK = torch.ones(K, K, dtype=torch.bool, device=device).tril()[None]
        key_ok_BK = torch.ones(1, K, dtype=torch.bool, device=device)
        if valid_BT is not None:
            key_ok_BK = key_ok_BK & sel.gather(valid_BT)
        if sel.qvalid_BK is not None:
            key_ok_BK = key_ok_BK & sel.qvalid_BK
        allowed_BKK = allowed_BKK & key_ok_BK[:, None, :]
        if p.doc_ids_BT is not None:
            doc_BK = sel.gather(p.doc_ids_BT)
            allowed_BKK = allowed_BKK & (doc_BK[:, :, None] == doc_BK[:, None, :])
        return ensure_nonempty(allowed_BKK, torch.eye(K, dtype=torch.bool, device=device)[None])

    # ------------------------------------------------------------------ layers

    def run_layers(self, logical: list[int], x_BKD: Tensor, w: StepWiring, p: Pass, aux: dict) -> Tensor:
        for layer in logical:
            x_BKD = self.run_layer(layer, x_BKD, w, p, aux)
        return x_BKD

    def run_layer(self, logical: int, x_BKD: Tensor, w: StepWiring, p: Pass, aux: dict) -> Tensor:
        def attend(weights: Layer, norms: Norms, normed_BKD: Tensor) -> Tensor:
            q_BHKE = weights.attn.queries(normed_BKD, w.cos, w.sin)
            if w.use_store:
                return self.attend_store(logical, weights, norms, x_BKD, normed_BKD, q_BHKE, w, p)
            k_BGKE, v_BGKE = weights.attn.keys_values(normed_BKD, w.cos, w.sin)
            causal = w.compact_allowed is None
            return self.backend.attend(q_BHKE, k_BGKE, v_BGKE, allowed_BQS=w.compact_allowed, causal=causal)

        valid_BK = None
        if self.layers[self.physical_of[logical]].ffn.takes_valid_mask:  # real tokens: not padding, not surplus
            valid_BK = _and(w.sel.qvalid_BK, None if p.valid_BT is None else w.sel.gather(p.valid_BT))
        return self.layer_forward(logical, x_BKD, attend, aux, valid_BK, p.ffn_counts)

    def layer_forward(self, logical: int, x_BKD: Tensor, attend, aux: dict, valid_BK: Tensor | None = None,
                      counts: dict[str, Tensor] | None = None) -> Tensor:
        """One decoder layer (pre-norm attention, then the FFN); ``attend(weights, norms, normed_BKD)`` returns
        the attention output, so each caller decides which keys the queries see. ``valid_BK`` reaches an FFN
        that ``takes_valid_mask``; its ``FFNOutput.counts`` are summed into ``counts`` as ``layer{physical}/{name}``."""
        weights: Layer = self.layers[self.physical_of[logical]]
        norms: Norms = self.norms[self.norm_index[logical]]
        normed_BKD = norms.attn_norm(x_BKD)
        x_BKD = x_BKD + weights.attn.output(attend(weights, norms, normed_BKD))
        B, K, D = x_BKD.shape
        normed_ND = norms.ffn_norm(x_BKD).reshape(B * K, D)
        if weights.ffn.takes_valid_mask:
            ffn = weights.ffn(normed_ND, valid_N=None if valid_BK is None else valid_BK.reshape(B * K))
        else:
            ffn = weights.ffn(normed_ND)
        for name, value in ffn.aux_losses.items():
            aux[name] = aux[name] + value.float()
        for name, value in ffn.counts.items() if counts is not None else ():
            key = f"layer{self.physical_of[logical]}/{name}"
            counts[key] = counts[key] + value.detach() if key in counts else value.detach()
        return x_BKD + ffn.out_BTD.reshape(B, K, D)

    def ffns_after_optimizer_step(self, stats: RoutingStats) -> None:
        """Each physical layer's FFN gets its own ``counts`` from ``stats.ffn_counts`` (``FFN.after_optimizer_step``)."""
        for physical, layer in enumerate(self.layers):
            prefix = f"layer{physical}/"
            layer.ffn.after_optimizer_step({k[len(prefix):]: v for k, v in stats.ffn_counts.items() if k.startswith(prefix)})

    def attend_store(self, logical: int, weights: Layer, norms: Norms, x_BKD: Tensor, normed_BKD: Tensor,
                     q_BHKE: Tensor, w: StepWiring, p: Pass) -> Tensor:
        store = p.store
        assert store is not None
        sel = w.sel
        cols_BT = p.columns_BT()
        cols_BK = sel.gather(cols_BT)
        if w.writes == "selected":
            k_BGKE, v_BGKE = weights.attn.keys_values(normed_BKD, w.cos, w.sin)
            mask_BK = _and(sel.qvalid_BK, None if p.valid_BT is None else sel.gather(p.valid_BT))
            store.write(logical, cols_BK, k_BGKE, v_BGKE, mask_BK, sel.rows_R)
        elif w.writes == "all":
            if sel.qvalid_BK is not None:  # surplus gathered slots hold tokens that did not run: keep them frozen
                x_BKD = torch.where(sel.qvalid_BK[..., None], x_BKD, sel.gather(w.dense_hidden))
            dense_BTD = sel.scatter(w.dense_hidden, x_BKD)
            k_BGTE, v_BGTE = weights.attn.keys_values(norms.attn_norm(dense_BTD), p.cos_BT, p.sin_BT)
            store.write(logical, cols_BT, k_BGTE, v_BGTE, p.valid_BT)
        k_BGSE, v_BGSE, present_BS, key_cols_BS = store.read(self.read_slots(logical, w.reads), p.offset + p.length, sel.rows_R)
        allowed_BKS = present_BS[:, None, :] & (key_cols_BS[:, None, :] <= cols_BK[:, :, None])
        if store.doc_ids_BS is not None:
            key_docs_BS = sel.rows(store.doc_ids_BS).gather(1, key_cols_BS.clamp(min=0))
            allowed_BKS = allowed_BKS & (key_docs_BS[:, None, :] == sel.gather(p.doc_ids_BT)[:, :, None])
        first_S = torch.arange(k_BGSE.shape[2], device=x_BKD.device) == 0
        allowed_BKS = ensure_nonempty(allowed_BKS, first_S[None, None, :])
        return self.backend.attend(q_BHKE, k_BGSE, v_BGSE, allowed_BQS=allowed_BKS, causal=False)

    def read_slots(self, logical: int, reads: tuple[int, ...]) -> tuple[int, ...]:
        """The logical layers whose slots a layer reads: itself outside the recursion block, else the
        same position within each step named by the KV policy."""
        for step, layers in enumerate(self.step_layers):
            if logical in layers:
                j = layers.index(logical)
                return tuple(self.step_layers[s][j] for s in reads)
        return (logical,)


def ensure_nonempty(allowed_BQS: Tensor, fallback_BQS: Tensor) -> Tensor:
    """Give each query row with no allowed key its fallback entry, so attention never produces NaN; such
    rows belong to padding (or a gathered surplus slot) and their outputs are discarded."""
    lonely_BQ1 = ~allowed_BQS.any(-1, keepdim=True)
    return allowed_BQS | (lonely_BQ1 & fallback_BQS)


def _and(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b

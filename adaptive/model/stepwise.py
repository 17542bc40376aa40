"""The recursion engine's step-level entry points, for the serving engine (adaptive/serving).

The serving engine schedules work items (request, tokens, step) itself and calls these to run them: the same
layers, router and KV policy as ``RecursionEngine.forward``, on a flat set of N tokens whose keys/values live
in its paged pool (``TokenKV``). Inference only: the causal routing rule.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from adaptive.interfaces import RouteContext, RouteDecision
from adaptive.model.block import Layer, Norms

Tensor = torch.Tensor


class TokenKV:
    """Key/value access of one ``run_tokens`` call: stores the fresh keys/values of the j-th layer where the
    KV policy says, and returns the attention of the queries over what each token may see."""

    def attend(self, j: int, q_HNE: Tensor, k_GNE: Tensor, v_GNE: Tensor) -> Tensor:
        raise NotImplementedError  # interface: the serving engine's paged pool implements it


class StepEntryPoints:
    """Mixed into ``RecursionEngine`` (its ``plan``, ``layers``, ``norms``, ``router``, ``kv_policy`` ...)."""

    def inference_capacities(self) -> list[float]:
        """Per-step capacities after training (``progress=None``)."""
        if not self.plan.steps:
            return []
        return self.scheduler.capacities(self.router.base_capacities(), None)

    def route_tokens(self, step: int, h_N1D: Tensor, first_N1D: Tensor, carry, capacity: float) -> tuple[RouteDecision, Tensor]:
        """The causal decision at ``step`` for N tokens that all reached it, one token per row: under the
        inference rule a cache-consistent router decides each token from that token alone."""
        ones_N1 = torch.ones(h_N1D.shape[:2], dtype=torch.bool, device=h_N1D.device)
        ctx = RouteContext(step, self.plan.num_steps, capacity, False, ones_N1, ones_N1, first_N1D, carry, None)
        return self.decide(h_N1D, ctx)

    def run_tokens(self, logical: tuple[int, ...], x_ND: Tensor, cos_NE: Tensor, sin_NE: Tensor, kv: TokenKV,
                   frozen_ND: Tensor | None = None, frozen_N: Tensor | None = None) -> Tensor:
        """Run the logical layers ``logical`` (one step's, or the prelude's, or the coda's) on N tokens.
        The j-th layer's attention goes through ``kv.attend(j, ...)``. Tokens marked ``frozen_N`` did not run
        this step: their keys/values come from ``frozen_ND`` (a ``writes="all"`` policy stores them)."""
        cos, sin = cos_NE[None, None], sin_NE[None, None]
        unused: dict[str, Tensor] = defaultdict(lambda: x_ND.new_zeros(()))
        x_1ND = x_ND[None]
        for j, layer in enumerate(logical):
            def attend(weights: Layer, norms: Norms, normed_1ND: Tensor, j: int = j) -> Tensor:
                if frozen_ND is None:
                    q_1HNE, k_1GNE, v_1GNE = weights.attn.queries_keys_values(normed_1ND, cos, sin)
                else:
                    q_1HNE = weights.attn.queries(normed_1ND, cos, sin)
                    frozen_1ND = norms.attn_norm(torch.where(frozen_N[None, :, None], frozen_ND[None], x_1ND))
                    k_1GNE, v_1GNE = weights.attn.keys_values(frozen_1ND, cos, sin)
                return kv.attend(j, q_1HNE[0], k_1GNE[0], v_1GNE[0])[None]

            x_1ND = self.layer_forward(layer, x_1ND, attend, unused)
        return x_1ND[0]

    def keys_values_of(self, logical: int, h_ND: Tensor, cos_NE: Tensor, sin_NE: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (G, N, E) that logical layer ``logical`` computes for hidden states ``h_ND``."""
        weights: Layer = self.layers[self.physical_of[logical]]
        norms: Norms = self.norms[self.norm_index[logical]]
        k_1GNE, v_1GNE = weights.attn.keys_values(norms.attn_norm(h_ND[None]), cos_NE[None, None], sin_NE[None, None])
        return k_1GNE[0], v_1GNE[0]

    def shared_step_groups(self) -> tuple[list[tuple[int, ...]], str | None]:
        """Recursion steps that one call of the shared block can serve together (the same physical layers
        and norms at every position of the step), and, when the steps split, why."""
        groups: dict[tuple, list[int]] = {}
        for step, layers in enumerate(self.step_layers):
            key = tuple((self.physical_of[l], self.norm_index[l]) for l in layers)
            groups.setdefault(key, []).append(step)
        if len(groups) <= 1:
            return [tuple(steps) for steps in groups.values()], None
        same_weights = len({tuple(p for p, _ in key) for key in groups}) == 1
        why = ("each recursion step has its own norms (per_step_norms)" if same_weights else
               "the sharing scheme gives the recursion steps different physical layers")
        return [tuple(steps) for steps in groups.values()], f"{why}, so each step runs in its own call"

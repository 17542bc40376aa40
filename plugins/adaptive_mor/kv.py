"""Mixture-of-Recursions KV policies (SPEC §2.4): what each recursion step caches and attends to.

Relative to ``full`` over the recursion block, with expert-choice capacities k_r = T(N_r - r)/N_r:
  recursion_wise     KV memory and IO (N_r + 1) / (2 N_r); attention among the step's own tokens only
  recursive_sharing  KV memory 1 / N_r; later steps compute queries only, against step 0's keys/values
  hybrid             step 0's keys/values for everyone, plus fresh ones of the tokens each later step keeps
Outside the recursion block (prelude, coda) every policy caches every token, as ``full`` does.
"""

from __future__ import annotations

from adaptive import ComponentConfig, KVPolicy


class RecursionWiseConfig(ComponentConfig):
    """Recursion-wise caching has no options."""


class RecursiveSharingConfig(ComponentConfig):
    """Recursive KV sharing has no options."""


class HybridConfig(ComponentConfig):
    """The hybrid policy has no options."""


class RecursionWise(KVPolicy):
    """Recursion-wise caching (the MoR default): a step caches and attends among only the tokens routed to it.

    A token that exited writes nothing at deeper steps, so later tokens at step r see only the earlier
    tokens that also reached r.
    """

    name = "recursion_wise"
    Config = RecursionWiseConfig

    def writes(self, step: int) -> str:
        return "selected"

    def reads(self, step: int) -> tuple[int, ...]:
        return (step,)


class RecursiveSharing(KVPolicy):
    """Recursive KV sharing: every token caches at step 0, and later steps attend to that cache only.

    Later steps compute queries for their selected tokens and write nothing.
    """

    name = "recursive_sharing"
    Config = RecursiveSharingConfig

    def writes(self, step: int) -> str:
        return "all" if step == 0 else "none"

    def reads(self, step: int) -> tuple[int, ...]:
        return (0,)


class Hybrid(KVPolicy):
    """Hybrid sharing: step 0's cache is shared, and each later step adds fresh keys/values of its own tokens.

    A later step reads its own slot first, so a token's fresh entry shadows its step-0 entry.
    """

    name = "hybrid"
    Config = HybridConfig

    def writes(self, step: int) -> str:
        return "all" if step == 0 else "selected"

    def reads(self, step: int) -> tuple[int, ...]:
        return (0,) if step == 0 else (step, 0)


KV_POLICIES = [RecursionWise, RecursiveSharing, Hybrid]

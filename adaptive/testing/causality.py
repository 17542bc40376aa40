"""Causality: no output at position t depends on a token after t.

The suffix after a cut position t is replaced (randomly, and adversarially: with the tokens that drive the
router's scores highest or lowest at each step, with one token repeated, with the tokens of largest
embedding norm) and the logits and routing decisions at positions <= t must not move. The variants run
together in one batch; that a row does not see its batch-mates is check_batch_invariance's business. Then the prefix
alone must give the prefix of the full forward. Comparing the discrete decisions is what finds routing
leaks: a gradient check sees zero derivative through top-k.
"""

from __future__ import annotations

import torch

from adaptive.model.transformer import AdaptiveLM
from adaptive.registry import Registry
from adaptive.testing.compare import ATOL, RTOL, assert_same
from adaptive.testing.models import ModelLike, as_model, random_tokens, run, run_router_logits, single_threaded

Tensor = torch.Tensor

MAX_CANDIDATES = 64  # vocabulary entries scored when building adversarial suffixes


@single_threaded
def check_causality(model_or_config: ModelLike, *, tokens_BT: Tensor | None = None, batch: int = 2, length: int = 16,
                    cut: int | None = None, seed: int = 0, training_rule: bool = False, num_random: int = 2,
                    adversarial: bool = True, progress: float | None = None, capacities: list[float] | None = None,
                    registry: Registry | None = None, atol: float = ATOL, rtol: float = RTOL) -> None:
    """Raise AssertionError when an output at or before ``cut`` depends on the tokens after it.

    ``training_rule`` checks the training-time routing rule instead of the inference rule (only meaningful
    for components that declare ``causal_in_training``). ``cut`` defaults to a seeded random position.
    """
    model = as_model(model_or_config, registry=registry, seed=seed, capacities=capacities)
    tokens_BT = random_tokens(model, batch, length, seed) if tokens_BT is None else tokens_BT
    T = tokens_BT.shape[1]
    if T < 2:
        raise ValueError("causality needs at least two positions")
    generator = torch.Generator().manual_seed(seed + 1)
    cut = int(torch.randint(0, T - 1, (), generator=generator)) if cut is None else cut
    if not 0 <= cut < T - 1:
        raise ValueError(f"cut must lie in [0, {T - 2}], got {cut}")
    kwargs = dict(training_rule=training_rule, progress=progress)
    rule = "training" if training_rule else "inference"
    prefix_cols = slice(0, cut + 1)
    base = run(model, tokens_BT, **kwargs).columns(prefix_cols)
    variants = suffixes(model, tokens_BT, cut, generator, num_random, adversarial, kwargs)
    changed_BT = tokens_BT.repeat(len(variants), 1)  # all variants in one batch (batch invariance is its own check)
    changed_BT[:, cut + 1:] = torch.cat([suffix_BS for _, suffix_BS in variants])
    got = run(model, changed_BT, **kwargs).columns(prefix_cols)
    B = tokens_BT.shape[0]
    for i, (name, _) in enumerate(variants):
        assert_same(base, got.rows(slice(i * B, (i + 1) * B)), f"causality ({rule} rule): {name} suffix after "
                    f"position {cut} changed the output", atol=atol, rtol=rtol)
    alone = run(model, tokens_BT[:, prefix_cols], **kwargs)
    assert_same(base, alone, f"causality ({rule} rule): the prefix 0..{cut} run alone differs from the full "
                f"forward's prefix", atol=atol, rtol=rtol)


def suffixes(model: AdaptiveLM, tokens_BT: Tensor, cut: int, generator: torch.Generator, num_random: int,
             adversarial: bool, kwargs: dict) -> list[tuple[str, Tensor]]:
    """Named replacement suffixes (B, T - cut - 1)."""
    B, T = tokens_BT.shape
    S = T - cut - 1
    found = [(f"random #{i}", torch.randint(0, model.vocab_size, (B, S), generator=generator)) for i in range(num_random)]
    if adversarial:
        found += [(name, ranked_BS.expand(B, S)) for name, ranked_BS in adversarial_suffixes(model, tokens_BT, cut, kwargs)]
    return found


def adversarial_suffixes(model: AdaptiveLM, tokens_BT: Tensor, cut: int, kwargs: dict) -> list[tuple[str, Tensor]]:
    """Suffixes built to flip routing decisions: for each step, the tokens whose router score there is
    highest (they crowd the prefix out of a top-k) and lowest (they hand their places to the prefix),
    plus one token repeated and the tokens of largest embedding norm."""
    S = tokens_BT.shape[1] - cut - 1
    candidates_C = torch.randperm(model.vocab_size, generator=torch.Generator().manual_seed(cut))[:MAX_CANDIDATES]
    found = [("repeated-token", tokens_BT[:1, cut:cut + 1].expand(1, S))]
    norms_V = model.embed.weight.detach().norm(dim=-1)
    found.append(("largest-embedding", _cycle(norms_V.argsort(descending=True), S)))
    rows_CT = tokens_BT[:1].expand(len(candidates_C), -1).clone()
    rows_CT[:, cut + 1:] = candidates_C[:, None]
    for step, logits_CT in enumerate(run_router_logits(model, rows_CT, **kwargs)):
        if logits_CT is None or logits_CT.dim() != 2:
            continue
        score_C = torch.nan_to_num(logits_CT[:, cut + 1:].double(), nan=0.0, posinf=1e30, neginf=-1e30).mean(1)
        order_C = candidates_C[score_C.argsort(descending=True)]
        found.append((f"highest-router-score@step{step}", _cycle(order_C, S)))
        found.append((f"lowest-router-score@step{step}", _cycle(order_C.flip(0), S)))
    return found


def _cycle(ranked_N: Tensor, length: int) -> Tensor:
    """The first ``length`` tokens of the ranking, best first, repeated if the ranking is shorter: (1, length)."""
    reps = -(-length // len(ranked_N))
    return ranked_N.repeat(reps)[:length][None]

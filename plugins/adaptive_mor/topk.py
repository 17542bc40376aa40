"""Exact, deterministic top-k over a sequence (per row, or per packed document), without loops or syncs.

Ranking: higher score first; equal scores keep column order (the lower position wins). The k-th token
is always kept: membership is ``rank < k`` on a sorted order, never a strict ``score > threshold``.

Shape legend: B batch, T tokens.
"""

from __future__ import annotations

import torch

from adaptive_mor.common import COUNT_EPS, lex_order

Tensor = torch.Tensor


def top_k_rows(score_BT: Tensor, active_BT: Tensor, valid_BT: Tensor, k: int) -> Tensor:
    """Exactly ``k`` tokens per row, active ones first: active real tokens by score, then active padding
    (only when a row has fewer than ``k`` active real tokens; its outputs are discarded), then inactive
    tokens (never reached when ``k`` is at most the active count, which the caller guarantees)."""
    tier_BT = (~valid_BT).long() + 2 * (~active_BT).long()
    order_BT = lex_order(score_BT, tier_BT)
    return torch.zeros_like(active_BT).scatter(1, order_BT[:, :k], True)


def top_k_docs(score_BT: Tensor, eligible_BT: Tensor, valid_BT: Tensor, doc_BT: Tensor, capacity: float,
               at_least_one: bool) -> Tensor:
    """Top-k within each packed document: a document of ``n`` real tokens keeps its best
    ``floor(n * capacity)`` eligible tokens (at least one with ``at_least_one``).

    Tokens are sorted by (document, eligible first, score descending, column); a token's rank inside its
    document is its sorted position minus the position where the document's run starts.
    """
    B, T = score_BT.shape
    order_BT = lex_order(score_BT, (~eligible_BT).long(), doc_BT)
    doc_sorted_BT = doc_BT.gather(1, order_BT)
    pos_BT = torch.arange(T, device=score_BT.device).expand(B, T)
    starts_BT = torch.ones_like(eligible_BT)
    starts_BT[:, 1:] = doc_sorted_BT[:, 1:] != doc_sorted_BT[:, :-1]
    rank_BT = pos_BT - torch.cummax(torch.where(starts_BT, pos_BT, 0), dim=1).values
    segment_BT = starts_BT.long().cumsum(1) - 1
    lengths_BT = torch.zeros(B, T, dtype=torch.long, device=score_BT.device)
    lengths_BT = lengths_BT.scatter_add(1, segment_BT, valid_BT.gather(1, order_BT).long()).gather(1, segment_BT)
    quota_BT = torch.floor(lengths_BT.double() * capacity + COUNT_EPS).long()
    if at_least_one:
        quota_BT = quota_BT.clamp(min=1)
    keep_sorted_BT = (rank_BT < quota_BT) & eligible_BT.gather(1, order_BT)
    return torch.zeros_like(eligible_BT).scatter(1, order_BT, keep_sorted_BT)


def docs_bound(length: int, capacity: float) -> int:
    """A static upper bound on a row's count under ``top_k_docs`` with plain floors: the sum over documents
    of ``floor(n_d c + eps)`` is an integer at most ``T c + T eps``."""
    return min(length, int(length * capacity + length * COUNT_EPS))

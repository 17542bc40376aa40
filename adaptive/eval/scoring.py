"""Log-likelihood of continuations, batched: the one scoring routine behind ``adaptive eval``'s tasks and
the lm-evaluation-harness adapter.

A request is a pair ``(context, continuation)``. It is encoded as lm-evaluation-harness does: trailing
whitespace of the context moves to the continuation, the pair is encoded whole and the continuation is
what follows the context's own tokens; every sequence is opened by the document separator (the token
that opens every training document). The sequence is cut from the left to ``max_len + 1`` tokens (the
model sees at most ``max_len``), sorted by length, right-padded into batches of at most ``batch_tokens``
tokens, and run in eval mode: every router decides with its causal inference rule, so a token's score
does not depend on its batch-mates, on padding or on anything after it.

Shapes: B batch rows, T positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adaptive.model.transformer import AdaptiveLM
from adaptive.train.tokenizer import TextTokenizer

Tensor = torch.Tensor
Pair = tuple[list[int], list[int]]  # context ids (never empty), continuation ids


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities (nats)
    is_greedy: bool  # every continuation token is the argmax given what precedes it
    num_tokens: int  # continuation tokens scored


def encode(tok: TextTokenizer, text: str) -> list[int]:
    return tok.tok.encode(text, add_special_tokens=False).ids if text else []


def encode_pair(tok: TextTokenizer, context: str, continuation: str) -> Pair:
    """Context ids (opened by the separator) and continuation ids, split as lm-evaluation-harness does."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(tok, context)
    whole_ids = encode(tok, context + continuation)
    return [tok.separator_id, *context_ids], whole_ids[len(context_ids):]


def loglikelihood(model: AdaptiveLM, tok: TextTokenizer, requests: list[tuple[str, str]], *, max_len: int,
                  batch_tokens: int = 8192, advance: Callable[[int], None] | None = None) -> list[Score]:
    """Scores of ``(context, continuation)`` text pairs, in the order given."""
    return score_pairs(model, [encode_pair(tok, c, x) for c, x in requests], max_len=max_len,
                       batch_tokens=batch_tokens, advance=advance)


def rolling_pairs(ids: list[int], prefix_id: int, max_len: int) -> list[Pair]:
    """Disjoint windows that predict every token of ``ids`` exactly once, each with as much context as
    fits (lm-evaluation-harness's rolling windows with ``context_len=1``): the first window is opened by
    ``prefix_id``, every later one sees the ``max_len`` tokens before its last prediction."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    pairs = []
    for start in range(0, len(ids), max_len):
        end = min(start + max_len, len(ids))
        lead = end - max_len - 1  # first token of a full-length window ending at `end`
        context = [prefix_id, *ids[:start]] if lead < 0 else ids[lead:start]
        pairs.append((context, ids[start:end]))
    return pairs


def score_pairs(model: AdaptiveLM, pairs: list[Pair], *, max_len: int, batch_tokens: int = 8192,
                advance: Callable[[int], None] | None = None) -> list[Score]:
    """Scores of token-id pairs, in the order given; batched by length, one forward per batch."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if any(not context for context, _ in pairs):
        raise ValueError("every context needs at least one token (open it with the separator)")
    seqs = [(context + cont)[-(max_len + 1):] for context, cont in pairs]
    counts = [min(len(cont), len(seq) - 1) for (_, cont), seq in zip(pairs, seqs)]
    order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))
    scores: list[Score | None] = [None] * len(pairs)
    for batch in length_batches(order, seqs, batch_tokens):
        logprob_B, greedy_B = score_batch(model, [seqs[i] for i in batch], [counts[i] for i in batch])
        for i, lp, greedy in zip(batch, logprob_B.tolist(), greedy_B.tolist()):
            scores[i] = Score(lp, bool(greedy), counts[i])
        if advance is not None:
            advance(len(batch))
    return scores  # type: ignore[return-value]


def length_batches(order: list[int], seqs: list[list[int]], batch_tokens: int) -> list[list[int]]:
    """Consecutive groups of ``order`` (longest first) whose padded size stays within ``batch_tokens``."""
    batches: list[list[int]] = []
    for i in order:
        width = len(seqs[batches[-1][0]]) - 1 if batches else 0
        if batches and (len(batches[-1]) + 1) * width <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def score_batch(model: AdaptiveLM, seqs: list[list[int]], counts: list[int]) -> tuple[Tensor, Tensor]:
    """Sum of log-probabilities of the last ``counts[b]`` tokens of each sequence, and whether each was
    the greedy choice; right padding is masked out of attention, routing and the sums."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths_B = torch.tensor([len(s) - 1 for s in seqs], device=device)
    counts_B = torch.tensor(counts, device=device)
    T = int(lengths_B.max())
    rows_BT = torch.zeros(len(seqs), T + 1, dtype=torch.long)
    for row, seq in enumerate(seqs):  # host-side batch assembly, once per batch, not in the model
        rows_BT[row, : len(seq)] = torch.tensor(seq)
    rows_BT = rows_BT.to(device)
    inputs_BT, targets_BT = rows_BT[:, :-1], rows_BT[:, 1:]
    cols_BT = torch.arange(T, device=device).expand(len(seqs), T)
    valid_BT = cols_BT < lengths_B[:, None]
    scored_BT = valid_BT & (cols_BT >= (lengths_B - counts_B)[:, None])
    logits_BTV = model(inputs_BT, valid_BT=valid_BT).logits_BTV
    logits_BTV = logits_BTV.to(torch.promote_types(logits_BTV.dtype, torch.float32))
    logprob_BT = torch.log_softmax(logits_BTV, dim=-1).gather(-1, targets_BT[..., None]).squeeze(-1)
    greedy_BT = logits_BTV.argmax(-1) == targets_BT
    model.train(was_training)
    return (logprob_BT * scored_BT).sum(1), (greedy_BT | ~scored_BT).all(1)

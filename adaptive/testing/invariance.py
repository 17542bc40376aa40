"""Batch and padding invariance: a sequence's output depends neither on its batch-mates nor on padding.

Each row of a batch is compared with the same sequence run alone: as given (batch invariance), and
left-padded behind random pad tokens with ``valid_BT`` and position ids restarting after the pads
(padding invariance). Only the real positions are compared.
"""

from __future__ import annotations

import torch

from adaptive.registry import Registry
from adaptive.testing.compare import ATOL, RTOL, assert_same
from adaptive.testing.models import ModelLike, Trace, as_model, left_padded, random_tokens, run, single_threaded

Tensor = torch.Tensor


@single_threaded
def check_batch_invariance(model_or_config: ModelLike, *, tokens_BT: Tensor | None = None, batch: int = 3,
                           length: int = 12, seed: int = 0, training_rule: bool = False,
                           progress: float | None = None, capacities: list[float] | None = None,
                           registry: Registry | None = None, atol: float = ATOL, rtol: float = RTOL) -> None:
    """Raise AssertionError when a row's output in the batch differs from the row run alone."""
    model = as_model(model_or_config, registry=registry, seed=seed, capacities=capacities)
    tokens_BT = random_tokens(model, batch, length, seed) if tokens_BT is None else tokens_BT
    kwargs = dict(training_rule=training_rule, progress=progress)
    together = run(model, tokens_BT, **kwargs)
    alone = Trace.cat_rows([run(model, tokens_BT[row:row + 1], **kwargs) for row in range(tokens_BT.shape[0])])
    assert_same(alone, together, f"batch invariance: a row in a batch of {tokens_BT.shape[0]} differs from the row "
                f"run alone", atol=atol, rtol=rtol)


@single_threaded
def check_padding_invariance(model_or_config: ModelLike, *, tokens_BT: Tensor | None = None, batch: int = 3,
                             length: int = 12, seed: int = 0, left_pads: list[int] | None = None,
                             capacities: list[float] | None = None, registry: Registry | None = None,
                             atol: float = ATOL, rtol: float = RTOL) -> None:
    """Raise AssertionError when left padding changes a row's output at its real positions (inference rule).

    ``left_pads`` (default: seeded random, each < length) gives each row's number of pad tokens.
    """
    model = as_model(model_or_config, registry=registry, seed=seed, capacities=capacities)
    tokens_BT = random_tokens(model, batch, length, seed) if tokens_BT is None else tokens_BT
    B, T = tokens_BT.shape
    generator = torch.Generator().manual_seed(seed + 3)
    if left_pads is None:
        left_pads = torch.randint(0, T, (B,), generator=generator).tolist()
    pad_BT = torch.randint(0, model.vocab_size, (B, T), generator=generator)
    padded_BT, valid_BT, position_ids_BT = left_padded(tokens_BT, left_pads, pad_BT)
    together = run(model, padded_BT, valid_BT=valid_BT, position_ids_BT=position_ids_BT, training_rule=False)
    expected = together.clone()
    for row, pads in enumerate(left_pads):
        expected.paste(run(model, tokens_BT[row:row + 1, : T - pads], training_rule=False), row, pads)
    assert_same(expected, together, f"padding invariance (left pads {left_pads}, positions are columns of the "
                f"padded batch): a padded row differs from the row run alone", valid_BT, atol=atol, rtol=rtol)

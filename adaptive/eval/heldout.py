"""Validation loss on the run's held-out split (or on a given file), with routing statistics.

The rows are those the trainer evaluates on: the run's data source split by document (the validation
documents), encoded with the run's own tokenizer, packed into rows of ``seq_len + 1`` tokens with stride
``seq_len`` (``adaptive.train.data.PackedRows``), with document ids and restarting positions when the
recipe respects document boundaries. The first ``max_rows`` rows are used (all by default), so
``max_rows = train.eval_batches x train.batch_size`` reproduces the trainer's ``val_loss``.

A given ``.txt``, ``.jsonl`` (``text`` field) or ``.parquet`` file is read by the ``files`` data source
(a ``.txt`` file is one document) and packed the same way, all of its documents in file order.

Shapes: B batch rows, T = seq_len, N rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptive.errors import DataError
from adaptive.model.transformer import AdaptiveLM, next_token_loss
from adaptive.recipe import Recipe
from adaptive.registry import ComponentSpec, Registry
from adaptive.train.data import PackedRows, build_source
from adaptive.train.tokenizer import TextTokenizer, encode_cached

from adaptive.eval.routing import RoutingTally

Tensor = torch.Tensor


@dataclass
class HeldOut:
    rows: PackedRows
    index_N: Tensor  # the rows evaluated
    description: str


def heldout_rows(recipe: Recipe, tokenizer: TextTokenizer, registry: Registry, *, data_file: str | Path | None = None,
                 max_rows: int | None = None, seq_len: int | None = None) -> HeldOut:
    """The rows to evaluate: the recipe's validation split, or every document of ``data_file``."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    seq_len = seq_len or recipe.data.seq_len
    if data_file is None:
        source = build_source(recipe.data, registry)
        docs, split = source.documents("validation"), "validation"
        description = f"validation split of {source.describe()}"
    else:
        docs, split = file_documents(Path(data_file), registry), str(data_file)
        description = f"{data_file}"
    if not any(d.strip() for d in docs):
        raise DataError(f"{split}: no text to evaluate on")
    stream, lens = encode_cached(tokenizer, docs, recipe.data)
    rows = PackedRows(stream, lens, seq_len, recipe.data.respect_doc_boundaries, split)
    count = len(rows) if max_rows is None else min(max_rows, len(rows))
    return HeldOut(rows, torch.arange(count), f"{description}: {count} rows of {seq_len} tokens")


def file_documents(path: Path, registry: Registry) -> list[str]:
    """Every document of a .txt/.jsonl/.parquet file, in file order, read by the ``files`` data source."""
    if not path.is_file():
        raise DataError(f"--data: {path} does not exist (a .txt, .jsonl or .parquet file is expected)")
    if path.suffix not in (".txt", ".jsonl", ".parquet"):
        raise DataError(f"--data: {path} is not a .txt, .jsonl or .parquet file")
    source = registry.build("dataset", ComponentSpec(name="files", paths=[str(path)]), validation_fraction=0.5)
    return [text for _, text in source.keyed_documents()]


@dataclass
class LossReport:
    loss: float  # mean next-token cross-entropy, nats
    tokens: int
    routing: dict

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


@torch.no_grad()
def heldout_loss(model: AdaptiveLM, held: HeldOut, *, batch_size: int,
                 advance: Callable[[int], None] | None = None) -> LossReport:
    """Mean cross-entropy over the rows in eval mode (causal routing), and the routing statistics; for a
    router whose training rule is not causal, a second forward under that rule gives its sampling accuracy."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tally = RoutingTally(model)
    top_k_too = bool(model.plan.steps) and not model.router.causal_in_training
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for chunk in held.index_N.split(batch_size):
        batch = held.rows.batch(chunk).to(device)
        kwargs = dict(position_ids_BT=batch.position_ids_BT, doc_ids_BT=batch.doc_ids_BT)
        out = model(batch.inputs_BT, **kwargs)
        total += next_token_loss(out.logits_BTV, batch.targets_BT, reduction="sum").double()
        tokens += batch.num_tokens
        tally.add_causal(out.stats)
        if top_k_too:
            tally.add_training_rule(model(batch.inputs_BT, training_rule=True, **kwargs).stats)
        if advance is not None:
            advance(len(chunk))
    model.train(was_training)
    return LossReport(float(total) / tokens, tokens, tally.summary())

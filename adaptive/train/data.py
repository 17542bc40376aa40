"""Training data: corpus -> tokenizer -> packed rows -> deterministic batches.

Documents are concatenated into one token stream (each opened by the separator token) and cut into
rows of ``seq_len + 1`` tokens with stride ``seq_len`` (inputs are the first ``seq_len``, targets the
last). Rows are visited in a fresh seeded permutation each epoch; a batch is a pure function of
``(seed, position)`` where ``position`` counts the sequences consumed so far, so resuming needs only
that counter. With ``respect_doc_boundaries`` every batch carries ``doc_ids_BT`` (the document index
within its row) and ``position_ids_BT`` restarting at 0 at each document start.

Shapes: B batch rows, T = seq_len, N rows in a split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adaptive.errors import DataError
from adaptive.registry import Registry
from adaptive.train.config import DataConfig, TokenizerConfig
from adaptive.train.tokenizer import TextTokenizer, encode_cached, load_tokenizer

Tensor = torch.Tensor


@dataclass
class Batch:
    inputs_BT: Tensor
    targets_BT: Tensor
    position_ids_BT: Tensor | None = None
    doc_ids_BT: Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.inputs_BT), move(self.targets_BT), move(self.position_ids_BT), move(self.doc_ids_BT))

    @property
    def num_tokens(self) -> int:
        return self.targets_BT.numel()


class PackedRows:
    """One split's token stream cut into overlapping rows of ``seq_len + 1`` tokens."""

    def __init__(self, stream: np.ndarray, doc_lens: np.ndarray, seq_len: int, respect_doc_boundaries: bool, split: str):
        self.seq_len = seq_len
        self.respect = respect_doc_boundaries
        tokens = torch.from_numpy(stream.astype(np.int64))
        starts = torch.zeros(len(stream), dtype=torch.bool)
        starts[torch.from_numpy(np.concatenate([[0], np.cumsum(doc_lens)[:-1]]))] = True
        if len(tokens) < seq_len + 1:
            raise DataError(f"data.seq_len: the {split} split has only {len(tokens)} tokens, fewer than one sequence of "
                            f"seq_len+1={seq_len + 1}; lower data.seq_len or use a larger corpus")
        self.rows_NT = tokens.unfold(0, seq_len + 1, seq_len)  # a view: no copy
        self.starts_NT = starts.unfold(0, seq_len + 1, seq_len)

    def __len__(self) -> int:
        return self.rows_NT.shape[0]

    def batch(self, index_B: Tensor) -> Batch:
        rows = self.rows_NT[index_B]
        batch = Batch(inputs_BT=rows[:, :-1].contiguous(), targets_BT=rows[:, 1:].contiguous())
        if self.respect:
            batch.doc_ids_BT, batch.position_ids_BT = doc_layout(self.starts_NT[index_B, :-1])
        return batch


def doc_layout(starts_BT: Tensor) -> tuple[Tensor, Tensor]:
    """Document index within each row (0 for the first) and positions restarting at each document start."""
    B, T = starts_BT.shape
    counts = starts_BT.long().cumsum(1)
    doc_ids = counts - counts[:, :1]
    arange = torch.arange(T).expand(B, T)
    last_start = torch.where(starts_BT, arange, torch.zeros_like(arange)).cummax(1).values
    return doc_ids, arange - last_start


def epoch_order(num_rows: int, seed: int, epoch: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=gen)


def sequence_indices(position: int, count: int, num_rows: int, seed: int) -> Tensor:
    """Row indices of the sequences numbered ``position .. position+count-1`` of the training order."""
    flat = torch.arange(position, position + count)
    epoch, within = flat // num_rows, flat % num_rows
    out = torch.empty(count, dtype=torch.long)
    for e in epoch.unique().tolist():  # one or two epochs per batch; never a loop over rows
        mask = epoch == e
        out[mask] = epoch_order(num_rows, seed, e)[within[mask]]
    return out


@dataclass
class TrainData:
    """Everything the loop needs from the data side."""

    tokenizer: TextTokenizer
    train: PackedRows
    validation: PackedRows
    description: str
    seed: int

    def micro_batch(self, position: int, micro_index: int, micro_size: int) -> Batch:
        """Micro-batch ``micro_index`` of the global batch that starts at sequence ``position``.

        Micro-batch j of a step is the same sequences however the global batch is spread over
        processes (j = accumulation step * world size + rank) and accumulation steps.
        """
        index = sequence_indices(position + micro_index * micro_size, micro_size, len(self.train), self.seed)
        return self.train.batch(index)

    def validation_rows(self, max_rows: int, world: int) -> Tensor:
        """The fixed validation rows an evaluation covers; process r takes ``rows[r::world]``."""
        total = min(len(self.validation), max_rows) // world * world  # the same count on every process
        if total == 0:
            raise DataError(f"data.validation_fraction: the validation split has {len(self.validation)} sequence(s), "
                            f"fewer than the {world} processes; use a larger fraction or corpus")
        return torch.arange(total)


def build_source(data: DataConfig, registry: Registry):
    """The recipe's DataSource, told the validation fraction."""
    return registry.build("dataset", data.source, validation_fraction=data.validation_fraction)


def load_data(data: DataConfig, tok_cfg: TokenizerConfig, registry: Registry, seed: int) -> TrainData:
    """Read the corpus, get the tokenizer, encode (cached) and pack both splits."""
    source = build_source(data, registry)
    train_docs, val_docs = source.documents("train"), source.documents("validation")
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        if not any(d.strip() for d in docs):
            raise DataError(f"data.source: the {split} split of {source.describe()} is empty")
    tokenizer = load_tokenizer(tok_cfg, data, train_docs)
    packed = {}
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        stream, lens = encode_cached(tokenizer, docs, data)
        packed[split] = PackedRows(stream, lens, data.seq_len, data.respect_doc_boundaries, split)
    return TrainData(tokenizer, packed["train"], packed["validation"], source.describe(), seed)


def unigram_entropy(targets: Tensor, vocab_size: int) -> float:
    """Entropy (nats) of the empirical unigram distribution of ``targets``: the loss of the best
    context-free predictor fitted to these very tokens, a floor any useful model must beat."""
    counts = torch.bincount(targets.reshape(-1), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())

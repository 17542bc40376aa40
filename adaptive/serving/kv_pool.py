"""The pooled key/value tensors, and attention over them for one call of some layers.

The pool is one preallocated tensor of fixed-size blocks, ``kv`` (blocks + 1, block size, 2, G, E), plus
``cols`` (blocks + 1, block size): the column (sequence index) of every stored entry. The last block is
trash: writes that must not land (padding, tokens whose policy stores nothing) go there.

``PagedCall`` implements the engine's ``TokenKV`` for one ``run_tokens`` call. The call's N tokens come
in rows: a row is the tokens of one sequence that run the call together (one decode token, or a prefill
chunk), each row with its own slot per layer (items at different recursion steps share a call: the same
weights, each row writing and reading its own step's slots). Per layer j it

1. appends the fresh keys/values of the tokens marked in ``write_N`` to the row's slot (in column order);
2. gathers, per row, the blocks of the slots its step reads (``KVPolicy.reads``), and attends with a mask:
   an entry is visible iff it is stored, at a column no later than the query's, and not shadowed by an
   entry at the same column in an earlier-listed slot.

The gather plus the model's attention backend with that mask is the CPU default. On CUDA the default is
FlexAttention over the pool in place, with a block mask of each row's pages and the same mask as a
``mask_mod`` (``paged_flex``; ``EngineConfig.paged_attention`` chooses). Rows of one token (decode) and
rows of several (prefill chunks) attend in separate batches, so a chunk's padding never multiplies decode
work.

Shape legend: N tokens of the call, R rows, J layers of the call, X slots read per layer, S keys gathered
per row, G kv heads, H query heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adaptive.interfaces import AttentionBackend
from adaptive.model.engine import TokenKV, ensure_nonempty
from adaptive.serving.paged_flex import PageOwners, attend_pages, slot_positions

Tensor = torch.Tensor


class KVPool:
    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.kv = torch.zeros(num_blocks + 1, block_size, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.cols = torch.full((num_blocks + 1, block_size), -1, dtype=torch.long, device=device)

    @classmethod
    def over(cls, kv: Tensor, cols: Tensor) -> "KVPool":
        """A pool over existing tensors (inside a compiled graph, which takes them as inputs)."""
        pool = cls.__new__(cls)
        pool.kv, pool.cols = kv, cols
        return pool

    @property
    def block_size(self) -> int:
        return self.kv.shape[1]

    @property
    def trash_entry(self) -> int:
        """The first entry of the trash block (the last one)."""
        return (self.kv.shape[0] - 1) * self.kv.shape[1]

    @property
    def bytes_per_entry(self) -> int:
        return self.kv[0, 0].numel() * self.kv.element_size()


@dataclass
class CallRows:
    """Host-side description of a call's rows (numpy), built by the model runner. The call's flat tokens
    are the rows' tokens, row after row."""

    seq_R: np.ndarray  # batch row (sequence) of each row
    counts_R: np.ndarray  # tokens of each row
    write_slot_RJ: np.ndarray  # slot the j-th layer writes for the row (the empty slot: writes nothing)
    read_slot_RJX: np.ndarray  # slots the j-th layer reads, in precedence order (padded with the empty slot)

    @property
    def starts_R(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts_R)[:-1]]).astype(np.int64)


@dataclass
class AttentionBatch:
    """Rows that attend together: one-token rows (``index_RK`` None) or rows of several tokens."""

    rows_R: Tensor  # which rows of the call
    tokens: Tensor  # flat index of the batch's tokens: (R,) for one-token rows, else the real ones of (R K)
    index_RK: Tensor | None  # flat index of each row's tokens, padded (rows of several tokens)
    real: Tensor | None  # positions of the real tokens in the flattened (R K) layout
    in_order: bool  # one-token rows covering the whole call in order: no gathers needed
    mask: Tensor | None = None  # the attention mask, once built (shared by every layer when ``same_mask``)


class PagedCall(TokenKV):
    """Writes and attention of one call (see the module docstring)."""

    def __init__(self, pool: KVPool, tables: np.ndarray, lengths: np.ndarray, rows: CallRows, col_N: Tensor,
                 may_write_N: np.ndarray, decided_N: Tensor | None, backend: AttentionBackend, max_col: int,
                 owners: PageOwners | None = None):
        """``may_write_N``: the tokens whose policy stores their keys/values here; ``decided_N`` (None: all
        True), the routing decision known only on the device: a token writes iff both hold. Everything the
        host knows is computed on the host; the device only applies ``decided_N``. With ``owners``, attention
        reads the pool in place (``paged_flex``) instead of gathering each row's blocks."""
        self.pool, self.backend, self.rows, self._tables = pool, backend, rows, tables
        self.owners = owners
        self.span = max_col + 1  # columns [0, span) cover every key a query of this call may see
        device = self.device = pool.kv.device
        bs = pool.block_size
        seq_R1, counts, starts = rows.seq_R[:, None], rows.counts_R, rows.starts_R
        self.N = int(counts.sum())
        self.col_N = col_N
        row_N = np.repeat(np.arange(len(counts)), counts)
        # --- where each token's entry goes, per layer: base length of the row's slot + rank among writers
        before_N = np.cumsum(may_write_N) - may_write_N
        rank_N = before_N - before_N[starts][row_N]
        base_RJ = lengths[seq_R1, rows.write_slot_RJ]
        entry_NJ = base_RJ[row_N] + rank_N[:, None]
        block_NJ = tables[rows.seq_R[row_N][:, None], rows.write_slot_RJ[row_N], np.minimum(entry_NJ // bs, tables.shape[2] - 1)]
        flat_NJ = np.where(may_write_N[:, None], block_NJ * bs + entry_NJ % bs, pool.trash_entry)
        count_R = np.bincount(row_N, weights=may_write_N, minlength=len(counts)).astype(np.int64)
        read_base_RJX = lengths[seq_R1[..., None], rows.read_slot_RJX]
        own_RJX = rows.read_slot_RJX == rows.write_slot_RJ[..., None]
        # every write stores all layers of a prelude, step or coda together, for the same tokens, so slots of
        # equal length hold the same columns in the same order: one mask then serves every layer
        self.same_mask = bool((read_base_RJX == read_base_RJX[:, :1]).all() and (own_RJX == own_RJX[:, :1]).all())
        if decided_N is None:
            self.flat_NJ = self._t(flat_NJ)
            self.read_len_RJX = self._t(read_base_RJX + own_RJX * count_R[:, None, None])
        else:
            self._device_writes(decided_N, may_write_N, row_N, flat_NJ, base_RJ, read_base_RJX, own_RJX)
        # --- what each row reads, per layer: the blocks of the slots its step reads
        rblocks = max(1, int(-(-(read_base_RJX + counts[:, None, None]).max() // bs)))
        self.rtable_RJXB = self._t(tables[seq_R1[..., None], rows.read_slot_RJX, :rblocks])  # R J X B
        self.batches = self._batches(device)
        if owners is not None:
            self.seq_R = self._t(rows.seq_R)
            self.x_of_RJS = self._t(slot_positions(rows.read_slot_RJX, tables.shape[1]))

    @classmethod
    def of_tensors(cls, pool: KVPool, backend: AttentionBackend, flat_NJ: Tensor, rtable_NJXB: Tensor,
                   read_len_NJX: Tensor, col_N: Tensor, span: int, same_mask: bool) -> "PagedCall":
        """A call of one-token rows, in order, from its device tensors alone (no host tables): the form a
        compiled decode graph builds inside the graph (``compiled.DecodeGraphs``)."""
        call = cls.__new__(cls)
        call.pool, call.backend, call.owners, call.device = pool, backend, None, col_N.device
        call.span, call.same_mask, call.N, call.col_N = span, same_mask, col_N.shape[0], col_N
        call.flat_NJ, call.rtable_RJXB, call.read_len_RJX = flat_NJ, rtable_NJXB, read_len_NJX
        call.batches = [AttentionBatch(None, None, None, None, True)]
        return call

    def _t(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _device_writes(self, decided_N: Tensor, may_write_N: np.ndarray, row_N: np.ndarray, flat_NJ: np.ndarray,
                       base_RJ: np.ndarray, read_base_RJX: np.ndarray, own_RJX: np.ndarray) -> None:
        """Entries when some tokens' routing is known only on the device: a row of several such tokens
        ranks its writers on the device (a one-token row's rank is 0 either way)."""
        bs, trash = self.pool.block_size, self.pool.trash_entry
        writes_N = decided_N & self._t(may_write_N)
        row_t = self._t(row_N)
        if (self.rows.counts_R > 1).any():
            w = writes_N.long()
            before = w.cumsum(0) - w
            rank_N = before - before.index_select(0, self._t(self.rows.starts_R)).index_select(0, row_t)
            entry_NJ = self._t(base_RJ).index_select(0, row_t) + rank_N[:, None]
            wblocks = max(1, int(-(-(base_RJ + self.rows.counts_R[:, None]).max() // bs)))
            seq_R1 = self.rows.seq_R[:, None]
            tables = self._t(self._tables[seq_R1, self.rows.write_slot_RJ, :wblocks]).index_select(0, row_t)
            block_NJ = tables.gather(2, (entry_NJ // bs).clamp(max=wblocks - 1)[..., None])[..., 0]
            self.flat_NJ = torch.where(writes_N[:, None], block_NJ * bs + entry_NJ % bs, trash)
        else:
            self.flat_NJ = torch.where(writes_N[:, None], self._t(flat_NJ), trash)
        count_R = torch.zeros(len(self.rows.counts_R), dtype=torch.long, device=self.device)
        count_R.index_add_(0, row_t, writes_N.long())
        self.read_len_RJX = self._t(read_base_RJX) + self._t(own_RJX) * count_R[:, None, None]

    def _batches(self, device: torch.device) -> list[AttentionBatch]:
        counts, starts = self.rows.counts_R, self.rows.starts_R
        as_tensor = self._t
        single = np.flatnonzero(counts == 1)
        multi = np.flatnonzero(counts > 1)
        out = []
        if len(single):
            in_order = len(single) == len(counts)
            out.append(AttentionBatch(as_tensor(single), as_tensor(starts[single]), None, None, in_order))
        if len(multi):
            K = int(counts[multi].max())
            index_RK = starts[multi][:, None] + np.arange(K)[None]
            valid_RK = np.arange(K)[None] < counts[multi][:, None]
            index = as_tensor(np.where(valid_RK, index_RK, 0))
            out.append(AttentionBatch(as_tensor(multi), as_tensor(index_RK[valid_RK]), index,
                                      as_tensor(np.flatnonzero(valid_RK)), False))
        return out

    # ------------------------------------------------------------------ per layer

    def attend(self, j: int, q_HNE: Tensor, k_GNE: Tensor, v_GNE: Tensor) -> Tensor:
        self.write(j, k_GNE, v_GNE)
        if len(self.batches) == 1 and self.batches[0].in_order:
            return self.attend_rows(j, self.batches[0], q_HNE)
        out_HNE = torch.empty_like(q_HNE)
        for batch in self.batches:  # at most two: one-token rows, rows of several tokens
            out_HNE.index_copy_(1, batch.tokens, self.attend_rows(j, batch, q_HNE))
        return out_HNE

    def write(self, j: int, k_GNE: Tensor, v_GNE: Tensor) -> None:
        flat_N = self.flat_NJ[:, j]
        kv, bs = self.pool.kv, self.pool.block_size
        # indexed by (block, offset) on the pool itself, not on a view of it: a compiled graph writes in place
        where = (flat_N // bs, flat_N % bs)
        kv.index_put_(where, torch.stack([k_GNE, v_GNE], 1).transpose(0, 2).to(kv.dtype))  # (N, 2, G, E)
        self.pool.cols.index_put_(where, self.col_N)

    def attend_rows(self, j: int, batch: AttentionBatch, q_HNE: Tensor) -> Tensor:
        """Attention output (H, tokens of the batch, E)."""
        pool, bs = self.pool, self.pool.block_size
        H, E = q_HNE.shape[0], q_HNE.shape[-1]
        table_RXB = self.rtable_RJXB[:, j] if batch.in_order else self.rtable_RJXB[:, j].index_select(0, batch.rows_R)
        R, X, B = table_RXB.shape
        blocks = table_RXB.reshape(-1)
        if batch.index_RK is None:  # one query per row: the row's single token
            q_HRE = q_HNE if batch.in_order else q_HNE.index_select(1, batch.tokens)
            q_RHKE = q_HRE.transpose(0, 1)[:, :, None]
        else:
            q_RHKE = q_HNE.index_select(1, batch.index_RK.reshape(-1)).view(H, R, -1, E).transpose(0, 1)
        allowed_RKS = batch.mask if self.same_mask and batch.mask is not None else self.mask(j, batch, blocks, X, B)
        batch.mask = allowed_RKS
        out_RHKE = None
        if self.owners is not None and self.owners.failed is None:
            try:
                out_RHKE = self.attend_in_place(j, batch, table_RXB, allowed_RKS, q_RHKE)
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot be built here: the gather path
                self.owners.give_up(exc)
        if out_RHKE is None:
            kv_RS2GE = gather_blocks(pool.kv, blocks).view(R, X * B * bs, *pool.kv.shape[2:])
            k_RGSE, v_RGSE = kv_RS2GE[:, :, 0].transpose(1, 2), kv_RS2GE[:, :, 1].transpose(1, 2)
            out_RHKE = self.backend.attend(q_RHKE, k_RGSE, v_RGSE, allowed_BQS=allowed_RKS, causal=False)
        if batch.index_RK is None:
            return out_RHKE[:, :, 0].transpose(0, 1)
        return out_RHKE.transpose(0, 1).reshape(H, -1, E).index_select(1, batch.real)

    def attend_in_place(self, j: int, batch: AttentionBatch, table_RXB: Tensor, allowed_RKS: Tensor,
                        q_RHKE: Tensor) -> Tensor:
        pick = (lambda t: t) if batch.in_order else (lambda t: t.index_select(0, batch.rows_R))  # noqa: E731
        return attend_pages(self.pool.kv, self.pool.block_size, self.owners, pick(self.seq_R), pick(self.x_of_RJS[:, j]),
                            table_RXB, allowed_RKS, q_RHKE)

    def mask(self, j: int, batch: AttentionBatch, blocks: Tensor, X: int, B: int) -> Tensor:
        """(R, K, S): an entry is visible to a query iff it is stored, not later than the query's column, and
        not shadowed by an earlier-listed slot at the same column."""
        bs = self.pool.block_size
        R = blocks.shape[0] // (X * B)
        key_col_RS = gather_blocks(self.pool.cols, blocks).view(R, X * B * bs)
        read_len_RX = self.read_len_RJX[:, j] if batch.in_order else self.read_len_RJX[:, j].index_select(0, batch.rows_R)
        entry_S = torch.arange(B * bs, device=blocks.device).repeat(X)
        present_RS = entry_S[None] < read_len_RX.repeat_interleave(B * bs, dim=1)
        if X > 1:
            present_RS = present_RS & ~self.shadowed(key_col_RS, present_RS, X, self.span)
        if batch.index_RK is None:
            q_col_RK = (self.col_N if batch.in_order else self.col_N.index_select(0, batch.tokens))[:, None]
        else:
            q_col_RK = self.col_N[batch.index_RK]
        allowed_RKS = present_RS[:, None, :] & (key_col_RS[:, None, :] <= q_col_RK[:, :, None])
        return ensure_nonempty(allowed_RKS, (torch.arange(X * B * bs, device=blocks.device) == 0)[None, None])

    @staticmethod
    def shadowed(key_col_RS: Tensor, present_RS: Tensor, X: int, span: int) -> Tensor:
        """Entries whose column an earlier-listed slot of the same row also stores (precedence order)."""
        R, S = key_col_RS.shape
        cols_RXW = key_col_RS.view(R, X, S // X).clamp(0, span - 1)
        present_RXW = present_RS.view(R, X, S // X)
        seen_RC = torch.zeros(R, span, dtype=torch.long, device=key_col_RS.device)
        hidden = []
        for x in range(X):  # the slots a step reads (at most N_r), not tokens
            hidden.append((seen_RC.gather(1, cols_RXW[:, x]) > 0) & present_RXW[:, x])
            seen_RC = seen_RC.scatter_add(1, cols_RXW[:, x], present_RXW[:, x].long())
        return torch.cat(hidden, 1)


@torch.library.custom_op("adaptive::gather_blocks", mutates_args=())
def _gather_blocks_op(kv: Tensor, blocks: Tensor) -> Tensor:
    return kv.index_select(0, blocks)


@_gather_blocks_op.register_fake
def _(kv: Tensor, blocks: Tensor) -> Tensor:
    return kv.new_empty((blocks.shape[0], *kv.shape[1:]))


def gather_blocks(kv: Tensor, blocks: Tensor) -> Tensor:
    """``kv.index_select(0, blocks)``; inside a compiled graph an opaque op, so it runs as aten's copy of
    whole blocks rather than as generated per-element code (slower on the CPU: docs/benchmarks.md)."""
    if torch.compiler.is_compiling():
        return _gather_blocks_op(kv, blocks)
    return kv.index_select(0, blocks)

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

On the CPU the gather plus SDPA with a mask is the whole kernel. Rows of one token (decode) and rows of
several (prefill chunks) attend in separate batches, so a chunk's padding never multiplies decode work.

Shape legend: N tokens of the call, R rows, J layers of the call, X slots read per layer, S keys gathered
per row, G kv heads, H query heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adaptive.interfaces import AttentionBackend
from adaptive.model.engine import TokenKV, ensure_nonempty

Tensor = torch.Tensor


class KVPool:
    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.block_size = block_size
        self.kv = torch.zeros(num_blocks + 1, block_size, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.cols = torch.full((num_blocks + 1, block_size), -1, dtype=torch.long, device=device)
        self.trash_entry = num_blocks * block_size  # first entry of the trash block

    @property
    def bytes_per_entry(self) -> int:
        return self.kv[0, 0].numel() * self.kv.element_size()

    @property
    def bytes_reserved(self) -> int:
        """Bytes of the whole pool (allocated once)."""
        return (self.kv.shape[0] - 1) * self.block_size * self.bytes_per_entry


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


class PagedCall(TokenKV):
    """Writes and attention of one call (see the module docstring)."""

    def __init__(self, pool: KVPool, tables: np.ndarray, lengths: np.ndarray, rows: CallRows, col_N: Tensor,
                 write_N: Tensor, backend: AttentionBackend, max_col: int):
        self.pool, self.backend, self.rows = pool, backend, rows
        self.span = max_col + 1  # columns [0, span) cover every key a query of this call may see
        device = pool.kv.device
        bs = pool.block_size
        seq_R1, counts = rows.seq_R[:, None], rows.counts_R
        self.N = int(counts.sum())
        self.col_N = col_N
        # --- where each token's entry goes, per layer: base length of the row's slot + rank among writers
        row_N = torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).to(device)
        write_long_N = write_N.long()
        before_N = write_long_N.cumsum(0) - write_long_N
        rank_N = before_N - before_N.index_select(0, torch.from_numpy(rows.starts_R).to(device)).index_select(0, row_N)
        base_RJ = lengths[seq_R1, rows.write_slot_RJ]
        entry_NJ = torch.from_numpy(base_RJ).to(device).index_select(0, row_N) + rank_N[:, None]
        wblocks = max(1, int(-(-(base_RJ + counts[:, None]).max() // bs)))
        wtable_RJB = torch.from_numpy(np.ascontiguousarray(tables[seq_R1, rows.write_slot_RJ, :wblocks])).to(device)
        block_NJ = wtable_RJB.index_select(0, row_N).gather(2, (entry_NJ // bs).clamp(max=wblocks - 1)[..., None])[..., 0]
        self.flat_NJ = torch.where(write_N[:, None], block_NJ * bs + entry_NJ % bs, pool.trash_entry)
        count_R = torch.zeros(len(counts), dtype=torch.long, device=device).index_add_(0, row_N, write_long_N)
        # --- what each row reads, per layer: blocks of the read slots, and each slot's length after the write
        read_base_RJX = lengths[seq_R1[..., None], rows.read_slot_RJX]
        own_RJX = torch.from_numpy(rows.read_slot_RJX == rows.write_slot_RJ[..., None]).to(device)
        self.read_len_RJX = torch.from_numpy(read_base_RJX).to(device) + own_RJX * count_R[:, None, None]
        rblocks = max(1, int(-(-(read_base_RJX + counts[:, None, None]).max() // bs)))
        rtable = tables[seq_R1[..., None], rows.read_slot_RJX, :rblocks]  # R J X B
        self.rtable_RJXB = torch.from_numpy(np.ascontiguousarray(rtable)).to(device)
        self.batches = self._batches(device)

    def _batches(self, device: torch.device) -> list[AttentionBatch]:
        counts, starts = self.rows.counts_R, self.rows.starts_R
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
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
        kv_N2GE = torch.stack([k_GNE, v_GNE], 0).permute(2, 0, 1, 3).to(self.pool.kv.dtype)
        self.pool.kv.view(-1, *self.pool.kv.shape[2:]).index_copy_(0, flat_N, kv_N2GE)
        self.pool.cols.view(-1).index_copy_(0, flat_N, self.col_N)

    def attend_rows(self, j: int, batch: AttentionBatch, q_HNE: Tensor) -> Tensor:
        """Attention output (H, tokens of the batch, E)."""
        pool, bs = self.pool, self.pool.block_size
        H, E = q_HNE.shape[0], q_HNE.shape[-1]
        table_RXB = self.rtable_RJXB[:, j] if batch.in_order else self.rtable_RJXB[:, j].index_select(0, batch.rows_R)
        R, X, B = table_RXB.shape
        blocks = table_RXB.reshape(-1)
        kv_RS2GE = pool.kv.index_select(0, blocks).view(R, X * B * bs, *pool.kv.shape[2:])
        k_RGSE, v_RGSE = kv_RS2GE[:, :, 0].transpose(1, 2), kv_RS2GE[:, :, 1].transpose(1, 2)
        key_col_RS = pool.cols.index_select(0, blocks).view(R, X * B * bs)
        read_len_RX = self.read_len_RJX[:, j] if batch.in_order else self.read_len_RJX[:, j].index_select(0, batch.rows_R)
        entry_S = torch.arange(B * bs, device=blocks.device).repeat(X)
        present_RS = entry_S[None] < read_len_RX.repeat_interleave(B * bs, dim=1)
        if X > 1:
            present_RS = present_RS & ~self.shadowed(key_col_RS, present_RS, X, self.span)
        if batch.index_RK is None:  # one query per row: the row's single token
            q_HRE = q_HNE if batch.in_order else q_HNE.index_select(1, batch.tokens)
            q_RHKE = q_HRE.transpose(0, 1)[:, :, None]
            q_col_RK = (self.col_N if batch.in_order else self.col_N.index_select(0, batch.tokens))[:, None]
        else:
            q_RHKE = q_HNE.index_select(1, batch.index_RK.reshape(-1)).view(H, R, -1, E).transpose(0, 1)
            q_col_RK = self.col_N[batch.index_RK]
        allowed_RKS = present_RS[:, None, :] & (key_col_RS[:, None, :] <= q_col_RK[:, :, None])
        allowed_RKS = ensure_nonempty(allowed_RKS, (torch.arange(X * B * bs, device=blocks.device) == 0)[None, None])
        out_RHKE = self.backend.attend(q_RHKE, k_RGSE, v_RGSE, allowed_BQS=allowed_RKS, causal=False)
        if batch.index_RK is None:
            return out_RHKE[:, :, 0].transpose(0, 1)
        return out_RHKE.transpose(0, 1).reshape(H, -1, E).index_select(1, batch.real)

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

"""Attention straight over the KV pool with FlexAttention: no per-row copy of the keys and values.

The gather path (``PagedCall.attend_rows``) copies each row's blocks out of the pool, then calls the
model's attention backend. Here the whole pool is the key/value sequence of every row, as a strided view
with no copy. A ``BlockMask`` lists each row's own pages as the blocks to visit, and a ``mask_mod`` keeps
exactly the entries the gather path's mask allows. The mask is the same one: visible iff stored, at a
column no later than the query's, and not shadowed by an earlier-listed slot.

``mask_mod`` sees a physical entry of the pool. It maps the entry to the gather path's layout through
the block manager's per-block owner arrays: which batch row owns the block, for which slot, at which
position in that slot's table. So a row can never see another row's entries, even when a kernel ignores
the block sparsity (CPU eager mode does, and scores every entry).

On CUDA the kernel is compiled (``torch.compile(flex_attention)``). On the CPU it runs eagerly, which
scores the whole pool. That is slow, and it is there for the float64 exactness checks
(tests/test_serving.py compares it with the gather path for every registered KV policy); the CPU default
stays the gather path.

Shape legend: R rows, K queries per row, H query heads, G kv heads, E head dim, X slots read, B blocks
per slot, P pool entries, S = X·B·block size gathered keys.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from adaptive.serving.block_manager import BlockManager

Tensor = torch.Tensor


def flex_available(device: torch.device) -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return device.type in ("cuda", "cpu")


class PageOwners:
    """Device copies of the block manager's owner arrays, refreshed only when block ownership changes
    (reservations and releases happen between calls, so once per iteration at most).

    ``chosen`` says whether the user asked for this path (``paged_attention="flex"``). If not (``auto``),
    a kernel that fails to build on this device or torch turns the path off with a warning, and the engine
    goes on with the gather path."""

    def __init__(self, blocks: BlockManager, device: torch.device, chosen: bool):
        self.blocks, self.device, self.chosen = blocks, device, chosen
        self.version = -1
        self.row_P = self.slot_P = self.pos_P = None
        self.failed: str | None = None

    def give_up(self, exc: Exception) -> None:
        if self.chosen:
            raise exc
        self.failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"paged attention: FlexAttention over the pool failed here ({self.failed}); using the gather "
                      "path (set paged_attention='gather' to skip the attempt)", RuntimeWarning, stacklevel=2)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        b = self.blocks
        if b.version != self.version:
            as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
            self.row_P, self.slot_P, self.pos_P = as_t(b.block_row), as_t(b.block_slot), as_t(b.block_pos)
            self.version = b.version
        return self.row_P, self.slot_P, self.pos_P


def slot_positions(read_slot_RJX: np.ndarray, num_slots: int) -> np.ndarray:
    """(R, J, num_slots): the position of each slot in the row's read list for layer j, or -1."""
    R, J, X = read_slot_RJX.shape
    x_of = np.full((R, J, num_slots), -1, dtype=np.int64)
    r, j = np.meshgrid(np.arange(R), np.arange(J), indexing="ij")
    for x in range(X - 1, -1, -1):  # the first listing wins (the empty slot may pad several times)
        x_of[r, j, read_slot_RJX[:, :, x]] = x
    return x_of


@functools.lru_cache(maxsize=None)
def _kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)
    return flex_attention


def owned(row_P: Tensor, block: Tensor, seq: Tensor) -> Tensor:
    """Whether ``block`` belongs to batch row ``seq`` (the trash block and free blocks belong to none)."""
    return row_P[block] == seq


def attend_pages(kv: Tensor, block_size: int, owners: PageOwners, seq_R: Tensor, x_of_RS: Tensor,
                 table_RXB: Tensor, allowed_RKS: Tensor, q_RHKE: Tensor) -> Tensor:
    """Attention output (R, H, K, E) of each row's queries over the entries ``allowed_RKS`` allows, read
    in place from the pool ``kv`` (blocks + 1, block size, 2, G, E)."""
    from torch.nn.attention.flex_attention import BlockMask

    R, X, B = table_RXB.shape
    K, bs = q_RHKE.shape[2], block_size
    P, G, E = kv.shape[0] * bs, kv.shape[3], kv.shape[4]
    entries = kv.view(P, 2, G, E)
    k_1GPE, v_1GPE = entries[:, 0].permute(1, 0, 2)[None], entries[:, 1].permute(1, 0, 2)[None]
    row_P, slot_P, pos_P = owners.tensors()

    def mask_mod(b, h, q, entry):
        block = entry // bs
        x = x_of_RS[b, slot_P[block]]
        pos = pos_P[block]
        mine = owned(row_P, block, seq_R[b]) & (x >= 0) & (pos < B)
        s = torch.where(mine, (x * B + pos) * bs + entry % bs, 0)
        return mine & allowed_RKS[b, q, s]

    q_block = max(16, 1 << (K - 1).bit_length()) if q_RHKE.device.type == "cuda" else K
    mask = BlockMask.from_kv_blocks(torch.full((R, 1, 1), X * B, dtype=torch.int32, device=kv.device),
                                    table_RXB.reshape(R, 1, 1, X * B).to(torch.int32), BLOCK_SIZE=(q_block, bs),
                                    mask_mod=mask_mod, seq_lengths=(K, P), compute_q_blocks=False)
    with warnings.catch_warnings():  # eager on the CPU is deliberate (exactness checks), not a mistake
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _kernel(q_RHKE.device.type)(q_RHKE, k_1GPE, v_1GPE, block_mask=mask, enable_gqa=True)

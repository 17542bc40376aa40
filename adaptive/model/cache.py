"""Key/value storage for every logical layer (each (recursion step, layer) pair owns a slot).

Storage is indexed by *column*: the time index of a token in the batch as fed (prompt columns first,
then one column per decoded token). RoPE uses position ids, which differ from columns under left
padding. ``written_BS`` records which columns a slot holds: under recursion-wise caching a token that
exited writes nothing at deeper steps, so it is simply absent from those slots.

One class serves both uses: a persistent, preallocated cache for prefill/decoding (writes in place,
no autograd), and an ephemeral per-forward store for training when a step reads another step's slot
(writes out of place, so gradients flow).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Slot:
    k_BGSE: Tensor
    v_BGSE: Tensor
    written_BS: Tensor


class KVStore:
    """Per-logical-layer keys/values over ``max_len`` columns, allocated on first write."""

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, persistent: bool):
        self.batch = batch
        self.max_len = max_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.persistent = persistent
        self.length = 0  # columns filled by earlier forwards (host int: advanced by the model, never read from a tensor)
        self.slots: dict[int, Slot] = {}
        self.doc_ids_BS: Tensor | None = None

    def _slot(self, layer: int, like_k: Tensor, like_v: Tensor) -> Slot:
        slot = self.slots.get(layer)
        if slot is None:
            shape = (self.batch, self.num_kv_heads, self.max_len, self.head_dim)
            slot = Slot(like_k.new_zeros(shape), like_v.new_zeros(shape),
                        torch.zeros(self.batch, self.max_len, dtype=torch.bool, device=like_k.device))
            self.slots[layer] = slot
        return slot

    def write(self, layer: int, cols_BK: Tensor, k_BGKE: Tensor, v_BGKE: Tensor, mask_BK: Tensor | None,
              rows_R: Tensor | None = None) -> None:
        """Store keys/values at columns ``cols_BK`` (of batch rows ``rows_R``, default all); entries where
        ``mask_BK`` is False are not written."""
        slot = self._slot(layer, k_BGKE, v_BGKE)
        k_BGKE, v_BGKE = k_BGKE.to(slot.k_BGSE.dtype), v_BGKE.to(slot.v_BGSE.dtype)
        k_all, v_all, written_all = slot.k_BGSE, slot.v_BGSE, slot.written_BS
        if rows_R is not None:
            k_all, v_all, written_all = (t.index_select(0, rows_R) for t in (k_all, v_all, written_all))
        B, G, K, E = k_BGKE.shape
        index = cols_BK[:, None, :, None].expand(B, G, K, E)
        if mask_BK is not None:
            keep = mask_BK[:, None, :, None]
            k_BGKE = torch.where(keep, k_BGKE, k_all.gather(2, index))
            v_BGKE = torch.where(keep, v_BGKE, v_all.gather(2, index))
            written = mask_BK | written_all.gather(1, cols_BK)
        else:
            written = torch.ones_like(cols_BK, dtype=torch.bool)
        if self.persistent and rows_R is None:
            slot.k_BGSE.scatter_(2, index, k_BGKE)
            slot.v_BGSE.scatter_(2, index, v_BGKE)
            slot.written_BS.scatter_(1, cols_BK, written)
            return
        updated = (k_all.scatter(2, index, k_BGKE), v_all.scatter(2, index, v_BGKE), written_all.scatter(1, cols_BK, written))
        if rows_R is None:
            slot.k_BGSE, slot.v_BGSE, slot.written_BS = updated
        elif self.persistent:
            for full, part in zip((slot.k_BGSE, slot.v_BGSE, slot.written_BS), updated):
                full.index_copy_(0, rows_R, part)
        else:
            slot.k_BGSE, slot.v_BGSE, slot.written_BS = (
                full.index_copy(0, rows_R, part) for full, part in zip((slot.k_BGSE, slot.v_BGSE, slot.written_BS), updated))

    def read(self, layers: tuple[int, ...], upto: int, rows_R: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values and written-mask over columns [0, upto) (of rows ``rows_R``, default all); earlier
        ``layers`` shadow later ones."""
        def cut(t: Tensor, dim: int) -> Tensor:
            t = t.narrow(dim, 0, upto)
            return t if rows_R is None else t.index_select(0, rows_R)

        first, *rest = [self.slots[layer] for layer in layers]
        k, v, written = cut(first.k_BGSE, 2), cut(first.v_BGSE, 2), cut(first.written_BS, 1)
        for slot in rest:
            shadow = written[:, None, :, None]
            k = torch.where(shadow, k, cut(slot.k_BGSE, 2))
            v = torch.where(shadow, v, cut(slot.v_BGSE, 2))
            written = written | cut(slot.written_BS, 1)
        return k, v, written

    def set_doc_ids(self, doc_ids_BT: Tensor, start: int) -> None:
        if self.doc_ids_BS is None:
            self.doc_ids_BS = torch.zeros(self.batch, self.max_len, dtype=doc_ids_BT.dtype, device=doc_ids_BT.device)
        if not self.persistent:
            self.doc_ids_BS = self.doc_ids_BS.clone()
        self.doc_ids_BS[:, start:start + doc_ids_BT.shape[1]] = doc_ids_BT

    def entries_written(self, layers: list[int] | None = None) -> Tensor:
        """Number of (token, layer) entries stored, for measuring KV memory."""
        chosen = self.slots if layers is None else {i: self.slots[i] for i in layers if i in self.slots}
        total = torch.zeros((), dtype=torch.long)
        for slot in chosen.values():
            total = total + slot.written_BS[:, : self.length].sum().cpu()
        return total


class KVCache(KVStore):
    """The decoding cache: preallocated per slot, written in place, ``length`` columns filled."""

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int):
        super().__init__(batch, max_len, num_kv_heads, head_dim, persistent=True)

    def bytes_per_entry(self) -> int:
        slot = next(iter(self.slots.values()), None)
        itemsize = slot.k_BGSE.element_size() if slot is not None else 4
        return 2 * self.num_kv_heads * self.head_dim * itemsize

"""Key/value storage for every logical layer (each (recursion step, layer) pair owns a slot).

Entries are keyed by *column*: the time index of a token in the batch as fed (prompt columns first, then
one column per decoded token). RoPE uses position ids, which differ from columns under left padding.
``read`` returns, per entry, its column and whether it is present: under recursion-wise caching a token
that exited writes nothing at deeper steps, so it is simply absent from those slots.

Two stores share that interface:
* ``KVStore``: dense over columns, for one training forward when a step reads another step's slot
  (written out of place, so gradients flow);
* ``KVCache``: the decoding cache, compact: each slot keeps only the entries written to it, appended in
  column order, and grows in chunks. A recursion step that only some tokens reach therefore holds (and
  reads) only their keys/values: this is where recursion-wise caching saves memory and IO.
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
    """Per-logical-layer keys/values over ``max_len`` columns (dense), allocated on first write and written
    out of place, so gradients flow through one training forward."""

    persistent = False  # lives across forwards (the decoding cache) or only within one

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int):
        self.batch = batch
        self.max_len = max_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
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
        updated = (k_all.scatter(2, index, k_BGKE), v_all.scatter(2, index, v_BGKE), written_all.scatter(1, cols_BK, written))
        if rows_R is None:
            slot.k_BGSE, slot.v_BGSE, slot.written_BS = updated
        else:
            slot.k_BGSE, slot.v_BGSE, slot.written_BS = (
                full.index_copy(0, rows_R, part) for full, part in zip((slot.k_BGSE, slot.v_BGSE, slot.written_BS), updated))

    def read(self, layers: tuple[int, ...], upto: int, rows_R: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Keys, values, presence and column of the entries over columns [0, upto) (of rows ``rows_R``,
        default all); earlier ``layers`` shadow later ones."""
        k, v, written = self.read_dense(layers, upto, rows_R)
        return k, v, written, torch.arange(upto, device=written.device).expand_as(written)

    def read_dense(self, layers: tuple[int, ...], upto: int, rows_R: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values and written-mask indexed by column."""
        def cut(t: Tensor, dim: int) -> Tensor:
            t = t.narrow(dim, 0, upto)
            return t if rows_R is None else t.index_select(0, rows_R)

        first, *rest = [self.slots[layer] if layer in self.slots else self._empty() for layer in layers]
        k, v, written = cut(first.k_BGSE, 2), cut(first.v_BGSE, 2), cut(first.written_BS, 1)
        for slot in rest:
            shadow = written[:, None, :, None]
            k = torch.where(shadow, k, cut(slot.k_BGSE, 2))
            v = torch.where(shadow, v, cut(slot.v_BGSE, 2))
            written = written | cut(slot.written_BS, 1)
        return k, v, written

    def _empty(self) -> Slot:
        raise KeyError("a step read a slot that no step has written; the KV policy should have refused this")

    def set_doc_ids(self, doc_ids_BT: Tensor, start: int) -> None:
        if self.doc_ids_BS is None:
            self.doc_ids_BS = torch.zeros(self.batch, self.max_len, dtype=doc_ids_BT.dtype, device=doc_ids_BT.device)
        if not self.persistent:
            self.doc_ids_BS = self.doc_ids_BS.clone()
        self.doc_ids_BS[:, start:start + doc_ids_BT.shape[1]] = doc_ids_BT


@dataclass
class Entries:
    """One slot of the compact cache: entries in append order, ``capacity`` of them plus one trash entry
    (index ``capacity``) where masked-out writes land."""

    k_BGCE: Tensor
    v_BGCE: Tensor
    cols_BC: Tensor  # column of each entry; -1 = empty
    lens_B: Tensor  # entries written per row
    bound: int = 0  # host-side upper bound of lens_B (advanced by each write's width: no host sync)

    @property
    def capacity(self) -> int:
        return self.cols_BC.shape[1] - 1


class KVCache(KVStore):
    """The decoding cache: per slot, only the entries written to it (appended, grown in chunks)."""

    GROWTH = 64  # entries added at least when a slot grows
    persistent = True

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int):
        super().__init__(batch, max_len, num_kv_heads, head_dim)
        self.slots: dict[int, Entries] = {}  # type: ignore[assignment]

    def _entries(self, layer: int, like_k: Tensor, like_v: Tensor, needed: int) -> Entries:
        slot = self.slots.get(layer)
        if slot is None or needed > slot.capacity:
            old = slot.capacity if slot is not None else 0
            grown = needed if slot is None else min(self.max_len, max(needed, old + max(self.GROWTH, old // 4)))
            slot = self._resized(slot, grown, like_k, like_v)
            self.slots[layer] = slot
        return slot

    def _resized(self, slot: Entries | None, capacity: int, like_k: Tensor, like_v: Tensor) -> Entries:
        B, G, E = self.batch, self.num_kv_heads, self.head_dim
        fresh = Entries(like_k.new_zeros(B, G, capacity + 1, E), like_v.new_zeros(B, G, capacity + 1, E),
                        torch.full((B, capacity + 1), -1, dtype=torch.long, device=like_k.device),
                        torch.zeros(B, dtype=torch.long, device=like_k.device))
        if slot is not None:
            n = slot.capacity
            fresh.k_BGCE[:, :, :n] = slot.k_BGCE[:, :, :n]
            fresh.v_BGCE[:, :, :n] = slot.v_BGCE[:, :, :n]
            fresh.cols_BC[:, :n] = slot.cols_BC[:, :n]
            fresh.lens_B, fresh.bound = slot.lens_B, slot.bound
        return fresh

    def write(self, layer: int, cols_BK: Tensor, k_BGKE: Tensor, v_BGKE: Tensor, mask_BK: Tensor | None,
              rows_R: Tensor | None = None) -> None:
        """Append the entries at columns ``cols_BK`` (of rows ``rows_R``) whose ``mask_BK`` is True."""
        width = cols_BK.shape[1]
        prior = self.slots.get(layer)
        slot = self._entries(layer, k_BGKE, v_BGKE, (prior.bound if prior else 0) + width)
        keep_BK = torch.ones_like(cols_BK, dtype=torch.bool) if mask_BK is None else mask_BK
        lens_B = slot.lens_B if rows_R is None else slot.lens_B.index_select(0, rows_R)
        pos_BK = torch.where(keep_BK, lens_B[:, None] + keep_BK.long().cumsum(1) - 1, slot.capacity)
        parts = [slot.k_BGCE, slot.v_BGCE, slot.cols_BC]
        if rows_R is not None:
            parts = [t.index_select(0, rows_R) for t in parts]
        B, G, K, E = k_BGKE.shape
        index = pos_BK[:, None, :, None].expand(B, G, K, E)
        parts[0].scatter_(2, index, k_BGKE.to(parts[0].dtype))
        parts[1].scatter_(2, index, v_BGKE.to(parts[1].dtype))
        parts[2].scatter_(1, pos_BK, torch.where(keep_BK, cols_BK, -1))
        lens_B = lens_B + keep_BK.sum(1)
        if rows_R is None:
            slot.lens_B = lens_B
        else:
            for full, part in zip((slot.k_BGCE, slot.v_BGCE, slot.cols_BC), parts):
                full.index_copy_(0, rows_R, part)
            slot.lens_B = slot.lens_B.index_copy(0, rows_R, lens_B)
        slot.bound += width

    def read(self, layers: tuple[int, ...], upto: int, rows_R: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if len(layers) > 1:  # shadowing is by column: merge through a dense view of the slots
            return super().read(layers, upto, rows_R)
        slot = self.slots[layers[0]]
        n = max(slot.bound, 1)  # at least one (maybe empty) entry, so attention always has a key
        k, v, cols = slot.k_BGCE[:, :, :n], slot.v_BGCE[:, :, :n], slot.cols_BC[:, :n]
        if rows_R is not None:
            k, v, cols = k.index_select(0, rows_R), v.index_select(0, rows_R), cols.index_select(0, rows_R)
        return k, v, cols >= 0, cols

    def read_dense(self, layers: tuple[int, ...], upto: int, rows_R: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        dense = KVStore(self.batch, upto + 1, self.num_kv_heads, self.head_dim)
        for layer in layers:  # absent entries go to the trash column ``upto``
            k, v, present, cols = self.read((layer,), upto)
            dense.write(layer, torch.where(present, cols, upto), k, v, present)
        return dense.read_dense(layers, upto, rows_R)

    def written(self, layer: int, upto: int) -> Tensor:
        """Which columns [0, upto) the slot holds, as a (B, upto) mask."""
        _, _, present, cols = self.read((layer,), upto)
        trash = torch.where(present, cols, upto)
        return torch.zeros(self.batch, upto + 1, dtype=torch.bool, device=cols.device).scatter(1, trash, present)[:, :upto]

    def entries_written(self, layers: list[int] | None = None) -> Tensor:
        """Number of (token, layer) entries stored, for measuring KV memory."""
        chosen = self.slots if layers is None else {i: self.slots[i] for i in layers if i in self.slots}
        return sum((slot.lens_B.sum().cpu() for slot in chosen.values()), torch.zeros((), dtype=torch.long))

    def bytes_allocated(self, layers: list[int] | None = None) -> int:
        """Bytes of key/value storage the slots hold (capacity, not just entries written)."""
        chosen = self.slots if layers is None else {i: self.slots[i] for i in layers if i in self.slots}
        return sum(s.k_BGCE.numel() * s.k_BGCE.element_size() + s.v_BGCE.numel() * s.v_BGCE.element_size()
                   for s in chosen.values())

    def bytes_per_entry(self) -> int:
        slot = next(iter(self.slots.values()), None)
        itemsize = slot.k_BGCE.element_size() if slot is not None else 4
        return 2 * self.num_kv_heads * self.head_dim * itemsize

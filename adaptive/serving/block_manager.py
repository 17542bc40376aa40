"""Blocks of the KV pool: which sequence's slot holds which block, and how many entries each slot holds.

A *slot* is one logical layer, i.e. one (recursion step, layer) pair, or a prelude/coda layer. Every running
sequence has, per slot, a block table (the pool blocks holding its entries, in order) and a length (entries
written). Under recursion-wise caching a token writes an entry only at the steps it reached, so slots of
one sequence differ in length, and memory in use is the sum over tokens of the slots they wrote.

The tables and lengths live in host arrays (numpy), indexed by the sequence's batch row; the model runner
hands them to the device once per engine iteration. Blocks are reserved before a call writes (for the
largest number of entries it may write) and the unused tail is returned when the true count is known.
"""

from __future__ import annotations

import numpy as np


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than a reservation needs (the scheduler preempts and retries)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, max_rows: int, num_slots: int, max_len: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV pool needs at least one block of at least one entry (got {num_blocks} x {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_slots
        self.trash_block = num_blocks  # one extra block in the pool: masked writes land there, never allocated
        self.max_blocks = -(-max_len // block_size)
        # slot index num_slots is a permanently empty slot (rows that read fewer slots than others)
        self.tables = np.full((max_rows, num_slots + 1, self.max_blocks), self.trash_block, dtype=np.int64)
        self.lengths = np.zeros((max_rows, num_slots + 1), dtype=np.int64)
        self.held = np.zeros((max_rows, num_slots + 1), dtype=np.int64)  # blocks in each table
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.reserved: list[tuple[int, int]] = []  # (row, slot) given blocks that a write may not use
        self.max_len = max_len
        # the owner of every block (the trash block and free blocks: row -1), for attention that reads the
        # pool in place (paged_flex); ``version`` changes whenever ownership does
        self.block_row = np.full(num_blocks + 1, -1, dtype=np.int64)
        self.block_slot = np.full(num_blocks + 1, num_slots, dtype=np.int64)
        self.block_pos = np.zeros(num_blocks + 1, dtype=np.int64)
        self.version = 0

    # ------------------------------------------------------------------ accounting

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free)

    # ------------------------------------------------------------------ reserve, commit, release

    def reserve(self, row: int, slots: np.ndarray, extra: np.ndarray) -> None:
        """Make room for ``extra[i]`` more entries in slot ``slots[i]`` (distinct) of ``row``: all, or nothing.
        Most calls need no new block (a decode token fills one block in ``block_size``), so they cost a
        few array operations."""
        rows = np.full(len(slots), row)
        self._grow(rows, slots, -(-(self.lengths[row, slots] + extra) // self.block_size))

    def reserve_all(self, extra_RS: np.ndarray) -> None:
        """``reserve`` for every row at once: ``extra_RS[row, slot]`` more entries (all, or nothing)."""
        rows, slots = np.nonzero(extra_RS)
        self._grow(rows, slots, -(-(self.lengths[rows, slots] + extra_RS[rows, slots]) // self.block_size))

    def _grow(self, rows: np.ndarray, slots: np.ndarray, want: np.ndarray) -> None:
        """Give the (row, slot) pairs blocks until each holds ``want`` of them (all, or nothing)."""
        held = self.held[rows, slots]
        grow = want > held
        if not grow.any():
            return
        need = int((want - held)[grow].sum())
        if need > len(self.free):
            raise OutOfBlocks(f"{need} blocks needed, {len(self.free)} free")
        assert int(want.max()) <= self.max_blocks, "the scheduler keeps every sequence within the context"
        for row, s, h, w in zip(rows[grow].tolist(), slots[grow].tolist(), held[grow].tolist(), want[grow].tolist()):
            taken = self.free[len(self.free) - (w - h):]
            del self.free[len(self.free) - (w - h):]
            self.tables[row, s, h:w] = taken
            self.held[row, s] = w
            self.reserved.append((row, s))
            self.block_row[taken], self.block_slot[taken], self.block_pos[taken] = row, s, np.arange(h, w)
        self.version += 1

    def commit(self, rows: np.ndarray, slots: np.ndarray, written: np.ndarray) -> None:
        """``written[i]`` entries were appended to slot ``slots[i]`` of row ``rows[i]``."""
        np.add.at(self.lengths, (rows, slots), written)
        assert (self.lengths[rows, slots] <= self.held[rows, slots] * self.block_size).all(), \
            "a write outran its reservation"

    def trim_reserved(self) -> None:
        """Return the reserved blocks that no write used (once every count of the iteration is known)."""
        if not self.reserved:
            return
        rows, slots = np.array(self.reserved, dtype=np.int64).T
        self.reserved.clear()
        keep = -(-self.lengths[rows, slots] // self.block_size)
        surplus = self.held[rows, slots] > keep
        for row, slot, k in zip(rows[surplus].tolist(), slots[surplus].tolist(), keep[surplus].tolist()):
            held = int(self.held[row, slot])
            if held > k:  # (a pair may be listed twice)
                self._disown(self.tables[row, slot, k:held])
                self.free.extend(self.tables[row, slot, k:held].tolist())
                self.tables[row, slot, k:held] = self.trash_block
                self.held[row, slot] = k

    def release(self, row: int) -> None:
        """Return every block of ``row`` (its sequence finished or was preempted)."""
        mine = np.arange(self.max_blocks)[None] < self.held[row][:, None]
        self._disown(self.tables[row][mine])
        self.free.extend(self.tables[row][mine].tolist())
        self.tables[row] = self.trash_block
        self.lengths[row] = 0
        self.held[row] = 0
        self.reserved = [(r, s) for r, s in self.reserved if r != row]

    def _disown(self, blocks: np.ndarray) -> None:
        self.block_row[blocks], self.block_slot[blocks], self.block_pos[blocks] = -1, self.num_slots, 0
        self.version += 1

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
        self.reserved: set[tuple[int, int]] = set()  # (row, slot) holding blocks reserved but maybe not written
        self.max_len = max_len

    # ------------------------------------------------------------------ accounting

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free)

    def entries_in_use(self) -> int:
        return int(self.lengths.sum())

    def blocks_needed(self, row: int, extra: dict[int, int]) -> int:
        """New blocks that ``extra[slot]`` more entries in each slot of ``row`` would take."""
        bs = self.block_size
        return sum(max(0, -(-(int(self.lengths[row, s]) + n) // bs) - int(self.held[row, s])) for s, n in extra.items())

    # ------------------------------------------------------------------ reserve, commit, release

    def reserve(self, row: int, extra: dict[int, int]) -> None:
        """Make room for ``extra[slot]`` more entries in each slot of ``row``: all of it, or nothing."""
        need = self.blocks_needed(row, extra)
        if need > len(self.free):
            raise OutOfBlocks(f"{need} blocks needed, {len(self.free)} free")
        bs = self.block_size
        for s, n in extra.items():
            want = -(-(int(self.lengths[row, s]) + n) // bs)
            assert want <= self.max_blocks, "the scheduler keeps every sequence within the context"
            for i in range(int(self.held[row, s]), want):
                self.tables[row, s, i] = self.free.pop()
            self.held[row, s] = max(int(self.held[row, s]), want)
            self.reserved.add((row, s))

    def commit(self, row: int, slot: int, written: int) -> None:
        """``written`` entries were appended to the slot."""
        length = int(self.lengths[row, slot]) + written
        assert length <= int(self.held[row, slot]) * self.block_size, "a write outran its reservation"
        self.lengths[row, slot] = length

    def trim_reserved(self) -> None:
        """Return the reserved blocks that no write used (once every count of the iteration is known)."""
        for row, slot in self.reserved:
            self.trim(row, slot)
        self.reserved.clear()

    def trim(self, row: int, slot: int) -> None:
        keep = -(-int(self.lengths[row, slot]) // self.block_size)
        for i in range(keep, int(self.held[row, slot])):
            self.free.append(int(self.tables[row, slot, i]))
            self.tables[row, slot, i] = self.trash_block
        self.held[row, slot] = min(int(self.held[row, slot]), keep)

    def release(self, row: int) -> None:
        """Return every block of ``row`` (its sequence finished or was preempted)."""
        held = self.held[row]
        for s in np.nonzero(held)[0]:
            self.free.extend(int(b) for b in self.tables[row, s, : held[s]])
        self.tables[row] = self.trash_block
        self.lengths[row] = 0
        self.held[row] = 0
        self.reserved = {(r, s) for r, s in self.reserved if r != row}

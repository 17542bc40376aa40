"""What the engine measured while it ran: routing depths, KV memory in use and reserved, preemptions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adaptive.serving.block_manager import BlockManager
from adaptive.serving.sequence import Group


@dataclass
class EngineStats:
    num_steps: int
    bytes_per_entry: int
    step_layers: list[list[int]]
    iterations: int = 0
    preemptions: int = 0
    depth_hist: np.ndarray = field(init=False)  # tokens (prompt and generated) by recursion steps run
    peak_entries: int = 0  # (token, slot) entries stored, at the fullest iteration
    peak_blocks: int = 0
    peak_step_entries: int = 0  # entries in the recursion block's slots at the fullest iteration
    peak_columns: int = 0  # tokens with keys/values in the cache then (a slot every token writes holds them)

    def __post_init__(self) -> None:
        self.depth_hist = np.zeros(self.num_steps + 1, dtype=np.int64)
        self.step_runs = np.zeros(self.num_steps, dtype=np.int64)  # tokens run per step, independent routing only
        self.block_slots = [s for layers in self.step_layers for s in layers]

    def group_done(self, g: Group) -> None:
        """A group that completed (a preempted one never does, so recomputation is not counted twice)."""
        self.depth_hist += np.bincount(g.depth_T, minlength=self.num_steps + 1)
        for step, runs in g.step_runs.items():
            self.step_runs[step] += runs

    def iteration(self, blocks: BlockManager, preempted: int) -> None:
        self.iterations += 1
        self.preemptions += preempted
        entries = int(blocks.lengths.sum())
        if entries >= self.peak_entries:
            self.peak_entries = entries
            self.peak_step_entries = int(blocks.lengths[:, self.block_slots].sum()) if self.block_slots else 0
            self.peak_columns = int(blocks.lengths.max(axis=1).sum())
        self.peak_blocks = max(self.peak_blocks, blocks.blocks_in_use)

    @property
    def mean_depth(self) -> float:
        n = self.depth_hist.sum()
        return float((self.depth_hist * np.arange(len(self.depth_hist))).sum() / n) if n else 0.0

    @property
    def step_fractions(self) -> list[float]:
        """Share of tokens that ran each recursion step."""
        n = self.depth_hist.sum()
        if self.step_runs.any():  # independent routing (MoD): a depth counts steps run, not the last step reached
            return [float(min(runs / n, 1.0)) if n else 0.0 for runs in self.step_runs]
        return [float(self.depth_hist[s + 1:].sum() / n) if n else 0.0 for s in range(self.num_steps)]

    @property
    def block_kv_fraction(self) -> float | None:
        """Recursion-block entries in use over what ``full`` caching would hold for the same tokens (every
        token at every step), at the fullest iteration; compare with ``routed_fraction``."""
        if not self.block_slots or not self.peak_columns:
            return None
        return self.peak_step_entries / (len(self.block_slots) * self.peak_columns)

    @property
    def routed_fraction(self) -> float:
        """Entries that reached each step over N_r entries: the mean depth over N_r."""
        return self.mean_depth / self.num_steps if self.num_steps else 0.0

    def as_dict(self, block_size: int) -> dict:
        return {"iterations": self.iterations, "preemptions": self.preemptions,
                "depth_hist": self.depth_hist.tolist(), "mean_depth": self.mean_depth,
                "step_fractions": self.step_fractions, "block_kv_fraction": self.block_kv_fraction,
                "routed_fraction": self.routed_fraction,
                "peak_kv_bytes_in_use": self.peak_entries * self.bytes_per_entry,
                "peak_kv_bytes_reserved": self.peak_blocks * block_size * self.bytes_per_entry}

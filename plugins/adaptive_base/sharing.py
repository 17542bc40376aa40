"""Sharing schemes (SPEC §2.1): which physical layer serves each logical layer.

With L logical layers and N_r recursion steps, layer l (0-based) uses physical block
  cycle            l mod (L/N_r)
  sequence         floor(l / N_r)
  middle_cycle     first and last unique; middle ((l-1) mod ((L-2)/N_r)) + 1
  middle_sequence  first and last unique; middle floor((l-1)/N_r) + 1
A recursion step is a contiguous run of L/N_r (or (L-2)/N_r) logical layers. A depth that does not divide
is an error, or (``on_indivisible: pad``) is rounded up by adding layers, with a warning. Layers are
never dropped silently.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

from pydantic import Field

from adaptive import ComponentConfig, DepthPlan, SharingScheme


class SharingConfig(ComponentConfig):
    on_indivisible: Literal["error", "pad"] = Field(default="error", description="error, or add layers until the depth divides")


class _RecursiveScheme(SharingScheme):
    Config = SharingConfig
    unique_ends: bool = False  # first and last layer kept out of the recursion

    def plan(self, num_layers: int, num_recursions: int) -> DepthPlan:
        ends = 2 if self.unique_ends else 0
        middle = num_layers - ends
        if middle < num_recursions:
            raise ValueError(
                f"{self.name} needs at least {num_recursions + ends} layers for num_recursions={num_recursions}, got num_layers={num_layers}"
            )
        if middle % num_recursions:
            padded = math.ceil(middle / num_recursions) * num_recursions + ends
            if self.config.on_indivisible == "error":
                lower = middle // num_recursions * num_recursions + ends
                raise ValueError(
                    f"{self.name}: num_layers={num_layers} does not split into num_recursions={num_recursions} equal steps"
                    f" (valid: num_layers={lower} or {padded}, or on_indivisible: pad)"
                )
            warnings.warn(f"{self.name}: num_layers={num_layers} padded to {padded} so that {num_recursions} steps divide it")
            middle = padded - ends
        per_step = middle // num_recursions
        steps = tuple(tuple(self.physical(i, j, per_step, num_recursions) + (1 if self.unique_ends else 0) for j in range(per_step)) for i in range(num_recursions))
        offset = 1 if self.unique_ends else 0
        prelude = (0,) if self.unique_ends else ()
        coda = (per_step + offset,) if self.unique_ends else ()
        return DepthPlan(num_physical=per_step + 2 * offset, prelude=prelude, steps=steps, coda=coda)

    @staticmethod
    def physical(step: int, j: int, per_step: int, num_recursions: int) -> int:
        """Physical index (within the recursion block) of the j-th layer of recursion step ``step``."""
        raise NotImplementedError  # each scheme below implements it


class Cycle(_RecursiveScheme):
    """Cycle: the block of L/N_r layers is repeated N_r times (l mod L/N_r)."""

    name = "cycle"

    @staticmethod
    def physical(step: int, j: int, per_step: int, num_recursions: int) -> int:
        return j


class Sequence(_RecursiveScheme):
    """Sequence: each layer repeats N_r times in a row (floor(l / N_r)); steps are contiguous chunks."""

    name = "sequence"

    @staticmethod
    def physical(step: int, j: int, per_step: int, num_recursions: int) -> int:
        return (step * per_step + j) // num_recursions


class MiddleCycle(Cycle):
    """Middle-Cycle (the paper's default): first and last layer unique, the middle cycled."""

    name = "middle_cycle"
    unique_ends = True


class MiddleSequence(Sequence):
    """Middle-Sequence: first and last layer unique, the middle layers each repeated N_r times."""

    name = "middle_sequence"
    unique_ends = True


class NoSharing(SharingScheme):
    """Vanilla: every logical layer has its own weights, no recursion block (num_recursions must be 1)."""

    name = "none"
    Config = ComponentConfig

    def plan(self, num_layers: int, num_recursions: int) -> DepthPlan:
        if num_recursions != 1:
            raise ValueError(f"sharing 'none' has no recursion: set model.num_recursions=1 (got {num_recursions}) or choose cycle/middle_cycle")
        return DepthPlan(num_physical=num_layers, prelude=tuple(range(num_layers)), steps=(), coda=())


SCHEMES = [NoSharing, Cycle, Sequence, MiddleCycle, MiddleSequence]

"""Building the model under test, feeding it, and recording what it did.

Every check runs in float64 on the CPU, in eval mode, with the routing rule named explicitly
(``training_rule``), so that two runs that should agree agree to ~1e-12 and any larger difference is a bug.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from adaptive.interfaces import ComponentConfig, DepthScheduler
from adaptive.model.config import ModelConfig
from adaptive.model.transformer import AdaptiveLM, build_model
from adaptive.plugins import get_registry
from adaptive.recipe import load as load_recipe
from adaptive.registry import Registry

Tensor = torch.Tensor
ModelLike = Union[AdaptiveLM, ModelConfig, dict, str, Path]

DEFAULT_VOCAB = 64


def single_threaded(check):
    """Run a check with one intra-op thread: micro models are ~100x slower when threads contend."""

    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


class FixedCapacities(DepthScheduler):
    """The capacities a check was asked to use, whatever the model's own schedule says (not registered)."""

    name = "fixed_capacities"
    Config = ComponentConfig

    def __init__(self, capacities: list[float]):
        super().__init__(ComponentConfig())
        self.fixed = list(capacities)

    def capacities(self, base: list[float], progress: float | None) -> list[float]:
        if len(self.fixed) != len(base):
            raise ValueError(f"{len(self.fixed)} capacities given for a model with {len(base)} recursion steps")
        return list(self.fixed)


def model_config(model_or_config: ModelConfig | dict | str | Path) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a ``model`` mapping, or a recipe file (its ``model`` section)."""
    if isinstance(model_or_config, ModelConfig):
        return model_or_config
    if isinstance(model_or_config, dict):
        return ModelConfig.model_validate(model_or_config)
    return load_recipe(model_or_config).model


def as_model(model_or_config: ModelLike, *, registry: Registry | None = None, seed: int = 0,
             capacities: list[float] | None = None, dtype: torch.dtype = torch.float64) -> AdaptiveLM:
    """The model to check: a float64 CPU copy of a given model, or one built (seeded) from a config.

    ``capacities`` replaces the depth schedule with fixed per-step capacities.
    """
    if isinstance(model_or_config, AdaptiveLM):
        model = copy.deepcopy(model_or_config)
    else:
        config = model_config(model_or_config)
        torch.manual_seed(seed)
        model = build_model(config, registry or get_registry(), vocab_size=config.vocab_size or DEFAULT_VOCAB)
    model = model.to(device="cpu", dtype=dtype).eval()
    if capacities is not None:
        model.engine.scheduler = FixedCapacities(capacities)
    return model


def random_tokens(model: AdaptiveLM, batch: int, length: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, length), generator=generator)


@dataclass
class Trace:
    """What a forward produced: logits, and the routing decisions at every step (steps no token reached
    are all False), in a form two runs can be compared by."""

    logits_BTV: Tensor
    selected_RBT: Tensor
    depth_BT: Tensor

    def columns(self, cols: slice | Tensor) -> "Trace":
        return Trace(self.logits_BTV[:, cols], self.selected_RBT[:, :, cols], self.depth_BT[:, cols])

    def rows(self, rows: slice | Tensor) -> "Trace":
        return Trace(self.logits_BTV[rows], self.selected_RBT[:, rows], self.depth_BT[rows])

    def clone(self) -> "Trace":
        return Trace(self.logits_BTV.clone(), self.selected_RBT.clone(), self.depth_BT.clone())

    def paste(self, other: "Trace", row: int, start: int) -> None:
        """Overwrite row ``row`` from column ``start`` on with the single-row ``other``."""
        cols = slice(start, start + other.depth_BT.shape[1])
        self.logits_BTV[row, cols] = other.logits_BTV[0]
        self.selected_RBT[:, row, cols] = other.selected_RBT[:, 0]
        self.depth_BT[row, cols] = other.depth_BT[0]

    @staticmethod
    def cat(traces: list["Trace"]) -> "Trace":
        """Traces of consecutive column ranges, joined."""
        return Trace(torch.cat([t.logits_BTV for t in traces], 1), torch.cat([t.selected_RBT for t in traces], 2),
                     torch.cat([t.depth_BT for t in traces], 1))

    @staticmethod
    def cat_rows(traces: list["Trace"]) -> "Trace":
        """Traces of separate rows, stacked into one batch."""
        return Trace(torch.cat([t.logits_BTV for t in traces], 0), torch.cat([t.selected_RBT for t in traces], 1),
                     torch.cat([t.depth_BT for t in traces], 0))


def run(model: AdaptiveLM, tokens_BT: Tensor, **forward_kwargs: Any) -> Trace:
    """One forward (no autograd), recorded as a Trace."""
    with torch.no_grad():
        out = model(tokens_BT, **forward_kwargs)
    B, T = tokens_BT.shape
    selected_RBT = torch.zeros(model.plan.num_steps, B, T, dtype=torch.bool)
    for step, selected_BT in enumerate(out.stats.selected_per_step[: model.plan.num_steps]):
        selected_RBT[step] = selected_BT.cpu()
    depth_BT = out.stats.depth_BT.cpu() if out.stats.depth_BT is not None else torch.zeros(B, T, dtype=torch.long)
    return Trace(out.logits_BTV.detach().cpu(), selected_RBT, depth_BT)


def run_router_logits(model: AdaptiveLM, tokens_BT: Tensor, **forward_kwargs: Any) -> list[Tensor | None]:
    """The router's logits at every step (None where the router gives none)."""
    with torch.no_grad():
        out = model(tokens_BT, **forward_kwargs)
    return [None if x is None else x.detach().cpu() for x in out.stats.logits_per_step]


def run_pieces(model: AdaptiveLM, tokens_BT: Tensor, pieces: list[int], *, training_rule: bool = False,
               position_ids_BT: Tensor | None = None, valid_BT: Tensor | None = None,
               progress: float | None = None) -> Trace:
    """Feed ``tokens_BT`` through one KV cache in consecutive pieces of the given lengths."""
    B, T = tokens_BT.shape
    if sum(pieces) != T or any(n <= 0 for n in pieces):
        raise ValueError(f"pieces {pieces} must be positive and sum to the length {T}")
    cache = model.new_cache(B, T)
    traces, start = [], 0
    for n in pieces:
        cols = slice(start, start + n)
        traces.append(run(model, tokens_BT[:, cols], cache=cache, training_rule=training_rule, progress=progress,
                          position_ids_BT=None if position_ids_BT is None else position_ids_BT[:, cols],
                          valid_BT=None if valid_BT is None else valid_BT[:, cols]))
        start += n
    return Trace.cat(traces)


def left_padded(tokens_BT: Tensor, pads: list[int], pad_BT: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row b keeps its first T - pads[b] tokens, shifted right behind pads[b] pad tokens (taken from
    ``pad_BT``). Returns tokens, valid mask and position ids that restart at 0 after the pads."""
    B, T = tokens_BT.shape
    cols_BT = torch.arange(T).expand(B, T)
    pads_B1 = torch.tensor(pads)[:, None]
    valid_BT = cols_BT >= pads_B1
    source_BT = (cols_BT - pads_B1).clamp(min=0)
    padded_BT = torch.where(valid_BT, tokens_BT.gather(1, source_BT), pad_BT)
    return padded_BT, valid_BT, source_BT

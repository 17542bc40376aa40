"""Compiled decode calls: ``torch.compile`` (CUDA graphs on CUDA) for the calls whose rows are one token each.

A decode iteration calls the model's layers on a few hundred tokens at most, so much of its time goes to
dispatching and launching small kernels, not to the kernels. ``DecodeGraphs`` runs such a call (the shared
recursion block, the prelude, the coda) as one compiled graph, traced from the layers' own code
(``RecursionEngine.run_tokens``) and the pool's writes and gathered attention (``PagedCall``): never a
second copy.

On CUDA (``mode="reduce-overhead"``: CUDA graphs, which need static shapes) every call is padded up to a
*bucket*: rows to the next of ``row_buckets`` (powers of two, then the batch), blocks read per row to the
next power of two. Padded rows write to the pool's trash entry and read nothing; their outputs are
dropped. The pool is marked as a static address, so a graph writes it in place, and each output is copied
out before the next graph runs. On the CPU the graphs are shape-dynamic (inductor's C++), so calls are not
padded (``PAD_ON_CPU`` turns padding on, for the tests).

Graphs are built on first use, per set of layers (and, on CUDA, per bucket). The steps of one shared
recursion block run the same weights, so they share graphs (the layers are named by the first step's). The
first call of each set of layers runs eagerly: it makes the fused projection weights the graphs read
(``fused_weight``). Prefill chunks (rows of several tokens), tokens frozen at a ``writes="all"`` step, and
FlexAttention over the pool stay eager: the decode call is the one that repeats thousands of times.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable

import torch

from adaptive.model.block import serving_graphs
from adaptive.model.engine import RecursionEngine
from adaptive.serving.kv_pool import KVPool, PagedCall

Tensor = torch.Tensor
BACKEND = "inductor"  # torch.compile's backend (tests swap in "aot_eager" to trace without code generation)
PAD_ON_CPU = False  # pad to buckets on the CPU too (the CPU graphs are shape-dynamic; tests check the padding)


def row_buckets(max_rows: int) -> list[int]:
    """Powers of two below ``max_rows``, then ``max_rows``."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return out + [max_rows]


class DecodeGraphs:
    """The compiled decode calls of one serving engine (its pool), built on first use."""

    def __init__(self, engine: RecursionEngine, pool: KVPool, max_rows: int, max_blocks: int, max_len: int):
        self.engine, self.pool = engine, pool
        self.buckets = row_buckets(max_rows)
        self.max_blocks, self.max_len = max_blocks, max_len
        self.trash_block = pool.kv.shape[0] - 1
        self.cuda = pool.kv.device.type == "cuda"
        if self.cuda:
            torch._dynamo.mark_static_address(pool.kv)
            torch._dynamo.mark_static_address(pool.cols)
        self.graph = compiled_call("reduce-overhead" if self.cuda else None)
        self.warm: set[tuple[int, ...]] = set()
        self.failed: str | None = None  # why compiling failed (the calls then run eagerly)

    def eligible(self, call: PagedCall, frozen_ND: Tensor | None) -> bool:
        """One-token rows in order, none frozen, gathered attention, and graphs that could be built."""
        one_batch = len(call.batches) == 1 and call.batches[0].in_order
        return self.failed is None and frozen_ND is None and call.owners is None and one_batch

    def block_bucket(self, blocks: int) -> int:
        b = 1
        while b < blocks:
            b *= 2
        return min(b, self.max_blocks)

    def run(self, logical: tuple[int, ...], x_ND: Tensor, cos_NE: Tensor, sin_NE: Tensor, call: PagedCall) -> Tensor:
        """``engine.run_tokens(logical, x_ND, cos_NE, sin_NE, call)`` for an ``eligible`` call, compiled."""
        if logical not in self.warm:  # the first call of these layers runs eagerly (fused weights get made)
            self.warm.add(logical)
            return self.engine.run_tokens(logical, x_ND, cos_NE, sin_NE, call)
        N, table_RJXB = x_ND.shape[0], call.rtable_RJXB
        R, B = N, table_RJXB.shape[-1]
        if self.cuda or PAD_ON_CPU:
            R, B = self.buckets[bisect.bisect_left(self.buckets, N)], self.block_bucket(B)
        pad = R - N
        table_RJXB = _pad(_pad(table_RJXB, B - table_RJXB.shape[-1], self.trash_block, dim=3), pad, self.trash_block)
        try:
            with serving_graphs():
                out_RD = self.graph(self.engine, logical, call.same_mask, call.backend, self.max_len, self.pool.kv,
                                    self.pool.cols, _pad(x_ND, pad, 0), _pad(cos_NE, pad, 0), _pad(sin_NE, pad, 0),
                                    _pad(call.flat_NJ, pad, self.pool.trash_entry), table_RJXB,
                                    _pad(call.read_len_RJX, pad, 0), _pad(call.col_N, pad, 0))
        except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler for inductor: the eager path, said once
            self.give_up(exc)
            return self.engine.run_tokens(logical, x_ND, cos_NE, sin_NE, call)  # rewrites the same entries
        return out_RD[:N].clone() if self.cuda or pad else out_RD

    def give_up(self, exc: Exception) -> None:
        self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
        warnings.warn(f"EngineConfig.compile: the decode graphs could not be compiled here ({self.failed}); "
                      "this engine runs them eagerly", RuntimeWarning, stacklevel=3)


def decode_call(engine: RecursionEngine, logical: tuple[int, ...], same_mask: bool, backend, span: int, kv: Tensor,
                cols: Tensor, x_RD: Tensor, cos_RE: Tensor, sin_RE: Tensor, flat_RJ: Tensor, rtable_RJXB: Tensor,
                read_len_RJX: Tensor, col_R: Tensor) -> Tensor:
    """What a compiled graph runs: the engine's ``run_tokens`` over a ``PagedCall`` made of these tensors."""
    call = PagedCall.of_tensors(KVPool.over(kv, cols), backend, flat_RJ, rtable_RJXB, read_len_RJX, col_R, span,
                                same_mask)
    return engine.run_tokens(logical, x_RD, cos_RE, sin_RE, call)


_COMPILED: dict[tuple[str, str | None], Callable] = {}


def compiled_call(mode: str | None) -> Callable:
    """``decode_call`` compiled (one wrapper per backend and mode, shared by every engine, so a new engine on
    the same model reuses the graphs). Sizes that change between calls become symbolic (dynamo's automatic
    dynamic shapes), so on the CPU a few graphs per set of layers serve every batch size; on CUDA, CUDA
    graphs are recorded per bucket. Each model and set of layers adds entries to dynamo's cache for the
    function, so its limit is raised to hold them."""
    key = (BACKEND, mode if BACKEND == "inductor" else None)
    if key not in _COMPILED:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 64)
        _COMPILED[key] = torch.compile(decode_call, backend=key[0], mode=key[1])
    return _COMPILED[key]


def _pad(t: Tensor, n: int, value, dim: int = 0) -> Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t, t.new_full(shape, value)], dim)

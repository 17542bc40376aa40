"""The model runner: assembles each call's batch and drives the model's own recursion engine through its
step-level entry points (``RecursionEngine.run_tokens``, ``route_tokens``, ``update``).

Device state, all preallocated: the KV pool, and an *arena* of per-token state for the tokens in flight
(hidden state, the hidden state entering the recursion block, the latest routing decision: selected, gate
and the router's carry). A group's tokens hold arena rows from admission until their group finishes.

One iteration (``ServingEngine.step``) calls, in order: ``fill`` (keys/values that exited tokens still owe
a ``writes="all"`` policy), ``finish`` (coda, head, sampling), ``admit`` (embedding, prelude, step-0
routing), ``block_calls`` (one call of the shared block per group of steps that share weights: items at
different steps together, each reading its own step's slots, then each step's update and next routing),
``finish`` again for the groups that just ran the last step, and ``sync``: the iteration's one host sync.

A router that declares ``hierarchical = False`` (independent steps, Mixture-of-Depths) routes every token
of a group at every step: the tokens it keeps run the step, the others skip it (owing only that step's
``writes="all"`` keys/values) and are routed again at the next step; a group may skip a whole step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from adaptive.model.transformer import AdaptiveLM
from adaptive.serving.block_manager import BlockManager
from adaptive.serving.compiled import DecodeGraphs
from adaptive.serving.kv_pool import CallRows, KVPool, PagedCall
from adaptive.serving.paged_flex import PageOwners
from adaptive.serving.sampling import SamplingBatch, sample
from adaptive.serving.sequence import Group

Tensor = torch.Tensor


class ModelRunner:
    def __init__(self, model: AdaptiveLM, blocks: BlockManager, pool: KVPool, max_rows: int, arena_size: int,
                 attention_path: str = "gather", chosen: bool = False, graphs: DecodeGraphs | None = None):
        self.model, self.engine, self.plan = model, model.engine, model.plan
        self.blocks, self.pool = blocks, pool
        self.owners = PageOwners(blocks, pool.kv.device, chosen) if attention_path == "flex" else None
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        engine, plan = self.engine, self.plan
        self.empty_slot = plan.num_logical
        self.num_steps = plan.num_steps
        self.prelude = tuple(range(len(plan.prelude)))
        self.coda = tuple(engine.coda_layers)
        self.writes = [engine.kv_policy.writes(s) for s in range(plan.num_steps)]
        self.read_slots = [[engine.read_slots(l, engine.kv_policy.reads(s)) for l in engine.step_layers[s]]
                           for s in range(plan.num_steps)]
        self.capacities = engine.inference_capacities()
        self.hierarchical = engine.router.hierarchical
        self.step_groups, _ = engine.shared_step_groups()
        # the layers that name each step's call: the first step of its shared group (same weights), so the
        # steps of one group share compiled graphs
        self.call_layers = {s: tuple(engine.step_layers[steps[0]]) for steps in self.step_groups for s in steps}
        self.graphs = graphs
        self.max_reads = max([len(engine.kv_policy.reads(s)) for s in range(plan.num_steps)] + [1])
        self._tables: dict[tuple, np.ndarray] = {}
        D = model.config.d_model
        self.hidden_AD = torch.zeros(arena_size, D, dtype=self.dtype, device=self.device)
        self.first_AD = torch.zeros_like(self.hidden_AD)
        self.selected_A = torch.ones(arena_size, dtype=torch.bool, device=self.device)
        self.gate_A: Tensor | None = None
        self.carry_A: Any = None
        self.free_arena: list[int] = list(range(arena_size - 1, -1, -1))
        self.next_token_R = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        positions = torch.arange(blocks.max_len, device=self.device)[None]
        cos, sin = model.rotary.cos_sin(positions, self.dtype)  # rotary tables at every column, once
        self.cos_LE, self.sin_LE = cos[0, 0], sin[0, 0]
        self.payload: list[tuple[str, Any, Tensor]] = []

    # ------------------------------------------------------------------ arena

    def take_arena(self, n: int) -> np.ndarray:
        assert n <= len(self.free_arena), "the scheduler admitted more tokens than the arena holds"
        taken = self.free_arena[len(self.free_arena) - n:]
        del self.free_arena[len(self.free_arena) - n:]
        return np.array(taken, dtype=np.int64)

    def give_arena(self, rows: np.ndarray) -> None:
        self.free_arena.extend(int(r) for r in rows)

    def _t(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    # ------------------------------------------------------------------ calls

    def _call(self, rows: list[tuple[Group, np.ndarray]], write_slots: list[tuple[int, ...]],
              read_slots: list[list[tuple[int, ...]]], may_write_N: np.ndarray, decided_N: Tensor | None,
              col_N: Tensor, max_col: int) -> PagedCall:
        J = len(write_slots[0])
        read_RJX = np.stack([self._read_table(reads) for reads in read_slots]) if len(read_slots) > 1 else \
            self._read_table(read_slots[0])[None]
        call_rows = CallRows(np.array([g.request.row for g, _ in rows], dtype=np.int64),
                             np.array([len(t) for _, t in rows], dtype=np.int64),
                             np.array(write_slots, dtype=np.int64).reshape(len(rows), J), read_RJX)
        return PagedCall(self.pool, self.blocks.tables, self.blocks.lengths, call_rows, col_N, may_write_N, decided_N,
                         self.engine.backend, max_col, self.owners)

    def _read_table(self, reads: list[tuple[int, ...]]) -> np.ndarray:
        """(J, X) slots read by each layer, padded with the empty slot (cached per distinct reads)."""
        key = tuple(reads)
        table = self._tables.get(key)
        if table is None:
            table = np.full((len(reads), self.max_reads), self.empty_slot, dtype=np.int64)
            for j, r in enumerate(reads):
                table[j, : len(r)] = r
            self._tables[key] = table
        return table

    def _positions(self, rows: list[tuple[Group, np.ndarray]]) -> tuple[np.ndarray, Tensor, Tensor, Tensor]:
        cols = np.concatenate([g.start + t for g, t in rows]).astype(np.int64)
        col_N = self._t(cols)
        return cols, col_N, self.cos_LE.index_select(0, col_N), self.sin_LE.index_select(0, col_N)

    def _commit(self, rows: list[tuple[Group, np.ndarray]], slots: list[tuple[int, ...]]) -> None:
        if not rows:
            return
        slot_RJ = np.array(slots, dtype=np.int64).reshape(len(rows), -1)
        seq_RJ = np.repeat([g.request.row for g, _ in rows], slot_RJ.shape[1]).reshape(slot_RJ.shape)
        count_RJ = np.repeat([len(t) for _, t in rows], slot_RJ.shape[1]).reshape(slot_RJ.shape)
        real = slot_RJ != self.empty_slot
        self.blocks.commit(seq_RJ[real], slot_RJ[real], count_RJ[real])

    def _own_slot_call(self, layers: tuple[int, ...], rows: list[tuple[Group, np.ndarray]]):
        """(call, cos, sin) where every token writes, and reads, its own layer's slot of ``layers``."""
        cols, col_N, cos, sin = self._positions(rows)
        call = self._call(rows, [layers] * len(rows), [[(l,) for l in layers]] * len(rows), np.ones(len(cols), bool),
                          None, col_N, int(cols.max()))
        return call, cos, sin

    def _run_tokens(self, layers: tuple[int, ...], x_ND: Tensor, cos: Tensor, sin: Tensor, call: PagedCall,
                    frozen_ND: Tensor | None = None, frozen_N: Tensor | None = None) -> Tensor:
        """The engine's ``run_tokens``; a decode call goes through its compiled graph when there is one."""
        if self.graphs is not None and self.graphs.eligible(call, frozen_ND):
            return self.graphs.run(layers, x_ND, cos, sin, call)
        return self.engine.run_tokens(layers, x_ND, cos, sin, call, frozen_ND=frozen_ND, frozen_N=frozen_N)

    def run_segment(self, layers: tuple[int, ...], rows: list[tuple[Group, np.ndarray]], x_ND: Tensor) -> Tensor:
        """Prelude or coda layers: every token writes and reads its own layer's slot."""
        call, cos, sin = self._own_slot_call(layers, rows)
        out_ND = self._run_tokens(layers, x_ND, cos, sin, call)
        self._commit(rows, [layers] * len(rows))
        return out_ND

    # ------------------------------------------------------------------ fill, finish, admit

    def fill(self, work: list[tuple[Group, np.ndarray, int]]) -> None:
        """Keys/values of exited tokens at the steps from ``first`` on that write ``"all"`` (from the token's
        frozen hidden state): a later token at such a step attends to them, as in the full forward. With an
        independent (non-hierarchical) router a token skipped at ``first`` owes that step only."""
        for step in range(self.num_steps):
            if self.writes[step] != "all":
                continue
            owed: dict[int, tuple[Group, list[np.ndarray]]] = {}
            for g, t, first in work:
                if len(t) and (first == step or (self.hierarchical and first < step)):
                    owed.setdefault(id(g), (g, []))[1].append(t)
            rows = [(g, np.sort(np.concatenate(parts))) for g, parts in owed.values()]
            if not rows:
                continue
            layers = tuple(self.engine.step_layers[step])
            call, cos, sin = self._own_slot_call(layers, rows)
            h_ND = self.hidden_AD.index_select(0, self._t(np.concatenate([g.arena[t] for g, t in rows])))
            for j, logical in enumerate(layers):
                call.write(j, *self.engine.keys_values_of(logical, h_ND, cos, sin))
            self._commit(rows, [layers] * len(rows))

    def finish(self, groups: list[Group]) -> None:
        """Coda, then head and sampling for the groups that end with their request's newest token."""
        if not groups:
            return
        rows = [(g, np.arange(g.length)) for g in groups]
        arena = self._t(np.concatenate([g.arena for g in groups]))
        h_ND = self.hidden_AD.index_select(0, arena)
        if self.coda:
            h_ND = self.run_segment(self.coda, rows, h_ND)
        sampling = [i for i, g in enumerate(groups) if g.samples]
        if not sampling:
            return
        ends = np.cumsum([g.length for g in groups]) - 1
        last_FD = h_ND.index_select(0, self._t(ends[sampling]))
        logits_FV = self.model.lm_head(self.model.final_norm(last_FD))
        chosen = [groups[i] for i in sampling]
        batch = SamplingBatch([g.request.params for g in chosen], [g.request.seed for g in chosen],
                              [g.request.num_sampled for g in chosen], self.device)
        tokens_F = sample(logits_FV, batch)
        self.next_token_R.index_copy_(0, self._t(np.array([g.request.row for g in chosen])), tokens_F)
        self.payload.append(("sampled", chosen, tokens_F))
        for i, g in enumerate(chosen):
            if g.request.params.return_logits:
                g.request.logits.append(logits_FV[i])

    def admit(self, groups: list[Group], token_ids: list[list[int]]) -> None:
        """Embed the groups' tokens, run the prelude, and route step 0."""
        if not groups:
            return
        rows = [(g, np.arange(g.length)) for g in groups]
        host_ids = np.concatenate([np.asarray(ids if ids else [0], dtype=np.int64) for ids in token_ids])
        ids_N = self._t(host_ids)
        if any(g.from_device for g in groups):
            device_N = self._t(np.concatenate([np.full(g.length, g.from_device) for g in groups]))
            row_N = self._t(np.concatenate([np.full(g.length, g.request.row) for g in groups]))
            ids_N = torch.where(device_N, self.next_token_R.index_select(0, row_N), ids_N)
        x_ND = self.model.embed(ids_N)
        if self.prelude:
            x_ND = self.run_segment(self.prelude, rows, x_ND)
        arena = self._t(np.concatenate([g.arena for g in groups]))
        self.hidden_AD.index_copy_(0, arena, x_ND)
        self.first_AD.index_copy_(0, arena, x_ND)
        if self.num_steps:
            self.route(0, arena, x_ND[:, None], x_ND[:, None], None, None, rows)

    # ------------------------------------------------------------------ routing state

    def route(self, step: int, arena: Tensor, h_N1D: Tensor, first_N1D: Tensor, carry: Any,
              active_N1: Tensor | None, rows: list[tuple[Group, np.ndarray]]) -> None:
        """Route the tokens ``rows`` (group, offsets) at ``step``; the decisions stay in the arena, and the
        host reads them at the iteration's sync."""
        decision, selected_N1 = self.engine.route_tokens(step, h_N1D, first_N1D, carry, self.capacities[step])
        if active_N1 is not None:
            selected_N1 = selected_N1 & active_N1
        self.selected_A.index_copy_(0, arena, selected_N1[:, 0])
        gate = decision.gate_BT[:, 0]
        if self.gate_A is None or self.gate_A.shape[1:] != gate.shape[1:] or self.gate_A.dtype != gate.dtype:
            self.gate_A = gate.new_zeros((self.hidden_AD.shape[0], *gate.shape[1:]))
        self.gate_A.index_copy_(0, arena, gate)
        if decision.carry is not None:
            if self.carry_A is None:
                self.carry_A = tree_map(lambda t: t.new_zeros((self.hidden_AD.shape[0], *t.shape[2:])), decision.carry)
            tree_zip(lambda store, t: store.index_copy_(0, arena, t[:, 0]), self.carry_A, decision.carry)
        self.payload.append(("selected", (step, rows), selected_N1[:, 0]))

    def carry_of(self, arena: Tensor) -> Any:
        if self.carry_A is None:
            return None
        return tree_map(lambda store: store.index_select(0, arena)[:, None], self.carry_A)

    # ------------------------------------------------------------------ the shared block

    def block_calls(self, groups: list[Group]) -> list[Group]:
        """One call of the shared block per group of steps that share weights; returns the groups that ran
        their last step (they go on to the coda in this iteration)."""
        done = []
        for steps in self.step_groups:
            members = sorted((g for g in groups if g.step in steps), key=lambda g: g.step)
            if members:
                running = [g for g in members if len(g.running())]  # (independent routing may skip a step whole)
                if running:
                    self.block_call(running)
                if not self.hierarchical:
                    self.route_next(members)
                done += [g for g in members if g.step + 1 == self.num_steps]
        return done

    def block_call(self, groups: list[Group]) -> None:
        rows = [(g, g.running()) for g in groups]
        cols, col_N, cos, sin = self._positions(rows)
        arena = self._t(np.concatenate([g.arena[t] for g, t in rows]))
        x_ND = self.hidden_AD.index_select(0, arena)
        first_ND = self.first_AD.index_select(0, arena)
        sel_N = self.selected_A.index_select(0, arena)
        gate_N = self.gate_A.index_select(0, arena)
        carry = self.carry_of(arena)
        writes = [self.writes[g.step] for g in groups]
        counts = [len(t) for _, t in rows]
        may_write_N = np.repeat([w != "none" for w in writes], counts)
        undecided = [g.live is None and w == "selected" for g, w in zip(groups, writes)]
        decided_N = None
        if any(undecided):  # step-0 routing of just-admitted tokens, known on the device only
            decided_N = sel_N | self._t(np.repeat([not u for u in undecided], counts))
        frozen = any(w == "all" and g.live is None for w, g in zip(writes, groups))
        step_layers = self.engine.step_layers
        write_slots = [tuple(step_layers[g.step]) if w != "none" else (self.empty_slot,) * len(step_layers[0])
                       for g, w in zip(groups, writes)]
        call = self._call(rows, write_slots, [self.read_slots[g.step] for g in groups], may_write_N, decided_N, col_N,
                          int(cols.max()))
        out_ND = self._run_tokens(self.call_layers[groups[0].step], x_ND, cos, sin, call,
                                  frozen_ND=x_ND if frozen else None, frozen_N=~sel_N if frozen else None)
        self._commit([r for r, g in zip(rows, groups) if g.live is not None or self.writes[g.step] == "all"],
                     [s for s, g in zip(write_slots, groups) if g.live is not None or self.writes[g.step] == "all"])
        new_parts, start = [], 0
        for step in sorted({g.step for g in groups}):
            members = [(g, t) for g, t in rows if g.step == step]
            n = sum(len(t) for _, t in members)
            part = slice(start, start + n)
            new_N1D = self.engine.update(step, x_ND[part, None], out_ND[part, None], gate_N[part, None],
                                         first_ND[part, None], sel_N[part, None])
            new_parts.append(new_N1D[:, 0])
            if step + 1 < self.num_steps and self.hierarchical:  # (independent routing: route_next, below)
                part_carry = tree_map(lambda t: t[part], carry) if carry is not None else None
                self.route(step + 1, arena[part], new_N1D, first_ND[part, None], part_carry, sel_N[part, None], members)
            start += n
        self.hidden_AD.index_copy_(0, arena, new_parts[0] if len(new_parts) == 1 else torch.cat(new_parts))

    def route_next(self, groups: list[Group]) -> None:
        """Independent (non-hierarchical) routing: every token of each group, whether it ran the group's step
        or skipped it, is routed at the next step from its hidden state now."""
        for step in sorted({g.step for g in groups if g.step + 1 < self.num_steps}):
            members = [g for g in groups if g.step == step]
            arena = self._t(np.concatenate([g.arena for g in members]))
            h_N1D = self.hidden_AD.index_select(0, arena)[:, None]
            self.route(step + 1, arena, h_N1D, self.first_AD.index_select(0, arena)[:, None], self.carry_of(arena),
                       None, [(g, np.arange(g.length)) for g in members])

    # ------------------------------------------------------------------ the one host sync

    def sync(self) -> list[tuple[str, Any, list[int]]]:
        """Bring this iteration's routing decisions and sampled tokens to the host in one transfer."""
        if not self.payload:
            return []
        parts, self.payload = self.payload, []
        values = torch.cat([t.long() for _, _, t in parts]).tolist()
        out, start = [], 0
        for kind, meta, t in parts:
            out.append((kind, meta, values[start:start + t.shape[0]]))
            start += t.shape[0]
        return out


def tree_map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor of a router's carry (tensors, dataclasses, tuples, lists, dicts)."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: tree_map(fn, getattr(tree, f.name)) for f in dataclasses.fields(tree)})
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, t) for t in tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return tree


def tree_zip(fn: Callable[[Tensor, Tensor], Any], a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        fn(a, b)
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        for f in dataclasses.fields(a):
            tree_zip(fn, getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            tree_zip(fn, x, y)
    elif isinstance(a, dict):
        for k in a:
            tree_zip(fn, a[k], b[k])

"""The training loop behind ``adaptive train RECIPE``.

One optimizer step: ``grad_accum`` micro-batches per process (the global batch is ``train.batch_size``
sequences however it is spread), forward under autocast, loss = next-token cross-entropy + the model's
already-scaled auxiliary losses, backward, gradient clipping, the schedule's rate, AdamW, then
``model.after_optimizer_step(stats)``: the router's and each FFN's state (see ``adaptive.train.distributed``
for that contract).

Everything that decides the numbers (weights, optimizer, RNG, data position) is in the checkpoint, so
a resumed CPU run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import random
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from adaptive.errors import RecipeError, TrainingError
from adaptive.interfaces import RoutingStats
from adaptive.model.transformer import next_token_loss
from adaptive.recipe import Recipe
from adaptive.registry import Registry
from adaptive.train import checkpoint as ckpt
from adaptive.train import distributed as D
from adaptive.train.data import Batch, TrainData, load_data, unigram_entropy
from adaptive.train.metrics import (MetricsWriter, ProgressView, StepAccumulator, format_duration, is_finite,
                                    routing_summary)
from adaptive.train.preflight import preflight
from adaptive.train.tokenizer import TOKENIZER_FILE, atomic_write_bytes
from adaptive.train.rundir import prepare_run_dir
from adaptive.train.runstate import StopSignal, rng_state, set_rng_state
from adaptive.train.schedule import apply_lr
from adaptive.vocab import with_resolved_vocab

console = Console()


@dataclass
class RunResult:
    run_dir: Path
    step: int
    final_loss: float | None
    val_loss: float | None
    unigram_entropy: float
    interrupted: bool = False
    stopped_by: str | None = None  # the signal (SIGINT, SIGTERM) that stopped a run after saving


def train(recipe: Recipe, registry: Registry, resume: bool = False, recipe_path: str | None = None) -> RunResult:
    """Train the recipe's model; returns where the run is and its final numbers."""
    info = D.setup(recipe.train)
    try:
        preflight(recipe, registry, info.device, info.world, warn=False, source=recipe_path,  # before the run dir
                  main_process=info.is_main)
        return Trainer(recipe, registry, info, resume, recipe_path).run()
    finally:
        D.teardown(info)


def total_steps(recipe: Recipe, registry: Registry, vocab_size: int) -> tuple[int, float | None]:
    """Steps until the first of train.steps / tokens / flop_budget is reached, and FLOPs per token."""
    t = recipe.train
    per_step = t.batch_size * recipe.data.seq_len
    limits, flops_per_token = [], None
    if t.steps is not None:
        limits.append(t.steps)
    if t.tokens is not None:
        limits.append(math.ceil(t.tokens / per_step))
    try:
        from adaptive.flops import count_flops

        with warnings.catch_warnings():  # the accountant's model repeats the warnings of the real one
            warnings.simplefilter("ignore")
            report = count_flops(recipe.model, registry, seq_len=recipe.data.seq_len, vocab_size=vocab_size)
        flops_per_token = report.flops_per_token_train  # at the after-training capacities (progress=None)
    except ImportError:
        if t.flop_budget is not None:
            raise RecipeError(["train.flop_budget: needs the FLOP accountant (adaptive.flops), which is not installed; "
                               "use train.steps or train.tokens"]) from None
    if t.flop_budget is not None:
        limits.append(max(1, int(t.flop_budget // (flops_per_token * per_step))))
    if not limits:
        raise RecipeError(["train.steps: set train.steps, train.tokens or train.flop_budget"])
    return min(limits), flops_per_token


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and embeddings); none on norms, gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def merge_stats(all_stats: list[RoutingStats]) -> RoutingStats:
    """One RoutingStats for the micro-batches of an optimizer step (batch dimension concatenated)."""
    if len(all_stats) == 1:
        return all_stats[0]
    cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)  # noqa: E731
    steps = min(len(s.selected_per_step) for s in all_stats)
    scored = min(len(s.logits_per_step) for s in all_stats)
    metrics = {k: torch.stack([s.metrics[k] for s in all_stats if k in s.metrics]).float().mean()
               for k in all_stats[0].metrics}
    return RoutingStats(
        depth_BT=cat([s.depth_BT for s in all_stats]),
        selected_per_step=[torch.cat([s.selected_per_step[r] for s in all_stats]) for r in range(steps)],
        logits_per_step=[cat([s.logits_per_step[r] for s in all_stats]) for r in range(scored)],
        metrics=metrics,
        ffn_counts={k: sum(s.ffn_counts[k] for s in all_stats if k in s.ffn_counts) for k in all_stats[0].ffn_counts},
    )


class Trainer:
    def __init__(self, recipe: Recipe, registry: Registry, info: D.DistInfo, resume: bool, recipe_path: str | None):
        try:  # the run dir's recipe.yaml records the vocabulary the model is built with (adaptive.vocab)
            recipe = with_resolved_vocab(recipe)
        except ValueError as exc:
            raise RecipeError([str(exc)]) from None
        self.recipe, self.registry, self.info, self.cfg = recipe, registry, info, recipe.train
        if all(getattr(self.cfg, k) is None for k in ("steps", "tokens", "flop_budget")):
            raise RecipeError(["train.steps: set train.steps, train.tokens or train.flop_budget"])
        self.rundir = prepare_run_dir(recipe, info, resume)
        self.run_dir, self.resume_from = self.rundir.path, self.rundir.resume_from
        try:
            self.set_up(recipe, registry, info, recipe_path)
        except BaseException:  # refused before it started: the lock is given up, no empty run directory stays
            self.rundir.release(refused=True)
            raise

    def set_up(self, recipe: Recipe, registry: Registry, info: D.DistInfo, recipe_path: str | None) -> None:
        self.log = ProgressView(1, 0, False, console)
        torch.manual_seed(recipe.seed)
        random.seed(recipe.seed)
        with D.main_first(info):
            self.data: TrainData = load_data(recipe.data, recipe.tokenizer, registry, recipe.seed)
        if info.is_main:  # generation and evaluation read the tokenizer from the run directory
            atomic_write_bytes(self.run_dir / TOKENIZER_FILE, self.data.tokenizer.tok.to_str().encode())
        self.micro = self.micro_batch_size()
        self.build_model()
        self.total, self.flops_per_token = total_steps(recipe, registry, self.model.vocab_size)
        self.step, self.position, self.tokens, self.elapsed = 0, 0, 0, 0.0
        self.metrics = MetricsWriter(self.run_dir, info.is_main, self.cfg.tensorboard)
        self.acc = StepAccumulator(self.model.plan.num_steps)
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        rows = self.data.validation_rows(self.cfg.eval_batches * self.cfg.batch_size, info.world)
        self.val_rows = rows[info.rank::info.world]
        self.entropy = unigram_entropy(self.data.validation.batch(rows).targets_BT, self.data.tokenizer.vocab_size)
        self.recipe_path = recipe_path

    # ------------------------------------------------------------------ set-up

    def micro_batch_size(self) -> int:
        t, world = self.cfg, self.info.world
        if t.batch_size % (t.grad_accum * world):
            raise RecipeError([f"train.batch_size: {t.batch_size} sequences must divide evenly over "
                               f"grad_accum={t.grad_accum} x {world} process(es)"])
        return t.batch_size // (t.grad_accum * world)

    def build_model(self) -> None:
        from adaptive.model import build_model

        if self.data.tokenizer.vocab_size > self.recipe.model.vocab_size:
            raise RecipeError([f"model.vocab_size: {self.recipe.model.vocab_size} is smaller than the tokenizer's "
                               f"{self.data.tokenizer.vocab_size} tokens"])
        model = build_model(self.recipe.model, self.registry, vocab_size=self.recipe.model.vocab_size)
        if self.cfg.init_from is not None and self.resume_from is None:
            initial = ckpt.initial_weights(self.cfg.init_from)
            ckpt.check_fit(model, initial, f"train.init_from: {self.cfg.init_from}", tied=self.recipe.model.tie_embeddings)
            model.load_state_dict(initial, strict=False)
        self.model = model.to(self.info.device)
        wrapped = self.model
        if self.cfg.compile and self.info.strategy != "fsdp2":
            wrapped = torch.compile(wrapped)
        wrapped = D.wrap(wrapped, self.info)
        if self.cfg.compile and self.info.strategy == "fsdp2":
            wrapped = torch.compile(wrapped)
        self.wrapped = wrapped
        fused = self.info.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(wrapped, self.cfg.weight_decay), lr=self.cfg.lr,
                                           betas=tuple(self.cfg.betas), fused=fused or None)
        dtype = self.cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.info.device.type == "cuda" else "float32"
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ checkpoints

    def restore(self, path: Path) -> None:
        weights, state, meta = ckpt.load_checkpoint(path)
        ckpt.check_train_state(path, state)
        try:
            D.load_model_state(self.wrapped, weights, self.info)
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{path}: the weights do not fit this recipe's model "
                                       f"({ckpt.one_line(exc)}); the model section must match the run being "
                                       "resumed") from None
        try:
            D.load_optimizer_state(self.wrapped, self.optimizer, state["optimizer"], self.info)
            ckpt.check_optimizer_shapes(self.optimizer)
            set_rng_state(state["rng"])
        except (ValueError, RuntimeError, TypeError, KeyError) as exc:
            raise ckpt.CheckpointError(f"{path}: the training state does not fit this run's model and optimizer "
                                       f"({ckpt.one_line(exc)})") from None
        self.step, self.position, self.tokens = int(state["step"]), int(state["position"]), int(state["tokens"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.last_loss, self.val_loss = meta.get("loss"), meta.get("val_loss")
        self.metrics.truncate_after(self.step)
        if self.step < self.total:  # a finished run gets no resume (nor a second end) record
            self.metrics.write({"event": "resume", "step": self.step, "checkpoint": str(path)})

    def save(self) -> Path | None:
        self.flush_train()  # checks the loss is finite before anything is written
        weights = D.model_state(self.wrapped, self.info)
        optim = D.optimizer_state(self.wrapped, self.optimizer, self.info)
        path = None
        if self.info.is_main:
            self.check_finite_weights(weights)
            state = {"optimizer": optim, "rng": rng_state(), "step": self.step, "position": self.position,
                     "tokens": self.tokens, "elapsed": self.elapsed}
            meta = {"tokens": self.tokens, "loss": self.last_loss, "val_loss": self.val_loss, "time": time.time()}
            path = ckpt.save_checkpoint(self.run_dir, self.step, weights, state, meta, self.cfg.keep_checkpoints)
        D.barrier(self.info)
        return path

    # ------------------------------------------------------------------ one step

    def forward_loss(self, batch: Batch, progress: float | None):
        with self.autocast():
            out = self.wrapped(batch.inputs_BT, position_ids_BT=batch.position_ids_BT, doc_ids_BT=batch.doc_ids_BT,
                               progress=progress)
            ce = next_token_loss(out.logits_BTV, batch.targets_BT)
        return out, ce

    def train_step(self) -> None:
        cfg, info = self.cfg, self.info
        self.wrapped.train()
        progress = self.step / self.total
        stats, ce_total, aux = [], 0.0, {}
        for m in range(cfg.grad_accum):
            batch = self.data.micro_batch(self.position, m * info.world + info.rank, self.micro).to(info.device)
            with D.no_sync(self.wrapped, info, m < cfg.grad_accum - 1):
                out, ce = self.forward_loss(batch, progress)
                ((ce + out.aux_loss) / cfg.grad_accum).backward()
            ce_total = ce_total + ce.detach() / cfg.grad_accum
            for name, value in out.aux_losses.items():
                aux[name] = aux.get(name, 0.0) + value.detach() / cfg.grad_accum
            stats.append(out.stats)
        for name, value in aux.items():
            self.acc.add(f"aux/{name}", value)
        # the norm is always computed (an infinite limit scales by exactly 1): a non-finite one stops the run
        norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
        self.lr = apply_lr(self.optimizer, self.step, self.total, cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        merged = merge_stats(stats)
        self.model.after_optimizer_step(merged)  # the router's and each FFN's state (an MoE's loss-free bias)
        self.acc.add_step(ce_total, norm)
        self.acc.add_stats(merged)
        self.acc.tokens += cfg.batch_size * self.recipe.data.seq_len
        self.step += 1
        self.position += cfg.batch_size
        self.tokens += cfg.batch_size * self.recipe.data.seq_len

    # ------------------------------------------------------------------ logging and evaluation

    def flush_train(self) -> None:
        """Read back the accumulated values, check them, write one metrics record."""
        acc = self.acc
        if not acc.losses:
            return
        losses = torch.stack(acc.losses)
        D.all_reduce_(losses, self.info)
        values = (losses / self.info.world).tolist()
        norms = torch.stack(acc.grad_norms).tolist()
        self.check_finite(values, norms)
        seconds = time.perf_counter() - acc.started
        self.elapsed += seconds
        record = {"step": self.step, "loss": sum(values) / len(values), "lr": self.lr, "tokens": self.tokens,
                  "tok_per_s": acc.tokens / max(seconds, 1e-9), "grad_norm": sum(norms) / len(norms)}
        if len(values) == 1:
            record["loss"] = values[0]
        if self.flops_per_token is not None:
            record["flops"] = self.flops_per_token * self.tokens
        for name, total in acc.sums.items():
            record[name] = float(total) / acc.counts[name]
        if acc.depth_hist is not None:
            record.update(routing_summary(acc.depth_hist.tolist()))
        self.last_loss = values[-1]
        self.metrics.write(record)
        self.log.update(record, self.total)
        acc.reset()

    def check_finite(self, losses: list[float], norms: list[float]) -> None:
        """Stop before anything is saved when a step's loss or gradient norm is NaN or infinite."""
        if is_finite(losses) and is_finite(norms):
            return
        first_step = self.step - len(losses) + 1
        i = next(i for i, (a, b) in enumerate(zip(losses, norms)) if not (math.isfinite(a) and math.isfinite(b)))
        what = f"loss became {losses[i]}" if not math.isfinite(losses[i]) else f"gradient norm became {norms[i]}"
        last = ckpt.latest_checkpoint(self.run_dir)
        raise TrainingError(f"training stopped: the {what} at step {first_step + i}. Nothing was saved after it; "
                            f"the last good checkpoint is {last or 'none'}. Lower train.lr, keep train.grad_clip set, "
                            "or try train.dtype=float32.")

    def check_finite_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Never save (nor call good) weights that hold a NaN or an infinity; one host sync per save."""
        bad = ckpt.nonfinite_tensors(weights)
        if bad:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingError(f"training stopped: the weights became non-finite by step {self.step} (in "
                                f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). Nothing was saved; the last "
                                f"good checkpoint is {last or 'none'}. Lower train.lr, keep train.grad_clip set, "
                                "or try train.dtype=float32.")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy over the fixed validation rows, eval mode (causal routing)."""
        self.flush_train()
        total = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        depth = StepAccumulator(self.model.plan.num_steps)
        model = D.unwrap(self.wrapped)  # no DDP buffer broadcast: processes may run different routing
        model.eval()
        with D.gathered(self.wrapped, self.info):
            for chunk in self.val_rows.split(self.micro):
                batch = self.data.validation.batch(chunk).to(self.info.device)
                with self.autocast():
                    out = model(batch.inputs_BT, position_ids_BT=batch.position_ids_BT, doc_ids_BT=batch.doc_ids_BT)
                ce = next_token_loss(out.logits_BTV, batch.targets_BT, reduction="sum")
                total += torch.stack([ce.double(), torch.tensor(batch.num_tokens, dtype=torch.float64, device=ce.device)])
                depth.add_stats(out.stats)
        model.train()
        D.all_reduce_(total, self.info)
        self.val_loss = float(total[0] / total[1])
        record = {"step": self.step, "val_loss": self.val_loss, "val_unigram_entropy": self.entropy}
        if depth.depth_hist is not None:  # routing under the causal inference rule (this process's rows)
            record.update({f"val_{k}": v for k, v in routing_summary(depth.depth_hist.tolist()).items()})
        self.metrics.write(record)
        self.log.update(record, self.total)
        return self.val_loss

    # ------------------------------------------------------------------ the run

    def start_records(self) -> None:
        m = self.model
        self.metrics.write({"event": "start", "recipe": self.recipe_path, "run_dir": str(self.run_dir),
                            "params": m.num_params(),
                            "total_steps": self.total, "processes": self.info.world, "strategy": self.info.strategy,
                            "device": str(self.info.device)})
        self.metrics.write({"event": "data", "source": self.data.description, "train_sequences": len(self.data.train),
                            "validation_sequences": len(self.data.validation), "vocab_size": self.data.tokenizer.vocab_size,
                            "val_unigram_entropy": self.entropy})

    def run(self) -> RunResult:
        try:
            if self.resume_from is not None:
                self.restore(self.resume_from)
            else:
                self.start_records()
            if self.step >= self.total:
                return self.already_finished()
            self.log = ProgressView(self.total, self.step, self.info.is_main, console, bar=self.cfg.progress_bar)
            self.log.note(f"run dir: {self.run_dir}\ndata: {self.data.description}; "
                          f"validation unigram entropy {self.entropy:.4f} nats/token")
            if self.resume_from is not None:
                self.log.note(f"resumed from {self.resume_from} at step {self.step}")
            self.started = time.perf_counter()
            try:
                interrupted = self.loop()
            finally:
                self.log.stop()
            return self.finish(interrupted)
        finally:
            self.metrics.close()
            self.rundir.release()

    def already_finished(self) -> RunResult:
        """A finished run trained again: say so, write nothing."""
        ProgressView(self.total, self.step, self.info.is_main, console).note(
            f"{self.run_dir} already finished: step {self.step} of {self.total}; nothing to do (raise train.steps, "
            "train.tokens or train.flop_budget and pass --resume to train further)")
        return RunResult(self.run_dir, self.step, self.last_loss, self.val_loss, self.entropy)

    def loop(self) -> str | None:
        cfg = self.cfg
        self.acc.reset()
        with StopSignal() as stop:
            while self.step < self.total:
                self.train_step()
                self.log.advance()
                done = self.step >= self.total
                if self.step % cfg.log_every == 0 or done:
                    self.flush_train()
                if self.step % cfg.eval_every == 0 or done:
                    self.evaluate()
                if self.step % cfg.checkpoint_every == 0 or done:
                    self.save()
                if self.stop_requested(stop):
                    self.save()
                    return stop.name or "signal"
                self.acc.started = time.perf_counter() if not self.acc.losses else self.acc.started
        return None

    def stop_requested(self, stop: StopSignal) -> bool:
        """Whether a signal asked to stop; with several processes they agree every log step (one sync)."""
        if self.info.strategy == "none":
            return stop.name is not None
        if self.step % self.cfg.log_every:
            return False
        flag = torch.tensor([1.0 if stop.name else 0.0], device=self.info.device)
        return bool(D.all_reduce_(flag, self.info, op="max").item())

    def finish(self, interrupted: str | None) -> RunResult:
        self.metrics.write({"event": "end", "step": self.step, "interrupted": interrupted, "val_loss": self.val_loss,
                            "val_unigram_entropy": self.entropy, "train_seconds": self.elapsed})
        took = format_duration(time.perf_counter() - self.started)
        if interrupted:
            saved = shlex.quote(str(self.run_dir / "recipe.yaml"))  # the exact recipe of this run, overrides included
            self.log.note(f"stopped by {interrupted} at step {self.step} after {took}; checkpoint saved. "
                          f"Continue with: adaptive train {saved} --resume "
                          f"train.out_dir={shlex.quote(str(self.run_dir))}")
        else:
            val = "n/a" if self.val_loss is None else f"{self.val_loss:.4f}"
            self.log.note(f"done: step {self.step} in {took}, val loss {val} (unigram entropy {self.entropy:.4f}); "
                          f"run dir: {self.run_dir}")
        return RunResult(self.run_dir, self.step, self.last_loss, self.val_loss, self.entropy, interrupted is not None,
                         stopped_by=interrupted)

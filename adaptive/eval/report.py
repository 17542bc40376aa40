"""``adaptive eval``: load a run, then validation loss, zero-shot tasks and routing, in inference mode.

One run gives one JSON object (``run``, ``checkpoint``, ``recipe``, ``params``, ``data``, ``val_loss``,
``val_ppl``, ``val_tokens``, ``tasks``, ``routing``); several runs give one object each, and the CLI prints
them side by side.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from adaptive.errors import DataError
from adaptive.registry import Registry
from adaptive.serving.generate import resolve_device
from adaptive.serving.loading import LoadedRun, load_run

from adaptive.eval.heldout import heldout_loss, heldout_rows
from adaptive.eval.tasks import CHOICES, TASKS, build_task, held_out_articles, score_task


@dataclass
class EvalOptions:
    data_file: str | None = None  # evaluate the loss on this file instead of the held-out split
    max_rows: int | None = None  # first rows of the split (None: all)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    task_items: int | None = None  # items per task (None: all)
    seed: int = 0  # task construction
    batch_size: int | None = None  # rows per loss batch (None: the recipe's train.batch_size)
    batch_tokens: int = 8192  # tokens per task-scoring batch
    device: str = "auto"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)} (valid: {', '.join(TASKS)})")
        for name in ("max_rows", "task_items", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {self.batch_tokens}")


@contextlib.contextmanager
def progress_bar(enabled: bool | None = None) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """``stage(label, total)`` returns an ``advance(n)`` callback; a bar is drawn on stderr only when it is
    a terminal (``enabled=None``) or when asked to."""
    console = Console(stderr=True)
    show = console.is_terminal if enabled is None else enabled
    if not show:
        yield lambda label, total: (lambda n: None)
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)

    def stage(label: str, total: int) -> Callable[[int], None]:
        task = bar.add_task(label, total=total)
        return lambda n: bar.advance(task, n)

    with bar:
        yield stage


def evaluate_run(path: str | Path, registry: Registry, options: EvalOptions,
                 stage: Callable[[str, int], Callable[[int], None]] | None = None,
                 loaded: LoadedRun | None = None) -> dict:
    """Everything ``adaptive eval`` reports for one run (or checkpoint)."""
    stage = stage or (lambda label, total: (lambda n: None))
    loaded = loaded or load_run(path, registry, device=str(resolve_device(options.device)))
    model, tok, recipe = loaded.model.eval(), loaded.tokenizer, loaded.recipe
    held = heldout_rows(recipe, tok, registry, data_file=options.data_file, max_rows=options.max_rows)
    batch_size = options.batch_size or recipe.train.batch_size
    loss = heldout_loss(model, held, batch_size=batch_size, advance=stage(f"{recipe.name} loss", len(held.index_N)))
    result = {"run": str(path), "checkpoint": str(loaded.checkpoint), "recipe": recipe.name,
              "params": model.num_params(), "data": held.description, "val_loss": loss.loss,
              "val_ppl": loss.perplexity, "val_tokens": loss.tokens, "tasks": {}, "routing": loss.routing}
    if options.tasks:
        result["tasks"] = run_tasks(loaded, registry, options, stage)
    return result


def run_tasks(loaded: LoadedRun, registry: Registry, options: EvalOptions,
              stage: Callable[[str, int], Callable[[int], None]]) -> dict:
    try:
        articles = held_out_articles(loaded.recipe, registry)
    except DataError as exc:
        warnings.warn(f"zero-shot tasks skipped: {exc}")
        return {}
    out = {}
    for name in options.tasks:
        items = build_task(name, articles, seed=options.seed, limit=options.task_items)
        advance = stage(f"{loaded.recipe.name} {name}", len(items) * CHOICES)
        out[name] = score_task(loaded.model, loaded.tokenizer, items, max_len=loaded.recipe.data.seq_len,
                               batch_tokens=options.batch_tokens, advance=advance)
    return out


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Column headers and one row of strings per run, for the CLI's comparison table."""
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in results)]
    headers = ["run", "params", "val loss", "val ppl", *[f"{t} acc / norm" for t in tasks], "mean depth",
               "layers/token", "sampling acc"]
    rows = []
    for r in results:
        routing = r["routing"]
        cells = [r["recipe"], f"{r['params'] / 1e6:.2f}M", f"{r['val_loss']:.4f}", f"{r['val_ppl']:.1f}"]
        for t in tasks:
            score = r["tasks"].get(t)
            cells.append(f"{score['acc']:.3f} / {score['acc_norm']:.3f}" if score else "")
        cells.append("" if routing["mean_depth"] is None else f"{routing['mean_depth']:.3f}")
        cells.append(f"{routing['mean_layers']:.2f}")
        acc = routing["sampling_acc_routed"]
        cells.append("" if acc is None else f"{100 * acc:.1f}%")
        rows.append(cells)
    return headers, rows


def describe_routing(routing: dict) -> str:
    if routing["mean_depth"] is None:
        return "routing: none (no recursion steps)"
    hist = " ".join(f"{i}:{100 * f:.1f}%" for i, f in enumerate(routing["depth_hist"]))
    frac = " ".join(f"{100 * f:.1f}%" for f in routing["selected_frac"])
    line = f"routing: mean depth {routing['mean_depth']:.3f} [{hist}]; selected per step {frac}"
    if routing["sampling_acc"] is not None:
        acc = " ".join("-" if a is None else f"{100 * a:.1f}%" for a in routing["sampling_acc"])
        line += f"; sampling accuracy per step {acc}"
    return line

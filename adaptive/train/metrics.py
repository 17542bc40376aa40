"""Training metrics: on-device accumulation between log steps, metrics.jsonl, TensorBoard, progress bar.

Values are accumulated as tensors on the training device and read back once per flush (one host sync
per log interval, not per step). ``metrics.jsonl`` gets one JSON object per line: ``{"step": ..,
"loss": .., "lr": .., ...}`` for training intervals, ``{"step": .., "val_loss": ..}`` for evaluations,
and ``{"event": ..}`` records (start, data, resume, end); every record has ``time`` (Unix seconds). With several processes the losses, grad norm
and validation loss are global; auxiliary losses and routing statistics are the main process's.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from adaptive.errors import CheckpointError
from adaptive.interfaces import RoutingStats

Tensor = torch.Tensor


class StepAccumulator:
    """Sums per-step values on device; ``flush`` turns them into floats with one sync. With ``num_steps``
    (the recursion steps N_r), the depth histogram always has N_r + 1 entries (depths 0..N_r)."""

    def __init__(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps
        self.reset()

    def reset(self) -> None:
        self.losses: list[Tensor] = []  # one cross-entropy per optimizer step (mean over micro-batches)
        self.grad_norms: list[Tensor] = []  # the global gradient norm of each optimizer step
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.depth_hist: Tensor | None = None
        self.tokens = 0
        self.started = time.perf_counter()

    def add_step(self, ce: Tensor, grad_norm: Tensor) -> None:
        self.losses.append(ce.detach().float())
        self.grad_norms.append(grad_norm.detach().float())

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def add_stats(self, stats: RoutingStats) -> None:
        if stats.depth_BT is not None:
            depth = stats.depth_BT.detach().reshape(-1)
            steps = max(len(stats.selected_per_step), self.num_steps or 0)
            hist = torch.bincount(depth.clamp(max=steps), minlength=steps + 1).float()
            if self.depth_hist is not None and len(self.depth_hist) != len(hist):  # pad the shorter, never drop
                size = max(len(hist), len(self.depth_hist))
                hist, self.depth_hist = (torch.nn.functional.pad(h, (0, size - len(h))) for h in (hist, self.depth_hist))
            self.depth_hist = hist if self.depth_hist is None else self.depth_hist + hist
        for name, value in stats.metrics.items():
            self.add(name, value)


def routing_summary(hist: list[float]) -> dict[str, Any]:
    total = sum(hist) or 1.0
    frac = [h / total for h in hist]
    return {"mean_depth": sum(i * f for i, f in enumerate(frac)), "depth_hist": [round(f, 4) for f in frac]}


def is_finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def read_records(path: Path, error: type[Exception], hint: str) -> list[tuple[str, Any]]:
    """(line, record) for each line of a ``metrics.jsonl``. A torn last line (a write cut short by a kill) is
    skipped with a warning; a damaged line elsewhere raises ``error`` naming it (``hint``: what to do)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise error(f"{path}:{number}: not a JSON record; the metrics file is damaged ({hint})") from None
            warnings.warn(f"{path}: skipped a torn last line (a write cut short)")
    return records


class MetricsWriter:
    """metrics.jsonl (and TensorBoard events when available) on the main process; nothing elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # the optional `tensorboard` package is not installed
                _warn_no_tensorboard()

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a run resumes from), and a torn last line
        (a write cut short by a kill); a damaged line elsewhere is an error."""
        if not self.enabled or not self.path.is_file():
            return
        records = read_records(self.path, CheckpointError, "remove that line to resume")
        keep = [line for line, record in records if not isinstance(record, dict) or record.get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


_TENSORBOARD_WARNED = []


def _warn_no_tensorboard() -> None:
    """Once per process: train.tensorboard is on (the default) but the package is missing."""
    if not _TENSORBOARD_WARNED:
        _TENSORBOARD_WARNED.append(True)
        warnings.warn("train.tensorboard is true but the tensorboard package is not installed, so no TensorBoard "
                      "events are written (pip install tensorboard, or set train.tensorboard=false)")


def format_duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 07 s``, ``2 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressView:
    """A rich progress bar on a terminal, a plain line per log step otherwise (``bar=False``: neither);
    notes (run dir, resume, end) are printed whenever ``enabled`` (the main process)."""

    def __init__(self, total: int, start: int, enabled: bool, console: Console, bar: bool = True):
        self.console = console
        self.enabled = enabled
        self.lines = enabled and bar
        self.bar = None
        self.start, self.started = start, time.perf_counter()
        if self.lines and console.is_terminal:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def update(self, record: dict[str, Any], total: int) -> None:
        info = describe(record)
        if self.bar is not None and "val_loss" in record:
            self.console.print(f"step {record['step']}/{total}  {info}", highlight=False, soft_wrap=True)  # stays
        elif self.bar is not None:
            self.bar.update(self.task, info=info)
        elif self.lines:
            self.console.print(f"step {record['step']}/{total}  {info}  {self.timing(record['step'], total)}",
                               highlight=False, soft_wrap=True)

    def timing(self, step: int, total: int) -> str:
        """``elapsed 12.0 s, eta 1 min 30 s`` from the rate of the steps run in this invocation."""
        elapsed = time.perf_counter() - self.started
        done = step - self.start
        eta = format_duration(elapsed / done * (total - step)) if done > 0 else "?"
        return f"elapsed {format_duration(elapsed)}, eta {eta}"

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def describe(record: dict[str, Any]) -> str:
    parts = []
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    if "tok_per_s" in record:
        parts.append(f"{record['tok_per_s']:,.0f} tok/s")
    for prefix in ("", "val_"):
        if f"{prefix}mean_depth" in record:
            hist = " ".join(f"{i}:{100 * f:.0f}%" for i, f in enumerate(record[f"{prefix}depth_hist"]))
            parts.append(f"depth {record[f'{prefix}mean_depth']:.2f} [{hist}]")
    return "  ".join(parts)

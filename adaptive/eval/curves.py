"""Training curves from a run's ``metrics.jsonl``: loss, validation loss, and the depth histogram.

- ``loss.png``: the training loss of every log interval, the validation loss of every evaluation, and the
  validation split's unigram entropy (the loss of the best context-free predictor) as a reference line.
- ``depth.png`` (routed models): the share of tokens that ran 0, 1, ..., N_r recursion steps over training,
  as stacked areas, under the training rule (left) and, at every evaluation, under the causal inference
  rule (right).
- ``routing.png`` (routers that report them): per-step sampling accuracy and selected fraction.
"""

from __future__ import annotations

import re
from pathlib import Path

from adaptive.errors import AdaptiveError, DataError

from adaptive.eval.depthmap import palette
from adaptive.train.metrics import read_records


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (give a run directory written by adaptive train)")
    return [record for _, record in read_records(path, DataError, "remove that line")]


def training_curves(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the plots into ``out_dir``; returns the files written."""
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r and "event" not in r]
    val = [r for r in records if "val_loss" in r and "event" not in r]
    if not train and not val:
        raise DataError(f"{run_dir}: metrics.jsonl holds no loss records yet")
    Figure = _figure()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(run_dir).resolve().name
    entropy = next((r["val_unigram_entropy"] for r in records if "val_unigram_entropy" in r), None)
    written = [plot_loss(Figure, train, val, entropy, name, out / "loss.png")]
    if any("depth_hist" in r for r in train) or any("val_depth_hist" in r for r in val):
        written.append(plot_depth(Figure, train, val, name, out / "depth.png"))
    if any(k.startswith("sampling_acc/") for r in train for k in r):
        written.append(plot_routing(Figure, train, name, out / "routing.png"))
    return written


def plot_loss(Figure, train: list[dict], val: list[dict], entropy: float | None, name: str, path: Path) -> Path:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", color="#3b6ea5")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", color="#d1495b")
    if entropy is not None:
        ax.axhline(entropy, ls="--", color="#888888", lw=1, label=f"unigram entropy ({entropy:.2f})")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=f"{name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def plot_depth(Figure, train: list[dict], val: list[dict], name: str, path: Path) -> Path:
    fig = Figure(figsize=(10, 4), layout="constrained")
    panels = [("training (top-k rule)", train, "depth_hist"), ("validation (causal rule)", val, "val_depth_hist")]
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (title, recs, key) in zip(axes, panels):
        recs = [r for r in recs if key in r]
        ax.set(title=title, xlabel="optimizer step")
        if not recs:
            continue
        steps = [r["step"] for r in recs]
        columns = list(zip(*[r[key] for r in recs]))
        colours = palette(len(columns) - 1)
        labels = [f"{d} step{'' if d == 1 else 's'}" for d in range(len(columns))]
        ax.stackplot(steps, columns, colors=colours, labels=labels, edgecolor="white", lw=0.3)
        ax.set_xlim(min(steps), max(steps))
    axes[0].set_ylabel("share of tokens")
    axes[0].set_ylim(0, 1)
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[0]))
    fig.legend(handles[::-1], labels[::-1], loc="outside right center", title="depth")
    fig.suptitle(f"{name}: recursion depth over training")
    fig.savefig(path, dpi=120)
    return path


def plot_routing(Figure, train: list[dict], name: str, path: Path) -> Path:
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(axes, ("sampling_acc", "selected_frac"), ("sampling accuracy", "selected fraction")):
        keys = sorted({k for r in train for k in r if re.fullmatch(rf"{metric}/step\d+", k)},
                      key=lambda k: int(k.rsplit("step", 1)[1]))
        for key in keys:
            recs = [r for r in train if key in r]
            step = int(key.rsplit("step", 1)[1]) + 1  # metrics count steps from 0, the plots from 1
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], label=f"step {step}")
        ax.set(title=label, xlabel="optimizer step", ylim=(0, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"{name}: routing during training (top-k rule)")
    fig.savefig(path, dpi=120)
    return path


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AdaptiveError("training curves need matplotlib: pip install 'adaptive-lm[viz]'") from None
    return Figure

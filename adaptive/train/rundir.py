"""Choosing the run directory, and deciding whether a run starts fresh or resumes.

``train.out_dir`` names the run directory; without it a fresh run goes to
``runs/<recipe name>-<timestamp>`` and ``--resume`` picks the newest such directory that has a
checkpoint. A run directory that already holds checkpoints is resumed with ``--resume``, or without it
when its saved recipe is identical to this one; otherwise it is refused rather than overwritten.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import yaml

from adaptive.errors import CheckpointError
from adaptive.recipe import Recipe
from adaptive.train import checkpoint as ckpt
from adaptive.train import distributed as D
from adaptive.train.tokenizer import atomic_write_bytes

RUNS_ROOT = Path("runs")
MUST_MATCH = ("name", "seed", "model", "data", "tokenizer")


def flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def differences(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def newest_run(name: str) -> Path:
    runs = sorted((p for p in RUNS_ROOT.glob(f"{name}-*") if ckpt.latest_checkpoint(p) is not None),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise CheckpointError(f"--resume: no run of recipe {name!r} with a checkpoint under {RUNS_ROOT}/; "
                              "set train.out_dir to the run directory to continue")
    return runs[-1]


def choose(recipe: Recipe, resume: bool) -> Path:
    if recipe.train.out_dir:
        return Path(recipe.train.out_dir).expanduser()
    if resume:
        return newest_run(recipe.name)
    return RUNS_ROOT / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_compatible(run_dir: Path, recipe: Recipe, resume: bool) -> None:
    """Refuse to resume a run with a different model/data; warn about changed train settings."""
    saved_path = run_dir / "recipe.yaml"
    if not saved_path.is_file():
        raise CheckpointError(f"{run_dir}: has checkpoints but no recipe.yaml; it is not a run directory of this tool")
    saved = yaml.safe_load(saved_path.read_text())
    current = recipe.model_dump(mode="json")
    changed = [k for k in differences(saved, current) if k != "train.out_dir"]  # the same dir, spelled differently
    fixed = [k for k in changed if k.split(".")[0] in MUST_MATCH]
    if not resume and changed:
        raise CheckpointError(f"train.out_dir: {run_dir} already holds a run of a different recipe (differs at: "
                              f"{', '.join(changed)}); pass --resume to continue it with the new values, "
                              "or choose another train.out_dir")
    if fixed:
        raise CheckpointError(f"--resume: {run_dir} was trained with a different {', '.join(fixed)}; "
                              "only train.* settings may change when resuming")
    if changed:
        warnings.warn(f"resuming {run_dir} with changed settings: {', '.join(changed)}")


def prepare_run_dir(recipe: Recipe, info: D.DistInfo, resume: bool) -> tuple[Path, Path | None]:
    """The run directory (created, recipe saved) and the checkpoint to resume from, if any."""
    decision: list = [None, None]
    if info.is_main:
        run_dir = choose(recipe, resume)
        ckpt.remove_partial(run_dir)
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None and resume:
            raise CheckpointError(f"--resume: {run_dir} has no complete checkpoint to continue from")
        if latest is not None:
            check_compatible(run_dir, recipe, resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        if latest is None and (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()  # a previous attempt that never reached a checkpoint
        atomic_write_bytes(run_dir / "recipe.yaml", recipe.to_yaml().encode())
        decision = [str(run_dir), str(latest) if latest else None]
    if info.strategy != "none":
        import torch.distributed as dist

        dist.broadcast_object_list(decision, src=0)
    run_dir, latest = decision
    return Path(run_dir), Path(latest) if latest else None

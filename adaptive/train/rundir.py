"""Choosing the run directory, and deciding whether a run starts fresh or resumes.

``train.out_dir`` names the run directory; without it a fresh run goes to
``runs/<recipe name>-<timestamp>`` and ``--resume`` picks the newest such directory that has a
checkpoint. A run directory that already holds checkpoints is resumed with ``--resume``, or without it
when its saved recipe is identical to this one; otherwise it is refused rather than overwritten.

One trainer at a time: the main process holds an exclusive lock (``flock``) on ``<run>/.lock``, which
holds its pid, for the whole run; a second trainer on the same directory is refused with that pid. A run
directory this process created is removed again when the run is refused before it starts.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import warnings
from dataclasses import dataclass
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
    if fixed:  # --resume would refuse too, so it is not offered
        raise CheckpointError(f"train.out_dir: {run_dir} was trained with a different "
                              f"{', '.join(sorted({k.split('.')[0] for k in fixed}))} (differs at: {', '.join(fixed)}); "
                              "only train.* settings may change when resuming, so choose another train.out_dir")
    if not resume and changed:
        raise CheckpointError(f"train.out_dir: {run_dir} already holds a run of a different recipe (differs at: "
                              f"{', '.join(changed)}); pass --resume to continue it with the new values, "
                              "or choose another train.out_dir")
    if changed:
        warnings.warn(f"resuming {run_dir} with changed settings: {', '.join(changed)}")


LOCK_FILE = ".lock"


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock`` (released by the kernel if the process dies)."""

    def __init__(self, run_dir: Path):
        path = run_dir / LOCK_FILE
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 32)
            self.release()
            raise _in_use(run_dir, holder) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def check_free(run_dir: Path) -> None:
        """Raise the "in use" error if another trainer holds ``run_dir``; creates and writes nothing."""
        if not (run_dir / LOCK_FILE).is_file():
            return
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise _in_use(run_dir, os.read(fd, 32)) from None
        finally:
            os.close(fd)


def _in_use(run_dir: Path, holder: bytes) -> CheckpointError:
    pid = holder.decode(errors="replace").strip() or "unknown"
    return CheckpointError(f"train.out_dir: {run_dir} is in use by another trainer (pid {pid}); wait for it to "
                           "finish or stop it, or choose another train.out_dir")


@dataclass
class RunDir:
    path: Path
    resume_from: Path | None
    lock: RunLock | None = None  # held by the main process only
    created: bool = False  # this process made the directory (removed again if the run is refused)

    def release(self, refused: bool = False) -> None:
        """Give up the lock; a refused run removes the directory it created (nothing of value is in it)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if refused and self.created:
            shutil.rmtree(self.path, ignore_errors=True)


def prepare_run_dir(recipe: Recipe, info: D.DistInfo, resume: bool) -> RunDir:
    """The run directory (created, locked, recipe saved) and the checkpoint to resume from, if any."""
    decision: list = [None, None]
    run = None
    if info.is_main:
        run_dir = choose(recipe, resume)
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        run = RunDir(run_dir, None, created=created)
        try:
            run.lock = RunLock(run_dir)
            run.resume_from = _resume_point(run_dir, recipe, resume)
            atomic_write_bytes(run_dir / "recipe.yaml", recipe.to_yaml().encode())
        except BaseException:
            run.release(refused=True)
            raise
        decision = [str(run_dir), str(run.resume_from) if run.resume_from else None]
    if info.strategy != "none":
        import torch.distributed as dist

        dist.broadcast_object_list(decision, src=0)
    if run is None:
        run = RunDir(Path(decision[0]), Path(decision[1]) if decision[1] else None)
    return run


def _resume_point(run_dir: Path, recipe: Recipe, resume: bool) -> Path | None:
    """The checkpoint to continue from (None: a fresh start); refuses an incompatible run."""
    ckpt.remove_partial(run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None and resume:
        raise CheckpointError(f"--resume: {run_dir} has no complete checkpoint to continue from")
    if latest is not None:
        check_compatible(run_dir, recipe, resume)
    elif (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # a previous attempt that never reached a checkpoint
    return latest

"""Checkpoints: atomic directories of safetensors weights plus a tensors-only training state.

Layout of a run directory::

    <run>/recipe.yaml            the resolved recipe
    <run>/metrics.jsonl          one JSON record per log step / evaluation
    <run>/checkpoints/step-00000100/
        model.safetensors        weights and persistent buffers (router and MoE biases stay float32)
        train_state.pt           optimizer, RNG, data position, step counters (loaded weights_only=True)
        meta.json                step, tokens, loss, time; written last

A checkpoint is written into a hidden temporary directory and renamed into place, so a directory named
``step-*`` is always complete; interrupted writes leave only ``.tmp-*`` directories, removed on the next
start. Loading never executes code: safetensors for weights and ``torch.load(weights_only=True)`` for the
rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adaptive.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d{8})$")
FILES = ("model.safetensors", "train_state.pt", "meta.json")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial(run_dir: Path) -> None:
    """Delete temporary directories left by a write that was interrupted."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): keep one name, alias the rest."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name in sorted(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.detach().to("cpu").contiguous()
    return kept, aliases


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
                    meta: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the ``keep`` newest."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if final.exists():
        return final  # this exact step is already saved (e.g. interrupted right after a resume)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, aliases = _dedupe(model_state)
    _write_file(tmp / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"aliases": json.dumps(aliases)}))
    _write_file(tmp / "train_state.pt", lambda p: torch.save(train_state, p))
    _write_file(tmp / "meta.json", lambda p: p.write_text(json.dumps({"step": step, **meta}, indent=2)))
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint directory (or a .safetensors file), aliases restored."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file}: no such weights file")
    try:
        tensors = load_file(str(file))
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Weights, training state and meta of one checkpoint directory; never executes code."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint (missing {', '.join(missing)})")
    weights = load_weights(path)
    try:
        train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        meta = json.loads((path / "meta.json").read_text())
    except Exception as exc:  # any unpickling refusal or corruption is a checkpoint problem
        raise CheckpointError(f"{path}: cannot read the training state ({type(exc).__name__}: {exc})") from None
    return weights, train_state, meta


TRAIN_STATE_KEYS = {"optimizer": dict, "rng": dict, "step": int, "position": int, "tokens": int}


def check_train_state(path: Path, state: Any) -> None:
    """A training state holds the optimizer, the RNG and the step counters this trainer wrote."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the training state is a {type(state).__name__}, not this trainer's mapping")
    missing = [k for k in TRAIN_STATE_KEYS if k not in state]
    wrong = [k for k, kind in TRAIN_STATE_KEYS.items() if k in state and not isinstance(state[k], kind)]
    if missing or wrong or not isinstance(state.get("rng", {}).get("torch"), torch.Tensor):
        what = "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                       wrong and f"wrong type of {', '.join(wrong)}"])) or "no torch RNG state"
        raise CheckpointError(f"{path}: not a training state of this trainer ({what})")


def check_optimizer_shapes(optimizer: torch.optim.Optimizer) -> None:
    """Every loaded per-parameter optimizer tensor has its parameter's shape (load_state_dict does not check)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != p.shape:
                    raise ValueError(f"optimizer {name} of shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(p.shape)}")


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one host sync)."""
    names = [n for n, t in state.items() if t.is_floating_point() and t.numel()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state[n]).all() for n in names]).tolist()
    return [n for n, ok in zip(names, finite) if not ok]


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, cut to a readable length."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def check_fit(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, tied: bool = False) -> None:
    """A CheckpointError naming each missing, unexpected or differently-shaped tensor, before any is loaded."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} is {tuple(state[k].shape)}, the model expects {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = shapes + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{source}: weights do not fit the recipe's model: {'; '.join(problems[:5])}{more}")


def initial_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights ``train.init_from`` names: a model directory or checkpoint (``model.safetensors``), or a
    run directory's latest checkpoint."""
    path = Path(path).expanduser()
    if (path / "model.safetensors").is_file() or path.suffix == ".safetensors":
        return load_weights(path)
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"train.init_from: {path} holds no model.safetensors and no complete checkpoint "
                              "(give a converted model, a checkpoint or a run directory)")
    return load_weights(latest)

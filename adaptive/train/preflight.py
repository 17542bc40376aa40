"""What ``train`` would refuse, checked before anything is written: ``adaptive validate`` runs the same checks.

Each check names the recipe key and what would be valid; all problems are raised together as one
RecipeError. A trial step (forward and backward of a batch of one short row, on the training device,
with the recipe's components) catches a component that cannot run there, e.g. ``attention: flex`` on a
CPU. The trial model keeps the recipe's shape when it is small and shrinks its widths otherwise, so
validation never allocates a large model.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from adaptive.errors import RecipeError
from adaptive.interfaces import Component
from adaptive.model.config import MODEL_COMPONENTS
from adaptive.recipe import Recipe
from adaptive.registry import Registry
from adaptive.train import sizing

TRIAL_FULL_SHAPE_PARAMS = 20_000_000  # larger models are tried at a shrunk width
TRIAL_TOKENS = 8


def preflight(recipe: Recipe, registry: Registry, device: torch.device | None = None, world: int | None = None,
              warn: bool = True, source: str | None = None, main_process: bool = True) -> None:
    """Raise one RecipeError listing everything ``train`` would refuse about this recipe on this machine.
    ``warn``: let the warnings of building the model (an ignored setting) through; ``source``: the recipe
    file named in the error; ``main_process``: also check the run directory (only the main process owns it)."""
    problems: list[str] = []
    if device is None:
        device, problem = _device(recipe)
        problems += [problem] if problem else []
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    problems += (_batch_problems(recipe, world) + _tokenizer_problems(recipe) + _out_dir_problems(recipe)
                 + _vocab_problems(recipe) + _init_problems(recipe))
    if device is not None:
        problems += _memory_problems(recipe, registry, device, world)
    if not problems and device is not None:
        problems += _trial_step(recipe, registry, device, warn)
    if problems:
        raise RecipeError(problems, source=source)
    if main_process:
        check_run_dir(recipe)


def _device(recipe: Recipe) -> tuple[torch.device | None, str | None]:
    from adaptive.train.distributed import pick_device

    try:
        return pick_device(recipe.train, int(os.environ.get("LOCAL_RANK", "0"))), None
    except RecipeError as exc:
        return None, exc.problems[0]


def _batch_problems(recipe: Recipe, world: int) -> list[str]:
    t = recipe.train
    if t.batch_size % (t.grad_accum * world):
        return [f"train.batch_size: {t.batch_size} sequences must divide evenly over "
                f"grad_accum={t.grad_accum} x {world} process(es)"]
    return []


def _out_dir_problems(recipe: Recipe) -> list[str]:
    """``train.out_dir`` (or ``runs/``) must be a directory or creatable as one: no file on the way."""
    target = Path(recipe.train.out_dir).expanduser() if recipe.train.out_dir else Path("runs")
    for part in (target, *target.parents):  # the nearest part that exists decides
        if not part.exists():
            continue
        if not part.is_dir():
            where = "is a file" if part == target else f"is under {part}, which is a file"
            return [f"train.out_dir: {target} {where}; a run directory is a directory (choose another train.out_dir)"]
        if not os.access(part, os.W_OK | os.X_OK):
            return [f"train.out_dir: {part} is not writable (choose another train.out_dir)"]
        return []
    return []


def check_run_dir(recipe: Recipe) -> None:
    """An existing ``train.out_dir`` must not be in use by another trainer, nor hold a run that even
    ``--resume`` would refuse (another model, data or tokenizer): a CheckpointError otherwise."""
    from adaptive.train import checkpoint as ckpt
    from adaptive.train.rundir import RunLock, check_compatible
    from adaptive.vocab import with_resolved_vocab

    run_dir = Path(recipe.train.out_dir).expanduser() if recipe.train.out_dir else None
    if run_dir is None or not run_dir.is_dir():
        return
    RunLock.check_free(run_dir)
    if ckpt.latest_checkpoint(run_dir) is None:
        return
    try:
        resolved = with_resolved_vocab(recipe)  # the recipe as the trainer saves it
    except ValueError:  # a vocabulary the tokenizer cannot serve: the trainer reports it
        return
    with warnings.catch_warnings():  # changed train.* settings: train itself says so
        warnings.simplefilter("ignore")
        check_compatible(run_dir, resolved, resume=True)


def _tokenizer_problems(recipe: Recipe) -> list[str]:
    tok = recipe.tokenizer
    if tok.kind != "file" or not tok.path:
        return []
    path = Path(tok.path).expanduser()
    if not path.is_file():
        return [f"tokenizer.path: {path} does not exist (a tokenizers JSON file is expected)"]
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        return [f"tokenizer.path: {path} is not a tokenizers JSON file ({' '.join(str(exc).split())})"]
    return []


def _vocab(recipe: Recipe) -> int:
    from adaptive.vocab import resolved_vocab_size

    try:
        return resolved_vocab_size(recipe)
    except ValueError:  # reported by _vocab_problems
        return recipe.model.vocab_size or recipe.tokenizer.vocab_size


def _vocab_problems(recipe: Recipe) -> list[str]:
    from adaptive.vocab import resolved_vocab_size

    try:
        resolved_vocab_size(recipe)
    except ValueError as exc:
        return [str(exc)]
    return []


def _init_problems(recipe: Recipe) -> list[str]:
    """``train.init_from`` must name weights (their fit to the model is checked when the model is built)."""
    from adaptive.errors import CheckpointError
    from adaptive.train.checkpoint import initial_weights

    if recipe.train.init_from is None:
        return []
    try:
        initial_weights(recipe.train.init_from)
    except CheckpointError as exc:
        return [str(exc)]
    return []


def _num_params(recipe: Recipe, registry: Registry) -> int:
    """The model's parameters, counted on a model built on the meta device (no memory), else arithmetically."""
    from adaptive.model import build_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_model(recipe.model, registry, vocab_size=_vocab(recipe)).num_params()
    except Exception:  # a component that cannot be built on meta: the arithmetic lower bound
        model = recipe.model
        plan = registry.build("sharing_scheme", model.sharing).plan(model.num_layers, model.num_recursions)
        return sizing.param_count(model, plan.num_physical, _vocab(recipe))


def _device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return sizing.host_memory_bytes()


def _memory_problems(recipe: Recipe, registry: Registry, device: torch.device, world: int) -> list[str]:
    """Weights, gradients and AdamW moments plus one micro-batch's activations must fit on the device."""
    memory = _device_memory(device)
    if memory is None:
        return []
    t, model = recipe.train, recipe.model
    shards = world if t.distributed.strategy == "fsdp2" else 1
    params = _num_params(recipe, registry)
    state = sizing.TRAIN_BYTES_PER_PARAM * params // shards
    micro = max(t.batch_size // (t.grad_accum * world), 1)
    activations = sizing.activation_bytes(model, _vocab(recipe), micro, recipe.data.seq_len)
    if state + activations <= memory:
        return []
    where = f"{device} ({sizing.gib(memory)})"
    if activations >= state:
        return [f"train.batch_size: a micro-batch of {micro:,} x {recipe.data.seq_len} tokens needs at least "
                f"{sizing.gib(activations)} of activations, more than fits on {where}; lower train.batch_size, "
                "raise train.grad_accum or lower data.seq_len"]
    return [f"model: training {params:,} parameters needs at least {sizing.gib(state)} (weights, gradients and "
            f"AdamW moments in float32), more than fits on {where}; choose a smaller model"]


def _trial_config(recipe: Recipe, registry: Registry, params: int):
    """The recipe's model section, at its own shape when small, else with its widths shrunk."""
    model = recipe.model
    if params <= TRIAL_FULL_SHAPE_PARAMS:
        return model, _vocab(recipe)
    head_dim = 8
    d_model = model.num_heads * head_dim
    return model.model_copy(update={"d_model": d_model, "d_ffn": 2 * d_model}), 64


def _trial_step(recipe: Recipe, registry: Registry, device: torch.device, warn: bool) -> list[str]:
    from adaptive.model import build_model

    config, vocab = _trial_config(recipe, registry, _num_params(recipe, registry))
    tokens = min(TRIAL_TOKENS, recipe.data.seq_len, config.max_seq_len)
    quiet = contextlib.nullcontext() if warn else warnings.catch_warnings()
    with quiet, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if not warn:
            warnings.simplefilter("ignore")
        try:
            model = build_model(config, registry, vocab_size=vocab).to(device)
            tokens_BT = torch.randint(vocab, (1, tokens), device=device)
            out = model(tokens_BT, progress=0.0)
            (out.logits_BTV.float().mean() + out.aux_loss).backward()
        except (ValueError, RuntimeError, NotImplementedError, TypeError) as exc:
            return [f"{_failing_key(exc.__traceback__, registry)}: a trial training step on {device} failed: "
                    f"{' '.join(str(exc).split())}"]
    return []


def _failing_key(tb, registry: Registry) -> str:
    """The recipe key of the innermost component whose code raised (``model`` when none did)."""
    kinds = {kind: key for key, kind in MODEL_COMPONENTS.items()}
    found = "model"
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, Component):
            for entry in registry.entries():
                if entry.cls is type(owner) and entry.kind in kinds:
                    found = f"model.{kinds[entry.kind]}"
        tb = tb.tb_next
    return found

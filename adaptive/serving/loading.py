"""Load a trained run (or one of its checkpoints) for evaluation and generation.

A run directory holds ``recipe.yaml``, ``tokenizer.json`` and ``checkpoints/step-*/model.safetensors``;
a checkpoint directory is one ``step-*`` folder inside it; ``adaptive convert`` writes a folder with all
three files side by side. Loading reads safetensors and YAML only: no
code from the run directory is executed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adaptive import recipe as recipes
from adaptive.errors import CheckpointError, DataError
from adaptive.model.transformer import AdaptiveLM, build_model
from adaptive.registry import Registry
from adaptive.train.checkpoint import check_fit, latest_checkpoint, load_weights
from adaptive.train.tokenizer import TOKENIZER_FILE, TextTokenizer


@dataclass
class LoadedRun:
    model: AdaptiveLM
    tokenizer: TextTokenizer
    recipe: recipes.Recipe
    checkpoint: Path


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for a run dir or a checkpoint dir."""
    path = Path(path)
    if (path / "model.safetensors").is_file():  # a converted model keeps its recipe beside the weights
        return (path, path) if (path / "recipe.yaml").is_file() else (path.parent.parent, path)
    if not (path / "recipe.yaml").is_file():
        raise CheckpointError(f"{path}: neither a run directory (with recipe.yaml) nor a checkpoint (with model.safetensors)")
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise CheckpointError(f"{path}: the run has no complete checkpoint yet (checkpoints/step-*)")
    return path, checkpoint


def load_run(path: str | Path, registry: Registry, device: str = "cpu") -> LoadedRun:
    """The model (in eval mode, on ``device``), tokenizer and recipe of a run, checkpoint or converted model.

    The model is built with the rows its saved embedding has (``adaptive.vocab``): the tokenizer may have
    fewer tokens (padding rows), never more."""
    run_dir, checkpoint = resolve(path)
    recipe = recipes.load(run_dir / "recipe.yaml", registry=registry)
    tokenizer = read_tokenizer(run_dir)
    state = load_weights(checkpoint)
    embed = state.get("embed.weight")
    if embed is None or embed.dim() != 2:
        raise CheckpointError(f"{checkpoint}: the weights have no 2-d embed.weight tensor")
    vocab = embed.shape[0]
    if tokenizer.vocab_size > vocab:
        raise CheckpointError(f"{run_dir / TOKENIZER_FILE}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"model's embed.weight has only {vocab} rows")
    model = build_model(recipe.model, registry, vocab_size=vocab)
    check_fit(model, state, str(checkpoint), tied=recipe.model.tie_embeddings)
    model.load_state_dict(state, strict=False)
    model.to(torch.device(device)).eval()
    return LoadedRun(model, tokenizer, recipe, checkpoint)


def read_tokenizer(run_dir: Path) -> TextTokenizer:
    """The run's ``tokenizer.json``, or a CheckpointError naming it (missing, unreadable, no separator)."""
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{run_dir}: {TOKENIZER_FILE} is missing; the run directory is incomplete")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises plain Exceptions for a malformed file
        raise CheckpointError(f"{tokenizer_path}: not a readable tokenizers JSON file "
                              f"({' '.join(str(exc).split())[:200]})") from None
    try:
        return TextTokenizer(tok, str(tokenizer_path))
    except DataError as exc:
        raise CheckpointError(str(exc)) from None

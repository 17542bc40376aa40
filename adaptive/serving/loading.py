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
from adaptive.errors import CheckpointError
from adaptive.model.transformer import AdaptiveLM, build_model
from adaptive.registry import Registry
from adaptive.train.checkpoint import latest_checkpoint, load_weights
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
    run_dir, checkpoint = resolve(path)
    recipe = recipes.load(run_dir / "recipe.yaml", registry=registry)
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{run_dir}: {TOKENIZER_FILE} is missing; the run directory is incomplete")
    from tokenizers import Tokenizer

    tokenizer = TextTokenizer(Tokenizer.from_file(str(tokenizer_path)), str(tokenizer_path))
    model = build_model(recipe.model, registry, vocab_size=tokenizer.vocab_size)
    state = load_weights(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" or not recipe.model.tie_embeddings]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the recipe's model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(torch.device(device)).eval()
    return LoadedRun(model, tokenizer, recipe, checkpoint)

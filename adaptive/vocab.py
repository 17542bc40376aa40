"""The model's vocabulary size: one rule for the recipe, the run directory, the accountant, the trainer
and loading.

* The tokenizer decides: its size is ``tokenizer.vocab_size`` for ``kind: bpe`` (the trained BPE has at
  most that many tokens; on a tiny corpus it can come out smaller, and the rows beyond are never used) and
  the file's own size for ``kind: file``.
* ``model.vocab_size`` overrides it only when the recipe sets it to a value other than its preset's (or
  sets it without a preset): then it must be at least the tokenizer's size, and the rows beyond are
  padding, as in many Hugging Face checkpoints. A preset's ``vocab_size`` alone never overrides the
  tokenizer (the ``micro`` preset says 512; with the default 2048-token BPE the model has 2048 rows).
* The trainer writes the resolved size into the run directory's ``recipe.yaml`` (``model.vocab_size``), so
  ``adaptive flops`` on either recipe, the trainer's FLOP count and ``load_run`` all see the same number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptive.model.config import PRESETS, ModelConfig

if TYPE_CHECKING:
    from adaptive.recipe import Recipe
    from adaptive.train.config import TokenizerConfig


def declared_vocab_size(model: ModelConfig) -> int | None:
    """``model.vocab_size`` when the recipe chose it (not merely inherited from its preset), else None."""
    if model.vocab_size is None:
        return None
    if model.preset is not None and model.vocab_size == PRESETS[model.preset]["vocab_size"]:
        return None
    return model.vocab_size


def tokenizer_size(tokenizer: "TokenizerConfig") -> int:
    """How many tokens the recipe's tokenizer can produce, without training it."""
    if tokenizer.kind != "file":
        return tokenizer.vocab_size
    if not tokenizer.path:
        raise ValueError("tokenizer.path: set it to a tokenizers JSON file when tokenizer.kind=file")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer.path)).get_vocab_size()
    except Exception as exc:  # tokenizers raises plain Exceptions for a missing or malformed file
        raise ValueError(f"tokenizer.path: cannot read {tokenizer.path} as a tokenizers JSON file "
                         f"({' '.join(str(exc).split())})") from None


def model_vocab_size(model: ModelConfig, num_tokens: int) -> int:
    """The embedding rows of a model whose tokenizer has ``num_tokens`` tokens (see the module docstring)."""
    declared = declared_vocab_size(model)
    if declared is None:
        return num_tokens
    if declared < num_tokens:
        raise ValueError(f"model.vocab_size: {declared} is smaller than the tokenizer's {num_tokens} tokens "
                         f"(set it to at least {num_tokens}, or remove it to use the tokenizer's size)")
    return declared


def resolved_vocab_size(recipe: "Recipe") -> int:
    return model_vocab_size(recipe.model, tokenizer_size(recipe.tokenizer))


def with_resolved_vocab(recipe: "Recipe") -> "Recipe":
    """A copy of ``recipe`` whose ``model.vocab_size`` is the size the model is built with."""
    vocab = resolved_vocab_size(recipe)
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"vocab_size": vocab})})

"""Vocabulary size, one truth: the recipe rule (adaptive.vocab), the run directory's recipe.yaml, `adaptive
flops`, the trainer and loading all use the same number."""

from __future__ import annotations

import json

import pytest
import yaml

from adaptive import recipe as recipes
from adaptive.cli import main
from adaptive.errors import RecipeError
from adaptive.model import ModelConfig
from adaptive.plugins import get_registry
from adaptive.train import checkpoint as ckpt
from adaptive.train.loop import train
from adaptive.vocab import model_vocab_size, resolved_vocab_size

RECIPE = """\
name: vocab-test
model: {preset: micro, num_layers: 2}
data: {source: {name: pydoc_topics}, seq_len: 16}
tokenizer: {vocab_size: 300}
train: {steps: 1, batch_size: 2, eval_batches: 1, progress_bar: false, tensorboard: false}
"""


def test_the_rule():
    micro = ModelConfig(preset="micro")  # the preset's 512 is not a choice of the recipe
    assert model_vocab_size(micro, 2048) == 2048 and model_vocab_size(micro, 300) == 300
    padded = ModelConfig(preset="micro", vocab_size=4096)
    assert model_vocab_size(padded, 2048) == 4096  # padding rows beyond the tokenizer's
    bare = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ffn=48, max_seq_len=32, vocab_size=64)
    assert model_vocab_size(bare, 60) == 64
    with pytest.raises(ValueError, match="model.vocab_size: 64 is smaller than the tokenizer's 100 tokens"):
        model_vocab_size(bare, 100)


def flops_json(path, capsys, *overrides) -> dict:
    capsys.readouterr()
    main(["flops", str(path), "--json", *overrides])
    return json.loads(capsys.readouterr().out)


def test_run_dir_flops_trainer_and_loading_agree(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    recipe = recipes.load(path, [f"train.out_dir={tmp_path / 'run'}"], get_registry())
    assert recipe.model.vocab_size == 512 and resolved_vocab_size(recipe) == 300
    train(recipe, get_registry())
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["model"]["vocab_size"] == 300
    weights = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "run"))
    assert weights["embed.weight"].shape[0] == 300
    from adaptive.serving.loading import load_run

    assert load_run(tmp_path / "run", get_registry()).model.vocab_size == 300
    by_recipe = flops_json(path, capsys)
    by_run_dir = flops_json(tmp_path / "run" / "recipe.yaml", capsys)
    assert by_recipe["vocab_size"] == by_run_dir["vocab_size"] == 300
    assert by_recipe["flops_per_token_train"] == by_run_dir["flops_per_token_train"]
    start = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][0]
    assert start["params"] == by_recipe["params_unique"]


def test_a_vocab_smaller_than_the_tokenizer_is_refused_before_the_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    with pytest.raises(SystemExit) as info:
        main(["flops", str(path), "model.vocab_size=280"])
    assert info.value.code == 2 and "model.vocab_size: 280 is smaller than the tokenizer's 300" in capsys.readouterr().err
    recipe = recipes.load(path, [f"train.out_dir={tmp_path / 'run'}", "model.vocab_size=280"], get_registry())
    with pytest.raises(RecipeError, match="model.vocab_size: 280"):
        train(recipe, get_registry())
    assert not (tmp_path / "run").exists()

"""``adaptive validate`` refuses what ``adaptive train`` would refuse, with the same one-line error, and a
refused ``train`` leaves no run directory behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_cli import run_main

BASE = """\
name: vt
model: {preset: micro, num_layers: 4, num_recursions: 2, sharing: {name: cycle}, router: {name: expert_choice}}
data: {source: {name: pydoc_topics}, seq_len: 16}
tokenizer: {vocab_size: 300}
train: {steps: 2, batch_size: 2, eval_batches: 1, progress_bar: false, tensorboard: false, device: cpu}
"""


@pytest.fixture
def base(tmp_path, monkeypatch, tmp_path_factory) -> Path:
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path_factory.getbasetemp() / "vt-cache"))
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE)
    return path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("warning:")]


REFUSED = {
    "flex-on-cpu": (["model.attention.name=flex"], "model.attention: a trial training step on cpu failed: attention "
                    "'flex' needs a CUDA device"),
    "no-stopping-rule": (["train.steps=null"], "train: set train.steps, train.tokens or train.flop_budget"),
    "accumulation": (["train.grad_accum=3"], "train: train.batch_size=2 sequences do not divide evenly"),
    "tokenizer-file-missing": (["tokenizer.kind=file", "tokenizer.path=/nonexistent/tok.json"],
                               "tokenizer.path: /nonexistent/tok.json does not exist"),
    "huge-batch": (["train.batch_size=1000000000000"], "train.batch_size: a micro-batch of 1,000,000,000,000 x 16"),
}


@pytest.mark.parametrize("overrides, message", REFUSED.values(), ids=REFUSED.keys())
def test_validate_and_train_refuse_alike_and_train_leaves_nothing(base, tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    errors = {}
    for command in ("validate", "train"):
        code, _, err = run_main(capsys, command, str(base), f"train.out_dir={out}", *overrides)
        assert code == 2 and "Traceback" not in err, (command, err)
        errors[command] = error_lines(err)
    assert errors["validate"] == errors["train"]
    assert any(message in line for line in errors["validate"]), errors["validate"]
    assert not out.exists()


def test_a_capacity_schedule_beside_a_router_that_ignores_capacity_warns_at_validate(base, capsys):
    with pytest.warns(UserWarning, match="model.depth_scheduler='capacity_warmup' is ignored: router 'token_choice'"):
        code, _, _ = run_main(capsys, "validate", str(base), "model.router.name=token_choice",
                              "model.depth_scheduler.name=capacity_warmup")
    assert code == 0


def test_train_warns_about_an_ignored_schedule_once(base, tmp_path, capsys, recwarn):
    code, _, _ = run_main(capsys, "train", str(base), f"train.out_dir={tmp_path / 'run'}",
                          "model.router.name=token_choice", "model.depth_scheduler.name=capacity_warmup")
    ignored = [w for w in recwarn if "model.depth_scheduler='capacity_warmup' is ignored" in str(w.message)]
    assert code == 0 and len(ignored) == 1


def test_validate_still_accepts_a_good_recipe(base, capsys):
    code, out, _ = run_main(capsys, "validate", str(base))
    assert code == 0 and "is valid" in out

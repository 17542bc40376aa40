"""Fault findings of the reliability pass: malformed recipes and overrides, damaged files, signals and
concurrent trainers. Each gets a one-line error (or the right exit code), never a traceback nor a silent
wrong run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adaptive import recipe as recipes
from adaptive.errors import CheckpointError, RecipeError, TrainingError
from adaptive.plugins import get_registry
from adaptive.train import checkpoint as ckpt
from adaptive.train.loop import Trainer, train
from adaptive.train.rundir import RunLock
from test_cli import run_main
from test_training_ux import records

BASE = """\
name: faults
seed: 1
model: {preset: micro, num_layers: 4, num_recursions: 2, sharing: {name: cycle}, router: {name: expert_choice}}
data: {source: {name: pydoc_topics}, seq_len: 16}
tokenizer: {vocab_size: 300}
train: {steps: 4, batch_size: 2, log_every: 1, eval_every: 4, eval_batches: 1, checkpoint_every: 2,
        progress_bar: false, tensorboard: false}
"""


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("faults-cache")


@pytest.fixture
def base(tmp_path, monkeypatch, shared_cache) -> Path:
    monkeypatch.setenv("ADAPTIVE_CACHE", str(shared_cache))
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE)
    return path


def problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        recipes.load(path, list(overrides), get_registry())
    return caught.value.problems


# ------------------------------------------------------------------------------------ recipe files


@pytest.mark.parametrize("content", [b"name: \xe9t\xe9\n", b"\x89PNG\r\n\x1a\n\x00\xff\xfe"], ids=["latin1", "binary"])
def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    code, _, err = run_main(capsys, "validate", str(path))
    assert code == 2 and "not UTF-8 text" in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["", "# only a comment\n\n   \n"], ids=["empty", "comments"])
def test_an_empty_or_comment_only_recipe_is_refused(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert problems(path) == [f"{path}: the recipe is empty (no keys, only comments or blank lines); a recipe is a "
                              "mapping of sections (name, seed, model, data, tokenizer, train)"]


# ------------------------------------------------------------------------------------ values accepted before


@pytest.mark.parametrize("override, key", [
    ("model.num_recursions=true", "model.num_recursions"),
    ("train.lr=.inf", "train.lr"),
    ("model.rope_theta=.nan", "model.rope_theta"),
    ("train.grad_accum=3", "train"),
    ("train.steps=null", "train"),
    ("tokenizer.kind=file", "tokenizer"),
    ("seed=1180591620717411303424", "seed"),
    ("train.device=gpu", "train.device"),
    ("name=../escaped", "name"),
    ("name=/abs/path", "name"),
])
def test_values_that_train_would_refuse_are_refused_when_loading(base, override, key):
    found = problems(base, override)
    assert len(found) == 1 and found[0].startswith(f"{key}: "), found


def test_several_errors_in_one_override_set_are_all_reported(base):
    found = problems(base, "model.num_heads=5", "model.num_kv_heads=3", "data.seq_len=4096")
    assert any("not divisible by num_heads=5" in p for p in found)
    assert any("num_heads=5 is not divisible by num_kv_heads=3" in p for p in found)
    assert any(p.startswith("data.seq_len: 4096 is longer") for p in found)


def test_resolvers_cannot_read_outside_the_recipe(base, monkeypatch):
    monkeypatch.setenv("SECRET_FOR_TEST", "leaked")
    found = problems(base, "name=${oc.env:SECRET_FOR_TEST}")
    assert found == ["name: the resolver ${oc.env:...} is not allowed; a recipe may only interpolate its own keys "
                     "(${model.d_model}, ${..seq_len})"]
    inside = recipes.load(base, ["name=run-${data.seq_len}"], get_registry())  # within the recipe: fine
    assert inside.name == "run-16"


def test_a_huge_model_is_refused_by_arithmetic_before_anything_is_allocated(base, monkeypatch):
    def no_big_tensors(*args, **kwargs):
        raise AssertionError("validation allocated a layer")

    monkeypatch.setattr(torch.nn.Linear, "__init__", no_big_tensors)
    found = problems(base, "model.d_model=1000000000000")
    assert len(found) == 1 and found[0].startswith("model: ") and "more than this machine's" in found[0]


# ------------------------------------------------------------------------------------ refused by train and validate


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=1000000000000", "train.batch_size: a micro-batch of"),
    ("train.out_dir={file}", "is a file"),
    ("train.out_dir={file}/run", "which is a file"),
])
def test_train_refuses_cleanly_without_leaving_a_run_dir(base, tmp_path, capsys, override, expected):
    (tmp_path / "a_file").write_text("x")
    override = override.format(file=tmp_path / "a_file")
    for command in ("validate", "train"):
        code, _, err = run_main(capsys, command, str(base), override)
        assert code == 2 and expected in err and "Traceback" not in err, (command, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "recipe.yaml"]


# ------------------------------------------------------------------------------------ damaged run files


def test_a_torn_last_metrics_line_is_skipped_on_resume(base, tmp_path):
    out = tmp_path / "run"
    train(recipes.load(base, [f"train.out_dir={out}"], get_registry()), get_registry())
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a kill in the middle of a write
    with pytest.warns(UserWarning, match="torn last line"):
        result = train(recipes.load(base, [f"train.out_dir={out}", "train.steps=6"], get_registry()),
                       get_registry(), resume=True)
    assert result.step == 6 and [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_damaged_metrics_line_inside_the_file_is_a_checkpoint_error(base, tmp_path):
    out = tmp_path / "run"
    train(recipes.load(base, [f"train.out_dir={out}"], get_registry()), get_registry())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2: not a JSON record"):
        train(recipes.load(base, [f"train.out_dir={out}", "train.steps=6"], get_registry()), get_registry(),
              resume=True)


@pytest.mark.parametrize("damage, message", [
    (lambda state: {"step": 4}, "missing optimizer, rng, position, tokens"),
    (lambda state: {**state, "step": "four"}, "wrong type of step"),
    (lambda state: {**state, "optimizer": _reshaped(state["optimizer"])}, "does not fit this run's model"),
], ids=["no-keys", "bad-type", "other-shape"])
def test_a_training_state_that_does_not_fit_is_a_checkpoint_error(base, tmp_path, damage, message):
    out = tmp_path / "run"
    train(recipes.load(base, [f"train.out_dir={out}"], get_registry()), get_registry())
    path = ckpt.latest_checkpoint(out) / "train_state.pt"
    torch.save(damage(torch.load(path, weights_only=True)), path)
    with pytest.raises(CheckpointError, match=message):
        train(recipes.load(base, [f"train.out_dir={out}", "train.steps=6"], get_registry()), get_registry(),
              resume=True)


def _reshaped(optimizer: dict) -> dict:
    """The optimizer state of a model whose first matrix had another shape."""
    state = {k: dict(v) for k, v in optimizer["state"].items()}
    first = min(state)
    state[first] = {k: (v[..., :-1].clone() if torch.is_tensor(v) and v.ndim else v) for k, v in state[first].items()}
    return {**optimizer, "state": state}


def test_a_corrupt_cached_tokenizer_is_rebuilt_with_a_warning(base, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path / "cache"))
    first = train(recipes.load(base, [f"train.out_dir={tmp_path / 'a'}", "train.steps=1"], get_registry()),
                  get_registry())
    (cached,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    cached.write_text("{not a tokenizer")
    with pytest.warns(UserWarning, match="unreadable.*training it again"):
        again = train(recipes.load(base, [f"train.out_dir={tmp_path / 'b'}", "train.steps=1"], get_registry()),
                      get_registry())
    assert again.final_loss == first.final_loss  # the same tokenizer, trained again
    assert (tmp_path / "a" / "tokenizer.json").read_text() == cached.read_text()


# ------------------------------------------------------------------------------------ non-finite weights


def test_nonfinite_weights_are_never_saved_nor_called_good(base, tmp_path, monkeypatch):
    original = Trainer.train_step

    def poison_after_step_3(self):
        original(self)
        if self.step == 3:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))

    monkeypatch.setattr(Trainer, "train_step", poison_after_step_3)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"weights became non-finite by step 3.*last good checkpoint is "
                                            r".*step-00000002"):
        train(recipes.load(base, [f"train.out_dir={out}", "train.checkpoint_every=1", "train.log_every=10"],
                           get_registry()), get_registry())
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]


# ------------------------------------------------------------------------------------ signals and exit codes


def test_sigint_during_start_up_exits_130(base, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("adaptive.train.loop.load_data", interrupted)
    code, _, err = run_main(capsys, "train", str(base), f"train.out_dir={tmp_path / 'run'}")
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "run").exists()  # refused before it started: nothing left behind


def test_a_double_sigint_exits_130(base, tmp_path, capsys, monkeypatch):
    original = Trainer.train_step

    def two_interrupts(self):
        original(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", two_interrupts)
    code, _, err = run_main(capsys, "train", str(base), f"train.out_dir={tmp_path / 'run'}", "train.steps=50")
    assert code == 130


@pytest.mark.slow
def test_a_second_trainer_is_locked_out_and_sigint_after_saving_exits_130(base, tmp_path, shared_cache, capsys):
    """Two real processes on one run directory: the second is refused with the holder's pid; a SIGINT then
    stops the first, which saves and exits 130, and the directory can be resumed."""
    out = tmp_path / "run"
    env = {**os.environ, "ADAPTIVE_CACHE": str(shared_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adaptive", "train", str(base), f"train.out_dir={out}",
                             "train.steps=100000", "train.checkpoint_every=100000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "metrics.jsonl").is_file() and any("loss" in r for r in _complete_records(out)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        in_use = rf"train.out_dir: {out} is in use by another trainer \(pid {proc.pid}\)"
        with pytest.raises(CheckpointError, match=in_use):  # the lock itself (two trainers starting at once)
            RunLock(out)
        for command in ("validate", "train"):  # both refuse before touching anything
            code, _, err = run_main(capsys, command, str(base), f"train.out_dir={out}", "train.steps=100000",
                                    "train.checkpoint_every=100000")
            assert code == 2 and re.search(in_use, err), err
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT" in stdout and "Traceback" not in stderr
    end = [r for r in records(out) if r.get("event") == "end"][-1]
    assert ckpt.latest_checkpoint(out).name == f"step-{end['step']:08d}"
    again = train(recipes.load(base, [f"train.out_dir={out}", f"train.steps={end['step'] + 1}",
                                      "train.checkpoint_every=100000"], get_registry()), get_registry(), resume=True)
    assert again.step == end["step"] + 1


def _complete_records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # being written
    return out

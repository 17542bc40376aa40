"""The trainer: schedules, stopping rules, run directories, checkpoints, signals, non-finite losses."""

from __future__ import annotations

import json
import os
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
from adaptive.train.config import TrainConfig
from adaptive.train.loop import Trainer, train
from adaptive.train.schedule import lr_factor

BASE = """\
name: tiny-test
seed: 1
model: {preset: micro, num_recursions: 3, sharing: {name: middle_cycle}, router: {name: expert_choice},
        kv_policy: {name: recursion_wise}}
data: {source: {name: pydoc_topics}, seq_len: 32}
tokenizer: {vocab_size: 300}
train: {steps: 12, batch_size: 4, log_every: 1, eval_every: 6, eval_batches: 2, checkpoint_every: 4, progress_bar: false}
"""


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One tokenizer/token cache per test process: the BPE is trained once, not once per test."""
    return tmp_path_factory.mktemp("adaptive-cache")


@pytest.fixture
def make(tmp_path, monkeypatch, shared_cache):
    monkeypatch.setenv("ADAPTIVE_CACHE", str(shared_cache))
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE)

    def build(*overrides: str, out: str = "run"):
        return recipes.load(path, [f"train.out_dir={tmp_path / out}", *overrides], get_registry())

    return build


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["wsd", "cosine", "constant"])
def test_schedules_warm_up_then_follow_their_shape(schedule):
    cfg = TrainConfig(schedule=schedule, warmup_fraction=0.1, decay_fraction=0.2, min_lr_ratio=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert all(0.1 <= x <= 1.0 for x in f)
    if schedule == "wsd":
        assert f[10:80] == [1.0] * 70
        assert all(a > b for a, b in zip(f[80:], f[81:])) and f[-1] > 0.1
    elif schedule == "cosine":
        assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.15
    else:
        assert f[10:] == [1.0] * 90


# ---------------------------------------------------------------------------------------------- a run


def test_a_short_run_learns_and_leaves_a_complete_run_dir(make, tmp_path):
    recipe = make("train.steps=30", "train.checkpoint_every=10", "train.eval_every=30")
    result = train(recipe, get_registry())
    run = tmp_path / "run"
    assert result.run_dir == run and result.step == 30
    saved = recipes.load(run / "recipe.yaml", [], get_registry())
    from adaptive.vocab import with_resolved_vocab  # the saved recipe records the model's vocabulary

    assert saved.model_dump() == with_resolved_vocab(recipe).model_dump() and saved.model.vocab_size == 300
    curve = losses(run)
    assert sorted(curve) == list(range(1, 31))
    assert sum(list(curve.values())[-5:]) / 5 < curve[1] - 0.5
    events = {r["event"]: r for r in records(run) if "event" in r}
    assert events["data"]["val_unigram_entropy"] == pytest.approx(result.unigram_entropy)
    assert events["end"]["val_loss"] == pytest.approx(result.val_loss)
    step_record = records(run)[2]
    assert {"loss", "lr", "tok_per_s", "tokens", "grad_norm", "mean_depth", "depth_hist", "aux/router_bce",
            "sampling_acc/step1", "flops"} <= set(step_record)
    assert step_record["depth_hist"][0] == 0 and sum(step_record["depth_hist"]) == pytest.approx(1.0, abs=1e-3)
    val = [r for r in records(run) if "val_loss" in r and "event" not in r][-1]
    assert {"val_mean_depth", "val_depth_hist", "val_unigram_entropy"} <= set(val)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [20, 30]  # keep_checkpoints=2


def test_checkpoint_weights_reproduce_the_model(make, tmp_path):
    recipe = make("train.steps=4")
    train(recipe, get_registry())
    weights, state, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert meta["step"] == 4 and state["step"] == 4 and state["position"] == 4 * 4
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    from adaptive.model import build_model

    model = build_model(recipe.model, get_registry(), vocab_size=300)
    model.load_state_dict(weights)
    if getattr(model.config, "tie_embeddings", False):
        assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_router_buffers_are_checkpointed_in_float32(make, tmp_path):
    """The loss-free balancing bias is a persistent buffer updated by after_optimizer_step."""
    recipe = make("train.steps=4", "model.router.name=token_choice", "model.router.balancing=loss_free",
                  "model.kv_policy.name=full")
    train(recipe, get_registry())
    weights = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "run"))
    (bias,) = [t for name, t in weights.items() if name.endswith("balance_bias")]
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0


def test_tensorboard_events_when_the_package_is_there(make, tmp_path, monkeypatch):
    import types

    scalars = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((key, step))

        def close(self):
            scalars.append(("closed", 0))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(make("train.steps=2", "train.eval_every=2"), get_registry())
    assert ("loss", 1) in scalars and ("val_loss", 2) in scalars and scalars[-1] == ("closed", 0)


def test_stop_by_tokens(make, tmp_path):
    result = train(make("train.steps=null", "train.tokens=500"), get_registry())
    assert result.step == 4  # ceil(500 / (4 sequences x 32 tokens))


def test_stop_by_flop_budget_uses_the_accountant(make, tmp_path):
    from adaptive.flops import count_flops

    recipe = make("train.steps=1")  # only its model section is used here
    per_token = count_flops(recipe.model, get_registry(), seq_len=32, vocab_size=300).flops_per_token_train
    budget = per_token * 4 * 32 * 3.5  # three and a half steps' worth
    result = train(make("train.steps=null", f"train.flop_budget={budget}"), get_registry())
    assert result.step == 3
    last = [r for r in records(tmp_path / "run") if "flops" in r][-1]
    assert last["flops"] == pytest.approx(per_token * 3 * 4 * 32) and last["flops"] <= budget


def test_the_first_limit_reached_stops_the_run(make):
    assert train(make("train.steps=2", "train.tokens=100000"), get_registry()).step == 2


def test_bfloat16_autocast_runs(make):
    result = train(make("train.steps=2", "train.dtype=bfloat16"), get_registry())
    assert result.final_loss is not None and result.final_loss == result.final_loss


def test_no_stopping_rule_is_a_recipe_error(make):
    with pytest.raises(RecipeError, match="train.steps"):
        train(make("train.steps=null"), get_registry())


def test_batch_must_divide_over_accumulation(make):
    with pytest.raises(RecipeError, match="train.batch_size"):
        train(make("train.grad_accum=3"), get_registry())


def test_grad_accumulation_matches_the_full_batch(make, tmp_path):
    train(make("train.steps=3", out="full"), get_registry())
    train(make("train.steps=3", "train.grad_accum=2", out="accum"), get_registry())
    full, accum = losses(tmp_path / "full"), losses(tmp_path / "accum")
    assert full.keys() == accum.keys()
    for step in full:
        assert accum[step] == pytest.approx(full[step], abs=1e-4)
    bce = [[r["aux/router_bce"] for r in records(tmp_path / run) if "loss" in r] for run in ("full", "accum")]
    assert bce[0] == pytest.approx(bce[1], rel=0.05)  # a mean of micro-batch means, not a sum


# ---------------------------------------------------------------------------------------------- resume


def test_sigint_saves_and_resume_continues_bit_for_bit(make, tmp_path, monkeypatch):
    train(make(out="reference"), get_registry())
    original = Trainer.train_step

    def interrupt_at_7(self):
        original(self)
        if self.step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_7)
    result = train(make(out="run"), get_registry())
    assert result.interrupted and result.step == 7
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000007"
    monkeypatch.setattr(Trainer, "train_step", original)
    result = train(make(out="run"), get_registry(), resume=True)
    assert result.step == 12 and not result.interrupted
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")


def test_a_run_dir_with_another_recipe_is_refused(make, tmp_path):
    train(make("train.steps=4"), get_registry())
    with pytest.raises(CheckpointError, match="differs at: train.lr"):
        train(make("train.steps=4", "train.lr=0.001"), get_registry())
    with pytest.raises(CheckpointError, match="different model"):
        train(make("train.steps=4", "model.d_model=32"), get_registry(), resume=True)
    again = train(make("train.steps=4"), get_registry())  # the same recipe: resumes (nothing left to do)
    assert again.step == 4


def test_default_run_dir_and_resume_of_the_newest_run(make, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = make("train.steps=2", "~train.out_dir")
    first = train(recipe, get_registry())
    assert first.run_dir.parent == Path("runs") and first.run_dir.name.startswith("tiny-test-")
    assert f"run dir: {first.run_dir}" in capsys.readouterr().out
    again = train(recipe, get_registry(), resume=True)
    assert again.run_dir == first.run_dir and again.step == 2


def test_resume_without_a_checkpoint_is_an_error(make):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(make(out="empty"), get_registry(), resume=True)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_partial_checkpoint_dirs_are_invisible_and_cleaned(tmp_path):
    root = ckpt.checkpoint_dir(tmp_path)
    (root / ".tmp-step-00000009-123").mkdir(parents=True)
    state = {"w": torch.ones(2)}
    ckpt.save_checkpoint(tmp_path, 4, state, {"step": 4}, {}, keep=3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    ckpt.remove_partial(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]


def test_tied_tensors_are_stored_once_and_restored_as_aliases(tmp_path):
    shared = torch.randn(3, 4)
    ckpt.save_checkpoint(tmp_path, 1, {"a.weight": shared, "b.weight": shared, "c": torch.zeros(2)}, {}, {}, keep=1)
    loaded = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(loaded["a.weight"], shared) and torch.equal(loaded["b.weight"], shared)


class Payload:
    """A pickle that would run code when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"
    path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"step": 1}, {}, keep=1)
    torch.save({"step": 1, "evil": Payload(marker)}, path / "train_state.pt")
    with pytest.raises(CheckpointError, match="cannot read the training state"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_incomplete_checkpoint_is_a_checkpoint_error(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"step": 1}, {}, keep=1)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        ckpt.load_checkpoint(path)


def nan_loss(out, ce):
    return ce * float("nan")


def nan_gradient(out, ce):
    """A finite loss whose gradient is NaN (the classic sqrt-of-negative inside a where)."""
    negative = -out.logits_BTV.float().abs().sum() - 1.0
    return torch.where(torch.tensor(True), ce, torch.sqrt(negative))


@pytest.mark.parametrize("poison, message", [(nan_loss, "loss became nan"), (nan_gradient, "gradient norm became nan")])
def test_nonfinite_values_stop_and_keep_the_good_checkpoint(make, tmp_path, monkeypatch, poison, message):
    original = Trainer.forward_loss

    def poisoned(self, batch, progress):
        out, ce = original(self, batch, progress)
        return out, poison(out, ce) if self.step >= 6 else ce

    monkeypatch.setattr(Trainer, "forward_loss", poisoned)
    with pytest.raises(TrainingError, match=rf"{message} at step 7.*step-00000004"):
        train(make("train.log_every=10", "train.eval_every=100"), get_registry())
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4]


@pytest.mark.slow
def test_sigterm_from_outside_saves_and_exits_cleanly(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("steps: 12", "steps: 400").replace("checkpoint_every: 4", "checkpoint_every: 100"))
    out = tmp_path / "run"
    env = {**os.environ, "ADAPTIVE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adaptive", "train", str(recipe), f"train.out_dir={out}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and any("loss" in r for r in records(out)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # saved, yet not finished: a scheduler can tell
    assert "stopped by SIGTERM" in stdout
    end = [r for r in records(out) if r.get("event") == "end"][-1]
    assert end["interrupted"] == "SIGTERM" and end["step"] < 400
    assert ckpt.latest_checkpoint(out).name == f"step-{end['step']:08d}"


CPU_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", CPU_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_cpu_recipe_trains(path, tmp_path, monkeypatch, shared_cache):
    """Each recipe's own components, shrunk to a micro shape on the stdlib corpus, run 3 steps end to end."""
    monkeypatch.setenv("ADAPTIVE_CACHE", str(shared_cache))
    small = ["model.preset=micro", "model.num_layers=8", "model.d_model=64", "model.d_ffn=128",
             "data.source={name: pydoc_topics}", "data.seq_len=32", "tokenizer.vocab_size=300",
             "train.steps=3", "train.batch_size=4", "train.eval_every=3", "train.eval_batches=1",
             "train.checkpoint_every=3", "train.progress_bar=false", f"train.out_dir={tmp_path / 'run'}"]
    recipe = recipes.load(path, small, get_registry())
    train(recipe, get_registry())
    finished = [r for r in records(tmp_path / "run") if "val_loss" in r]
    assert finished and all(torch.isfinite(torch.tensor(r["val_loss"])) for r in finished)
    assert ckpt.latest_checkpoint(tmp_path / "run") is not None

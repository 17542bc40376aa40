"""What a user sees while training: progress with elapsed time and ETA, timestamped metrics, depth
histograms of a fixed length, one warning for a missing TensorBoard, finished runs, resume hints."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch

from adaptive import recipe as recipes
from adaptive.interfaces import RoutingStats
from adaptive.plugins import get_host, get_registry
from adaptive.train import metrics
from adaptive.train.loop import Trainer, train
from test_cli import run_main

BASE = """\
name: ux
seed: 3
model: {preset: micro, num_layers: 5, num_recursions: 3, sharing: {name: middle_cycle}, router: {name: expert_choice},
        kv_policy: {name: recursion_wise}}
data: {source: {name: pydoc_topics}, seq_len: 16}
tokenizer: {vocab_size: 300}
train: {steps: 4, batch_size: 2, log_every: 1, eval_every: 2, eval_batches: 1, checkpoint_every: 2,
        progress_bar: true, tensorboard: false}
"""


@pytest.fixture
def base(tmp_path, monkeypatch, tmp_path_factory) -> Path:
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path_factory.getbasetemp() / "ux-cache"))
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE)
    return path


def load(base: Path, *overrides: str):
    return recipes.load(base, list(overrides), get_registry())


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_piped_progress_shows_elapsed_and_eta_and_the_end_gives_the_duration(base, tmp_path, capsys):
    train(load(base, f"train.out_dir={tmp_path / 'run'}"), get_registry())
    out = capsys.readouterr().out  # not a terminal: plain lines
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) >= 4 and all(" elapsed " in line and ", eta " in line for line in steps), steps
    assert any(line.startswith("step 4/4") and line.endswith("eta 0.0 s") for line in steps), steps
    (done,) = [line for line in out.splitlines() if line.startswith("done: ")]
    assert done.startswith("done: step 4 in ") and " s, val loss " in done


def test_every_metrics_record_has_a_timestamp_and_depth_hists_have_n_r_plus_1_entries(base, tmp_path):
    train(load(base, f"train.out_dir={tmp_path / 'run'}"), get_registry())
    found = records(tmp_path / "run")
    stamps = [r["time"] for r in found]
    assert all(isinstance(t, float) for t in stamps) and stamps == sorted(stamps)
    hists = [r[k] for r in found for k in ("depth_hist", "val_depth_hist") if k in r]
    assert len([r for r in found if "val_depth_hist" in r]) == 2
    assert hists and all(len(h) == 3 + 1 for h in hists), hists


def test_the_depth_histogram_pads_shorter_steps_instead_of_dropping_counts():
    acc = metrics.StepAccumulator(num_steps=3)
    one_step = RoutingStats(depth_BT=torch.tensor([[0, 1]]), selected_per_step=[torch.ones(1, 2, dtype=torch.bool)],
                            logits_per_step=[], metrics={})
    three_steps = RoutingStats(depth_BT=torch.tensor([[3, 2]]), selected_per_step=[torch.ones(1, 2)] * 3,
                               logits_per_step=[], metrics={})
    acc.add_stats(one_step)
    acc.add_stats(three_steps)
    assert acc.depth_hist.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_a_missing_tensorboard_warns_once(base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(metrics, "_TENSORBOARD_WARNED", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("a", "b"):
            train(load(base, f"train.out_dir={tmp_path / name}", "train.tensorboard=true", "train.steps=1"),
                  get_registry())
    missing = [w for w in caught if "tensorboard package is not installed" in str(w.message)]
    assert len(missing) == 1


def test_re_running_a_finished_run_says_so_and_writes_nothing(base, tmp_path, capsys):
    recipe = load(base, f"train.out_dir={tmp_path / 'run'}")
    first = train(recipe, get_registry())
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = train(recipe, get_registry())
    assert f"{tmp_path / 'run'} already finished: step 4 of 4; nothing to do" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert [r["event"] for r in records(tmp_path / "run") if "event" in r].count("end") == 1
    assert again.step == 4 and again.val_loss == first.val_loss


def test_a_model_change_is_not_offered_resume(base, tmp_path, capsys):
    train(load(base, f"train.out_dir={tmp_path / 'run'}", "train.steps=2"), get_registry())
    changed = [str(base), f"train.out_dir={tmp_path / 'run'}", "train.steps=2", "model.d_ffn=64"]
    for argv in (["validate", *changed], ["train", *changed], ["train", *changed, "--resume"]):
        code, _, err = run_main(capsys, *argv)
        assert code == 2 and "different model (differs at: model.d_ffn)" in err, (argv, err)
        assert "pass --resume" not in err and "choose another train.out_dir" in err


def test_the_continue_hint_is_a_command_that_resumes_the_run(base, tmp_path, capsys, monkeypatch):
    original = Trainer.train_step

    def interrupt_at_2(self):
        original(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_2)
    code, out, _ = run_main(capsys, "train", str(base), f"train.out_dir={tmp_path / 'run'}", "train.steps=3")
    assert code == 130
    hint = out.split("Continue with: ", 1)[1].split()  # the line may be folded by the console width
    assert hint[:2] == ["adaptive", "train"] and "<recipe>" not in out
    monkeypatch.setattr(Trainer, "train_step", original)
    code, out, err = run_main(capsys, *shlex.split(" ".join(hint[1:])))
    assert code == 0 and "done: step 3" in out, err


def test_an_unknown_plugin_in_the_allow_list_warns(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_LOAD_PLUGINS", "no_such_plugin_xyz")
    with pytest.warns(UserWarning, match="ADAPTIVE_LOAD_PLUGINS names 'no_such_plugin_xyz', which no installed"):
        get_host()

"""Kill a training run with SIGKILL mid-way, resume it, and require the exact loss curve of an
uninterrupted run (bit for bit on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPE = """\
name: resume-test
seed: 3
model: {preset: micro, num_recursions: 3, sharing: {name: middle_cycle}}
data: {source: {name: pydoc_topics}, seq_len: 32}
tokenizer: {vocab_size: 300}
train: {steps: 60, batch_size: 4, log_every: 1, eval_every: 20, checkpoint_every: 10, keep_checkpoints: 2, lr: 0.003}
"""


def command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adaptive", "train", str(recipe), f"train.out_dir={out}", *extra]


def environment(cache: Path) -> dict[str, str]:
    return {**os.environ, "ADAPTIVE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r and "event" not in r}


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_loss_curve(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    env = environment(tmp_path / "cache")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command(recipe, reference), env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(command(recipe, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step-00000020"
    deadline = time.monotonic() + 240
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = losses(killed)
    assert max(before) < 60, "the run finished before the kill: the test proves nothing"

    resumed = subprocess.run(command(recipe, killed, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    expected, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 61))
    assert got == expected  # exact float equality, every step
    assert val_losses(killed) == val_losses(reference)

"""Data-parallel training on CPU (gloo, two processes launched by torchrun) against one process.

Two processes with ``grad_accum=1`` run exactly the micro-batches that one process with ``grad_accum=2``
runs (micro-batch j = accumulation step x world size + rank), so the only difference is the order in which
gradients are summed (all-reduce / reduce-scatter vs. accumulation). The tolerance is therefore float32
rounding carried through a few AdamW steps: |loss difference| <= 1e-4 nats at every step (on CPU with gloo
the curves have come out identical, difference 0.0, for both DDP and FSDP2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """\
name: dist-test
seed: 2
model: {preset: micro, num_recursions: 3, sharing: {name: middle_cycle}, router: {name: expert_choice},
        kv_policy: {name: recursion_wise}}
data: {source: {name: pydoc_topics}, seq_len: 32}
tokenizer: {vocab_size: 300}
train: {steps: 6, batch_size: 8, log_every: 1, eval_every: 3, eval_batches: 1, checkpoint_every: 3, device: cpu,
        progress_bar: false}
"""
TOLERANCE = 1e-4


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if key in r and "event" not in r}


def launch(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    (root / "recipe.yaml").write_text(RECIPE)
    env = {**os.environ, "ADAPTIVE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    launch([sys.executable, "-m", "adaptive", "train", str(root / "recipe.yaml"), f"train.out_dir={root / 'run'}",
            "train.grad_accum=2"], env)
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, single, strategy):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    env = {**os.environ, "ADAPTIVE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "adaptive",
               "train", str(tmp_path / "recipe.yaml"), f"train.out_dir={run}", f"train.distributed.strategy={strategy}"]
    launch(command, env)
    start = next(r for r in records(run) if r.get("event") == "start")
    assert start["processes"] == 2 and start["strategy"] == strategy
    one, two = curve(single, "loss"), curve(run, "loss")
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert abs(one[step] - two[step]) <= TOLERANCE, (step, one[step], two[step])
    for step, value in curve(single, "val_loss").items():
        assert abs(curve(run, "val_loss")[step] - value) <= TOLERANCE
    # resume from the step-3 checkpoint: the sharded/replicated state must continue the same curve exactly
    final = run / "checkpoints" / "step-00000006"
    assert (final / "model.safetensors").is_file()
    for path in final.iterdir():
        path.unlink()
    final.rmdir()
    launch(command + ["--resume"], env)
    assert curve(run, "loss") == two

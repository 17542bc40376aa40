"""The lm-evaluation-harness adapter, offline on local jsonl tasks (tests/data/lm_eval): what the harness
gets back equals ``adaptive eval``'s own scoring of the same strings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptive.errors import CheckpointError
from adaptive.eval.lm_eval_adapter import AdaptiveHarnessLM, cut_at_stop
from adaptive.eval.scoring import encode, loglikelihood, rolling_pairs, score_pairs
from adaptive.plugins import get_registry
from adaptive.serving.loading import load_run
from test_eval import tiny_run

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
NAMES = ["adaptive_tiny_mc", "adaptive_tiny_ppl", "adaptive_tiny_gen"]


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines() if line.strip()]


@pytest.fixture
def run_dir(tmp_path_factory, monkeypatch) -> Path:
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path_factory.getbasetemp() / "adaptive-cache"))
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One harness run over the three local tasks (module-wide): `datasets` offline, caching in a tmp dir,
    task paths resolved from the repository root."""
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTIVE_CACHE", str(tmp_path_factory.getbasetemp() / "adaptive-cache"))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf"))
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.chdir(ROOT)
        run = tiny_run(tmp_path_factory)
        return lm_eval.simple_evaluate(model="adaptive", model_args=f"path={run},dtype=float64", tasks=NAMES,
                                       task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                                       log_samples=True, batch_size=2)


@pytest.fixture
def reference(run_dir):
    loaded = load_run(run_dir, get_registry())
    loaded.model.double()
    return loaded


def test_the_model_is_registered_by_import():
    from lm_eval.api.registry import get_model

    assert get_model("adaptive") is AdaptiveHarnessLM


def test_multiple_choice_loglikelihoods_equal_adaptive_scoring(harness, reference):
    samples = sorted(harness["samples"]["adaptive_tiny_mc"], key=lambda s: s["doc_id"])
    docs = jsonl("tiny_mc.jsonl")
    requests = [(d["context"], f" {c}") for d in docs for c in d["choices"]]
    ours = loglikelihood(reference.model, reference.tokenizer, requests, max_len=reference.recipe.data.seq_len,
                         batch_tokens=48)  # batched differently from the adapter's
    got = [resp[0] for s in samples for resp in s["resps"]]
    assert [tuple(a) for s in samples for a in s["arguments"]] == requests
    assert [lp for lp, _ in got] == pytest.approx([s.logprob for s in ours], abs=1e-9)
    assert [greedy for _, greedy in got] == [s.is_greedy for s in ours]
    acc = acc_norm = 0
    for n, doc in enumerate(docs):
        row = ours[4 * n:4 * n + 4]
        raw = [s.logprob for s in row]
        norm = [s.logprob / len(c) for s, c in zip(row, doc["choices"])]
        acc += raw.index(max(raw)) == doc["answer"]
        acc_norm += norm.index(max(norm)) == doc["answer"]
    metrics = harness["results"]["adaptive_tiny_mc"]
    assert metrics["acc,none"] == pytest.approx(acc / len(docs))
    assert metrics["acc_norm,none"] == pytest.approx(acc_norm / len(docs))


def test_rolling_loglikelihood_equals_adaptive_scoring_over_lm_eval_windows(harness, reference):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tok, max_len = reference.tokenizer, reference.recipe.data.seq_len
    samples = sorted(harness["samples"]["adaptive_tiny_ppl"], key=lambda s: s["doc_id"])
    for sample, doc in zip(samples, jsonl("tiny_text.jsonl")):
        ids = encode(tok, doc["text"])
        assert len(ids) > max_len  # several windows
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.separator_id, max_len, 1)]
        ours = rolling_pairs(ids, tok.separator_id, max_len)
        assert [(list(c), list(x)) for c, x in theirs] == ours
        total = sum(s.logprob for s in score_pairs(reference.model, ours, max_len=max_len))
        assert sample["resps"][0][0] == pytest.approx(total, abs=1e-9)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_strings(harness, reference):
    model, tok = reference.model, reference.tokenizer
    samples = sorted(harness["samples"]["adaptive_tiny_gen"], key=lambda s: s["doc_id"])
    for sample, doc in zip(samples, jsonl("tiny_mc.jsonl")):
        ids = [tok.separator_id, *encode(tok, doc["context"])]
        new = []
        for _ in range(6):  # max_gen_toks in the task file
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + new])).logits_BTV[0, -1].argmax())
            if nxt == tok.separator_id:
                break
            new.append(nxt)
        assert sample["resps"][0][0] == cut_at_stop(tok.decode(new), [".", "\n"])


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("a b. c\nd", ["\n", "."]) == "a b" and cut_at_stop("abc", ["x"]) == "abc"
    assert cut_at_stop("abc", []) == "abc" and cut_at_stop("abc", [""]) == "abc"


def test_a_bad_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither a run directory"):
        AdaptiveHarnessLM(path=str(tmp_path))
    with pytest.raises(ValueError, match="dtype must be one of float32, float64, bfloat16"):
        AdaptiveHarnessLM(path=str(ROOT / "nowhere"), dtype="float16")


@pytest.mark.slow
def test_the_harness_command_line_finds_the_model(run_dir, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "adaptive.eval.lm_eval_adapter", "--model", "adaptive",
                             "--model_args", f"path={run_dir}", "--tasks", "adaptive_tiny_mc", "--include_path",
                             str(TASKS), "--output_path", str(tmp_path / "out")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (found,) = (tmp_path / "out").rglob("results_*.json")
    metrics = json.loads(found.read_text())["results"]["adaptive_tiny_mc"]
    assert 0 <= metrics["acc,none"] <= 1 and "acc_norm,none" in metrics

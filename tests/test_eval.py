"""``adaptive eval``: batched scoring equals one-by-one scoring, the held-out loss equals the trainer's, the
routing statistics equal their definitions, the tasks come from held-out articles only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adaptive import recipe as recipes
from adaptive.eval.heldout import heldout_loss, heldout_rows
from adaptive.eval.routing import RoutingTally
from adaptive.eval.scoring import encode_pair, rolling_pairs, score_pairs
from adaptive.eval.tasks import CHOICES, Item, build_task, held_out_articles, score_task
from adaptive.eval import tasks as task_module
from adaptive.plugins import get_registry
from adaptive.serving.loading import load_run
from adaptive.testing import as_model, micro_config
from adaptive.train.loop import train
from test_cli import run_main

TINY = """\
name: eval-tiny
seed: 3
model: {preset: micro, num_recursions: 3, sharing: {name: middle_cycle}, router: {name: expert_choice},
        kv_policy: {name: recursion_wise}}
data: {source: {name: pydoc_topics}, seq_len: 32}
tokenizer: {vocab_size: 300}
train: {steps: 16, batch_size: 4, log_every: 2, eval_every: 8, eval_batches: 3, checkpoint_every: 16,
        progress_bar: false}
"""
MOR = {"sharing": "middle_cycle", "router": "expert_choice", "kv_policy": "recursion_wise"}


def tiny_run(tmp_path_factory, name: str = "eval-tiny", overrides: tuple[str, ...] = ()) -> Path:
    """A quickly trained run, once per test process (shared by the eval, inspect and adapter tests)."""
    root = tmp_path_factory.getbasetemp() / name
    if not (root / "run" / "checkpoints").is_dir():
        root.mkdir(exist_ok=True)
        (root / "recipe.yaml").write_text(TINY)
        import os

        os.environ.setdefault("ADAPTIVE_CACHE", str(tmp_path_factory.getbasetemp() / "adaptive-cache"))
        recipe = recipes.load(root / "recipe.yaml", [f"train.out_dir={root / 'run'}", *overrides], get_registry())
        train(recipe, get_registry())
    return root / "run"


@pytest.fixture
def run_dir(tmp_path_factory, monkeypatch) -> Path:
    path = tiny_run(tmp_path_factory)
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path_factory.getbasetemp() / "adaptive-cache"))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ scoring


def reference_score(model, context: list[int], cont: list[int], max_len: int) -> tuple[float, bool]:
    """One sequence alone, no padding: the sum of log-softmax at the continuation's positions."""
    seq = (context + cont)[-(max_len + 1):]
    n = min(len(cont), len(seq) - 1)
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]])).logits_BTV[0]
    logprob = torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
    greedy = (logits.argmax(-1) == torch.tensor(seq[1:]))[len(seq) - 1 - n:]
    return float(logprob[len(seq) - 1 - n:].sum()), bool(greedy.all())


@pytest.mark.parametrize("parts", [MOR, {"sharing": "middle_cycle", "router": "token_choice", "kv_policy": "full"},
                                   {"sharing": "none"}])
def test_batched_scores_equal_each_sequence_scored_alone(parts):
    model = as_model(micro_config(parts, num_recursions=3 if parts["sharing"] != "none" else 1), seed=1)
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(1, model.vocab_size, (n,), generator=gen).tolist()  # noqa: E731
    pairs = [([0, *rand(c)], rand(x)) for c, x in [(3, 2), (17, 5), (1, 1), (9, 9), (30, 4), (5, 12), (2, 1)]]
    got = score_pairs(model, pairs, max_len=24, batch_tokens=40)  # several batches, each right-padded, truncation
    for (context, cont), score in zip(pairs, got):
        logprob, greedy = reference_score(model, context, cont, max_len=24)
        assert score.logprob == pytest.approx(logprob, abs=1e-10) and score.is_greedy == greedy
        assert score.num_tokens == min(len(cont), len((context + cont)[-25:]) - 1)


def test_a_greedy_continuation_is_reported_greedy():
    model = as_model(micro_config(MOR, num_recursions=3), seed=2)
    ids = [0, 5, 9]
    for _ in range(4):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits_BTV[0, -1].argmax()))
    wrong = ids[-1] % (model.vocab_size - 1) + 1
    greedy, other = score_pairs(model, [(ids[:3], ids[3:]), (ids[:3], ids[3:-1] + [wrong])], max_len=64)
    assert greedy.is_greedy and not other.is_greedy and greedy.logprob > other.logprob


def test_rolling_windows_predict_every_token_once_with_full_context():
    ids = list(range(100, 111))
    pairs = rolling_pairs(ids, prefix_id=7, max_len=4)
    assert [t for _, cont in pairs for t in cont] == ids
    assert pairs[0] == ([7], ids[:4])
    for context, cont in pairs[1:]:
        seq = context + cont
        assert len(seq) == 5 and seq == ids[ids.index(seq[0]):ids.index(seq[0]) + 5]
    with pytest.raises(ValueError, match="max_len"):
        rolling_pairs(ids, 7, 0)


def test_encode_pair_moves_trailing_spaces_into_the_continuation(run_dir):
    tok = load_run(run_dir, get_registry()).tokenizer
    context, cont = encode_pair(tok, "The value of ", "x")
    whole = tok.tok.encode("The value of x", add_special_tokens=False).ids
    assert context[0] == tok.separator_id and context[1:] + cont == whole
    assert tok.decode(cont) == " x"


# ------------------------------------------------------------------------------------------ held-out loss


def test_heldout_loss_on_the_trainers_rows_equals_its_val_loss_and_routing(run_dir):
    loaded = load_run(run_dir, get_registry())
    recipe = loaded.recipe
    trainer_rows = recipe.train.eval_batches * recipe.train.batch_size
    held = heldout_rows(recipe, loaded.tokenizer, get_registry(), max_rows=trainer_rows)
    report = heldout_loss(loaded.model, held, batch_size=recipe.train.batch_size)
    last = [r for r in records(run_dir) if "val_loss" in r and "event" not in r][-1]
    assert report.loss == pytest.approx(last["val_loss"], rel=1e-6)
    assert report.perplexity == pytest.approx(math.exp(last["val_loss"]), rel=1e-6)
    assert report.routing["mean_depth"] == pytest.approx(last["val_mean_depth"], abs=1e-9)
    assert report.routing["depth_hist"] == last["val_depth_hist"]
    assert report.tokens == len(held.index_N) * recipe.data.seq_len


def test_routing_statistics_follow_their_definitions():
    model = as_model(micro_config(MOR, num_recursions=3), seed=4, capacities=[1.0, 0.5, 0.25])
    for module in model.router.modules():  # larger router logits: decisions of both signs at every step
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
    tokens_BT = torch.randint(0, model.vocab_size, (3, 20), generator=torch.Generator().manual_seed(5))
    tally = RoutingTally(model)
    with torch.no_grad():
        causal, top_k = model(tokens_BT), model(tokens_BT, training_rule=True)
    tally.add_causal(causal.stats)
    tally.add_training_rule(top_k.stats)
    summary = tally.summary()
    depth = causal.stats.depth_BT
    assert summary["mean_depth"] == pytest.approx(depth.double().mean().item(), abs=1e-12)
    assert summary["depth_hist"] == [round((depth == d).double().mean().item(), 4) for d in range(4)]
    assert summary["selected_frac"] == pytest.approx([s.double().mean().item() for s in causal.stats.selected_per_step])
    # prelude and coda: one layer each; one layer per recursion step
    assert summary["mean_layers"] == pytest.approx(2 + depth.double().mean().item(), abs=1e-12)
    for r in range(3):  # the causal rule (logit > 0, or every active token at capacity 1) against top-k membership
        eligible = torch.ones_like(tokens_BT, dtype=torch.bool) if r == 0 else top_k.stats.selected_per_step[r - 1]
        agree = (top_k.stats.logits_per_step[r] > 0) == top_k.stats.selected_per_step[r]
        assert summary["sampling_acc"][r] == pytest.approx(agree[eligible].double().mean().item())
    routed = [1, 2]
    eligible = [top_k.stats.selected_per_step[r - 1] for r in routed]
    agree = [((top_k.stats.logits_per_step[r] > 0) == top_k.stats.selected_per_step[r])[e]
             for r, e in zip(routed, eligible)]
    assert summary["sampling_acc_routed"] == pytest.approx(torch.cat(agree).double().mean().item())


def test_vanilla_routing_summary_has_no_steps():
    model = as_model(micro_config({"sharing": "none"}, num_recursions=1))
    tally = RoutingTally(model)
    with torch.no_grad():
        tally.add_causal(model(torch.zeros(1, 4, dtype=torch.long)).stats)
    summary = tally.summary()
    assert summary["num_steps"] == 0 and summary["mean_depth"] is None and summary["sampling_acc"] is None
    assert summary["mean_layers"] == model.plan.num_logical


# ------------------------------------------------------------------------------------------ tasks


@pytest.fixture(scope="module")
def articles():
    recipe = recipes.Recipe()  # wiki_offline, the default 5% split
    return held_out_articles(recipe, get_registry())


def test_task_articles_are_the_held_out_split(articles):
    from adaptive.registry import ComponentSpec

    source = get_registry().build("dataset", ComponentSpec(name="wiki_offline"), validation_fraction=0.05)
    held, trained = set(source.documents("validation")), set(source.documents("train"))
    assert len(articles) == len(held) and all(a.extract in held and a.extract not in trained for a in articles)


def test_lambada_items_end_a_passage_with_its_last_word(articles):
    items = build_task("lambada", articles)
    assert len(items) > 400 and items == build_task("lambada", articles)  # deterministic
    extracts = [a.extract for a in articles]
    for item in items:
        right = item.choices[item.answer]
        assert len(item.choices) == CHOICES and len({c.lower() for c in item.choices}) == CHOICES
        assert right.startswith(" ") and right[1:].isalpha()
        assert any(e.startswith(item.context + right) for e in extracts)
        assert all(c[1:] in item.context for c in item.choices if c != right)  # distractors from the passage
    assert build_task("lambada", articles, seed=1) != items and len(build_task("lambada", articles, limit=7)) == 7


def test_description_items_pair_a_title_with_its_description(articles):
    items = build_task("description", articles, limit=50)
    by_title = {f"{a.title}:": a.description for a in articles}
    others = {a.description for a in articles}
    for item in items:
        assert item.choices[item.answer] == f" {by_title[item.context]}"
        assert len({c.lower() for c in item.choices}) == CHOICES and all(c[1:] in others for c in item.choices)
    assert len({item.answer for item in items}) == CHOICES  # the right answer is not always in one place


def test_unknown_task_is_a_value_error(articles):
    with pytest.raises(ValueError, match="unknown task 'hellaswag' \\(valid: lambada, description\\)"):
        build_task("hellaswag", articles)


def test_accuracy_and_length_normalised_accuracy(monkeypatch):
    from adaptive.eval.scoring import Score

    items = [Item("c", (" a", " bbbbbbbb", " cc", " d"), 1), Item("c", (" a", " b", " c", " d"), 0)]
    lps = [-2.0, -4.0, -3.0, -9.0, -1.0, -1.5, -2.0, -0.5]  # item 1: raw picks 0, per char picks 1; item 2: picks 3
    monkeypatch.setattr(task_module, "loglikelihood",
                        lambda *a, **k: [Score(lp, i == 1, 1) for i, lp in enumerate(lps)])
    got = score_task(None, None, items, max_len=8)
    assert got == {"items": 2, "chance": 0.25, "acc": 0.0, "acc_norm": 0.5, "greedy_acc": 0.5}


# ------------------------------------------------------------------------------------------ the command


def test_eval_json_has_loss_tasks_and_routing(run_dir, capsys):
    code, out, err = run_main(capsys, "eval", str(run_dir), "--json", "--items", "6", "--rows", "8")
    assert code == 0, err
    result = json.loads(out)
    assert {"val_loss", "val_ppl", "tasks", "routing", "params", "checkpoint"} <= set(result)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert set(result["tasks"]) == {"lambada", "description"}
    assert all(t["items"] == 6 and 0 <= t["acc"] <= 1 and 0 <= t["acc_norm"] <= 1 for t in result["tasks"].values())
    routing = result["routing"]
    assert routing["num_steps"] == 3 and len(routing["selected_frac"]) == 3 and routing["selected_frac"][0] == 1.0
    assert len(routing["sampling_acc"]) == 3 and 0 <= routing["sampling_acc_routed"] <= 1
    assert sum(routing["depth_hist"]) == pytest.approx(1.0, abs=1e-3)


def test_eval_on_a_file_and_on_a_checkpoint_compares_runs_in_one_table(run_dir, tmp_path, capsys):
    text = tmp_path / "notes.jsonl"
    text.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 4}) + "\n" for i in range(6)))
    checkpoint = next((run_dir / "checkpoints").iterdir())
    code, out, err = run_main(capsys, "eval", str(run_dir), str(checkpoint), "--data", str(text), "--tasks", "none",
                              "--json")
    assert code == 0, err
    first, second = json.loads(out)
    assert first["val_loss"] == second["val_loss"] and first["tasks"] == {} and str(text) in first["data"]
    code, out, _ = run_main(capsys, "eval", str(run_dir), str(checkpoint), "--data", str(text), "--tasks", "none")
    assert code == 0 and "val loss" in out and out.count("eval-tiny: ") == 2 and out.count("routing: mean depth") == 2


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/file.txt"], "error: --data: /no/such/file.txt does not exist"),
    (["--tasks", "lambada,hellaswag"], "error: --tasks: unknown task(s) hellaswag (valid: lambada, description)"),
    (["--device", "gpu"], "error: --device 'gpu' is not a device (valid: auto, cpu, cuda, cuda:N)"),
])
def test_eval_bad_input_is_a_one_line_error(run_dir, capsys, argv, message):
    code, out, err = run_main(capsys, "eval", str(run_dir), *argv)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run_main(capsys, "eval", str(tmp_path))
    assert code == 2 and "neither a run directory" in err

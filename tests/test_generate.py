"""Generation on the serving engine: sampling settings, stops, streaming, aborts, KV accounting, the one
host sync per iteration, and the ``adaptive generate`` / ``adaptive bench`` commands on a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive import recipe as recipes
from adaptive.plugins import get_registry
from adaptive.serving import LLM, EngineConfig, SamplingParams, ServingEngine, generate
from adaptive.testing import as_model, micro_config
from adaptive.testing.serving import decode_alone
from adaptive.train.loop import train
from test_cli import run_main

MOR = {"sharing": "middle_cycle", "router": "expert_choice", "kv_policy": "recursion_wise"}
RUN_RECIPE = """\
name: gen-test
seed: 2
model: {preset: micro, num_recursions: 3, sharing: {name: middle_cycle}, router: {name: expert_choice},
        kv_policy: {name: recursion_wise}}
data: {source: {name: pydoc_topics}, seq_len: 32}
tokenizer: {vocab_size: 300}
train: {steps: 3, batch_size: 4, log_every: 1, eval_every: 3, eval_batches: 1, checkpoint_every: 3, progress_bar: false}
"""


def mor_model(seed: int = 0, num_recursions: int = 3, **parts):
    return as_model(micro_config({**MOR, **parts}, num_recursions=num_recursions), seed=seed,
                    capacities=[0.9, 0.6, 0.3][:num_recursions])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTIVE_CACHE", str(root / "cache"))
        (root / "recipe.yaml").write_text(RUN_RECIPE)
        recipe = recipes.load(root / "recipe.yaml", [f"train.out_dir={root / 'run'}"], get_registry())
        train(recipe, get_registry())
    return root / "run"


# ---------------------------------------------------------------------------------------------- sampling


def test_temperature_zero_is_greedy_and_equals_decoding_alone():
    model = mor_model()
    prompts = [[5, 9, 2, 7], [11, 3]]
    got = generate(model, prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [c.tokens for c in got] == [decode_alone(model, p, 6).tokens for p in prompts]


def test_seeded_sampling_depends_on_the_seed_alone():
    model = mor_model()
    params = SamplingParams(max_tokens=8, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    alone = generate(model, [[1, 2, 3]], params)[0].tokens
    crowded = generate(model, [[9, 9], [1, 2, 3], [4]], [SamplingParams(max_tokens=5, seed=1), params,
                                                         SamplingParams(max_tokens=3, seed=2)])[1].tokens
    assert alone == crowded
    other = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=8, temperature=1.5, top_k=20, top_p=0.9, seed=8))
    assert other[0].tokens != alone


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    model = mor_model()
    greedy = generate(model, [[3, 1, 4]], SamplingParams(max_tokens=6, temperature=0))[0].tokens
    for params in (SamplingParams(max_tokens=6, temperature=2.0, top_k=1, seed=0),
                   SamplingParams(max_tokens=6, temperature=2.0, top_p=1e-6, seed=0)):
        assert generate(model, [[3, 1, 4]], params)[0].tokens == greedy


def test_sampling_follows_the_softmax():
    """Draws over many seeds match softmax(logits / T) within the top-k (a chi-square-sized tolerance)."""
    from adaptive.serving.sampling import SamplingBatch, sample

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], dtype=torch.float64).repeat(4000, 1)
    params = [SamplingParams(temperature=0.7, top_k=4)] * 4000
    drawn = sample(logits, SamplingBatch(params, list(range(4000)), [0] * 4000, torch.device("cpu")))
    counts = torch.bincount(drawn, minlength=6).double()
    want = torch.softmax(logits[0, :4] / 0.7, -1) * 4000
    assert counts[4:].sum() == 0
    assert ((counts[:4] - want).abs() < 4 * want.sqrt() + 5).all(), (counts, want)


def test_bad_sampling_settings_are_refused_with_the_field():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    engine = ServingEngine(mor_model(), EngineConfig(max_len=32))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request([1] * 30, SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="stop"):
        engine.add_request([1], SamplingParams(max_tokens=4, stop=("x",)))  # stop strings need a tokenizer


# ---------------------------------------------------------------------------------------------- stops, streams


def test_stop_token_ids_end_the_request_without_the_token():
    model = mor_model()
    full = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0))[0]
    stop = full.tokens[3]
    cut = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(stop,)))[0]
    assert cut.tokens == full.tokens[: full.tokens.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop) and full.finish_reason == "length"


def test_the_end_of_text_token_stops_unless_ignored():
    model = mor_model()
    first = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0))[0].tokens[2]
    engine = ServingEngine(model, eos_id=first)
    assert engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0))[0].finish_reason == "stop"
    kept = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(kept.tokens) == 8


def test_streaming_yields_every_token_in_order_with_its_depth():
    model = mor_model()
    engine = ServingEngine(model)
    seen: dict[str, list[int]] = {}
    callbacks = []
    ids = [engine.add_request(p, SamplingParams(max_tokens=5, temperature=0), on_token=callbacks.append)
           for p in ([1, 2], [3, 4, 5])]
    for event in engine.run():
        seen.setdefault(event.request_id, []).append(event.token)
    assert [e.request_id for e in callbacks] and len(callbacks) == 10
    for i in ids:
        done = engine.completions[i]
        assert seen[i] == done.tokens and len(done.depths) == len(done.tokens) == 5


def test_abort_frees_the_requests_blocks():
    engine = ServingEngine(mor_model(), EngineConfig(block_size=2))
    a = engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=20))
    engine.add_request([5, 6], SamplingParams(max_tokens=3))
    for _ in range(3):
        engine.step()
    held = engine.blocks.blocks_in_use
    engine.abort(a)
    assert engine.completions[a].finish_reason == "abort" and engine.blocks.blocks_in_use < held
    for _ in engine.run():
        pass
    assert engine.blocks.blocks_in_use == 0 and not engine.has_unfinished()


def test_a_stop_string_cuts_the_text(trained_run):
    llm = LLM.from_run(trained_run, device="cpu")
    full = llm.generate(["The"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert full.text and len(full.text) > 3
    stop = full.text[2:4]
    cut = llm.generate(["The"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]


# ---------------------------------------------------------------------------------------------- memory, syncs


@pytest.mark.parametrize("policy", ["recursion_wise", "recursive_sharing", "hybrid", "full"])
def test_each_slot_holds_exactly_what_its_policy_writes(policy, monkeypatch):
    """When a request completes, each of its (step, layer) slots holds the entries that decoding it alone
    with the model's own cache writes there: recursion-wise, one per token that reached the step (so the
    recursion block holds the routed fraction of full's entries); recursive sharing, step 0's only."""
    model = mor_model(kv_policy=policy)
    engine = ServingEngine(model, EngineConfig(block_size=4, max_batch=2, max_tokens_per_iteration=5))
    snapshots = {}
    finish = engine.scheduler.finish

    def snapshot(q):
        snapshots[q.id] = (engine.blocks.lengths[q.row].copy(), engine.blocks.held[q.row].copy())
        finish(q)

    monkeypatch.setattr(engine.scheduler, "finish", snapshot)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14]]
    ids = [engine.add_request(p, SamplingParams(max_tokens=9, temperature=0)) for p in prompts]
    for _ in engine.run():
        pass
    steps = model.engine.step_layers
    for i, prompt in zip(ids, prompts):
        tokens = prompt + engine.completions[i].tokens[:-1]  # every column whose keys/values were stored
        cache = model.new_cache(1, len(tokens))
        with torch.no_grad():
            depth = model(torch.tensor([tokens]), cache=cache).stats.depth_BT[0]
        lengths, held = snapshots[i]
        for slot in range(model.plan.num_logical):
            assert lengths[slot] == int(cache.entries_written([slot])), (policy, slot)
            assert held[slot] == -(-lengths[slot] // 4)  # no block beyond the entries
        block = [s for layers in steps for s in layers]
        stored = int(lengths[block].sum())
        if policy == "recursion_wise":
            assert stored == len(steps[0]) * int(depth.sum())  # routed fraction: sum of depths / (N_r T)
        elif policy == "recursive_sharing":
            assert stored == len(steps[0]) * len(tokens)  # 1/N_r of full's N_r * T
    assert engine.blocks.blocks_in_use == 0


def test_one_host_sync_per_iteration(monkeypatch):
    engine = ServingEngine(mor_model(), EngineConfig(block_size=2, max_tokens_per_iteration=4))
    for p in ([1, 2, 3, 4, 5, 6], [7, 8], [9]):
        engine.add_request(p, SamplingParams(max_tokens=6, temperature=0.8, top_k=5))
    syncs = []
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            syncs.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    iterations = 0
    while engine.has_unfinished():
        before = len(syncs)
        engine.step()
        iterations += 1
        assert len(syncs) - before <= 1, syncs[before:]
    assert iterations > 5


# ---------------------------------------------------------------------------------------------- the commands


def test_generate_cli_greedy_with_temperature_zero_and_aligned_depths(trained_run, capsys):
    code, out, err = run_main(capsys, "generate", str(trained_run), "--prompt", "The", "--max-new-tokens", "6",
                             "--temperature", "0", "--show-depth", "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    tokens = json.loads(next(line for line in lines if line.startswith("tokens: "))[len("tokens: "):])
    depths = json.loads(next(line for line in lines if line.startswith("depths: "))[len("depths: "):])
    assert len(depths) == len(tokens) >= 1 and all(0 <= d <= 3 for d in depths)
    assert "tokens/s" in err


def test_generate_cli_refuses_a_missing_device(trained_run, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, err = run_main(capsys, "generate", str(trained_run), "--prompt", "x", "--device", "cuda")
    assert code == 2 and "--device" in err


def test_bench_json_reports_both_sides(trained_run, capsys):
    code, out, err = run_main(capsys, "bench", str(trained_run), "--num-prompts", "3", "--prompt-len", "4:8",
                             "--max-new-tokens", "3:5", "--repeats", "2", "--batch", "2", "--json", "--device", "cpu")
    assert code == 0, err
    report = json.loads(out)
    for key in ("tokens_per_s", "baseline_tokens_per_s", "speedup", "flop_bound_speedup", "kv_bytes",
                "baseline_kv_bytes", "ttft_p50_s", "itl_p50_s", "mean_depth"):
        assert key in report and np.isfinite(report[key]), key
    assert report["baseline"]["mean_depth"] == 0 and 0 <= report["mean_depth"] <= 3
    assert report["flop_bound_speedup"] > 1  # expert-choice routing skips work vanilla does


def test_fused_projections_are_made_for_serving_only():
    """Serving fuses Q/K/V and gate/up over concatenated weights; other forwards hold no such copy."""
    model = mor_model()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert not any("_fused" in m.__dict__ for m in model.modules())
    generate(model, [[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))
    fused = [m for m in model.modules() if "_fused" in m.__dict__]
    assert len(fused) == 2 * len(model.engine.layers)  # every layer's attention and FFN

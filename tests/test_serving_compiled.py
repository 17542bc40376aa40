"""The compiled decode graphs (``EngineConfig.compile``) give every request what decoding it alone gives
(greedy, float64, CPU), for each KV policy, router and the vanilla model, with preemption; hypothesis draws
the models, prompts, arrivals and limits, and whether calls are padded to buckets (as on CUDA; the CPU
default is unpadded). Most cases trace with ``aot_eager`` (dynamo and functionalization,
no code generation, so the suite stays fast); one runs inductor's generated code. Each case also checks
that its decode calls did run through a graph, so a silent fall-back to eager cannot pass.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run_main
from test_generate import trained_run  # noqa: F401 (a fixture)
from torch._dynamo.utils import counters

from adaptive.serving import EngineConfig, compiled
from adaptive.testing import as_model, micro_config
from adaptive.testing.serving import Schedule, check_serving_consistency
from adaptive.testing.strategies import serving_inputs

MOR = {"sharing": "middle_cycle", "router": "expert_choice", "kv_policy": "recursion_wise"}


@pytest.fixture
def graph_calls(monkeypatch):
    """Counts the calls that ran through a compiled graph (with ``aot_eager`` unless a test sets inductor)."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    monkeypatch.setattr(compiled, "PAD_ON_CPU", True)  # rows and blocks padded to buckets, as on CUDA
    monkeypatch.setattr(compiled, "_COMPILED", {})
    calls = []
    real = compiled.compiled_call

    def counting(mode):
        graph = real(mode)

        def run(*args):
            traced = counters["stats"]["unique_graphs"]
            out = graph(*args)
            calls.append(counters["stats"]["unique_graphs"] - traced)  # > 0: this call traced a new graph
            return out
        return run

    monkeypatch.setattr(compiled, "compiled_call", counting)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def compiled_schedule(schedule: Schedule) -> Schedule:
    return dataclasses.replace(schedule, compile=True, paged_attention="gather")


@pytest.mark.parametrize("parts", [
    pytest.param({"sharing": "middle_cycle", "router": "expert_choice", "kv_policy": p}, id=f"expert_choice-{p}")
    for p in ("full", "recursion_wise", "recursive_sharing", "hybrid")
] + [pytest.param({"sharing": "cycle", "router": "token_choice", "kv_policy": "recursion_wise"}, id="token_choice"),
     pytest.param({"sharing": "none", "router": "all", "kv_policy": "full"}, id="vanilla"),
     pytest.param({**MOR, "ffn": "moe"}, id="moe")])
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_compiled_decode_graphs_equal_decoding_alone(parts, data, graph_calls):
    torch._dynamo.reset()  # every example is a new model: its graphs, not dynamo's limit of cached ones
    compiled.PAD_ON_CPU = data.draw(st.booleans(), label="padded to buckets")  # the fixture restores it
    inputs = data.draw(serving_inputs(parts, max_recursions=3))
    kwargs = inputs.serving()
    kwargs["max_tokens"] = max(kwargs["max_tokens"], 3)  # decode calls after the eager warm-up of each set of layers
    kwargs["schedule"] = compiled_schedule(kwargs["schedule"])
    before = len(graph_calls)
    check_serving_consistency(inputs.config, **kwargs)
    assert sum(graph_calls[before:]) > 0, "no decode call ran through a compiled graph"


def test_compiled_decode_graphs_with_preemption_equal_decoding_alone(graph_calls):
    prompts = [[5, 9, 2, 7, 1, 3], [11, 3], [8] * 13, [4, 4, 6]]
    tight = Schedule(arrivals=[0, 1, 1, 3], max_batch=3, max_tokens_per_iteration=6, block_size=2,
                     num_blocks=-(-(13 + 8) // 2) * 5, compile=True, paged_attention="gather")
    check_serving_consistency(micro_config(MOR, num_recursions=3), prompts=prompts, max_tokens=8, schedule=tight,
                              seed=1, capacities=[0.9, 0.6, 0.3])
    assert sum(graph_calls) > 0


def test_inductor_generated_code_equals_decoding_alone(graph_calls, monkeypatch):
    """The default backend and CPU path: inductor's generated C++ (writes into the pool in place), unpadded."""
    monkeypatch.setattr(compiled, "BACKEND", "inductor")
    monkeypatch.setattr(compiled, "PAD_ON_CPU", False)
    schedule = Schedule(arrivals=[0, 0, 1], max_batch=3, max_tokens_per_iteration=8, block_size=4, compile=True,
                        paged_attention="gather")
    check_serving_consistency(micro_config(MOR, num_recursions=3), prompts=[[3, 1, 4, 1, 5], [9, 2], [6] * 7],
                              max_tokens=6, schedule=schedule, seed=3, capacities=[0.9, 0.6, 0.3])
    assert sum(graph_calls) > 0


def test_padding_rows_that_write_into_a_real_block_are_caught(graph_calls, monkeypatch):
    """The check can fail: padded rows (3 rows padded to a bucket of 4) that write into the first entry of
    the first block row 0 reads, instead of the trash block."""
    real_pad, block_size, read = compiled._pad, 2, {}

    def pad(t, n, value, dim=0):  # run() pads the read table first, then the hidden states, then the entries
        if t.dim() == 4:
            read["block"] = int(t[0, 0, 0, 0])
        elif t.dtype == torch.long and t.dim() == 2:  # flat_RJ: the entries written
            value = read["block"] * block_size
        return real_pad(t, n, value, dim)

    monkeypatch.setattr(compiled, "_pad", pad)
    schedule = Schedule(arrivals=[0, 0, 0], max_batch=4, block_size=block_size, compile=True, paged_attention="gather")
    with pytest.raises(AssertionError, match="serving consistency"):
        check_serving_consistency(micro_config(MOR, num_recursions=2), prompts=[[3, 1, 4], [1, 5, 9, 2], [6, 5]],
                                  max_tokens=6, schedule=schedule, seed=2)
    assert sum(graph_calls) > 0


def test_a_graph_that_cannot_be_built_warns_and_runs_eagerly(graph_calls, monkeypatch):
    def broken(mode):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(compiled, "compiled_call", broken)
    schedule = Schedule(arrivals=[0, 0], max_batch=2, compile=True, paged_attention="gather")
    with pytest.warns(RuntimeWarning, match="EngineConfig.compile.*no C.. compiler"):
        check_serving_consistency(micro_config(MOR, num_recursions=2), prompts=[[3, 1, 4], [1, 5]], max_tokens=5,
                                  schedule=schedule)


def test_row_buckets_are_powers_of_two_then_the_batch():
    assert compiled.row_buckets(1) == [1]
    assert compiled.row_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert compiled.row_buckets(24) == [1, 2, 4, 8, 16, 24]


def test_compile_with_flex_attention_is_refused():
    with pytest.raises(ValueError, match="compile.*paged_attention"):
        EngineConfig(compile=True, paged_attention="flex")
    assert EngineConfig(compile=True).attention_path(torch.device("cpu")) == "gather"


def test_bench_refuses_compile_with_flex(trained_run, capsys):  # noqa: F811 (the fixture)
    code, _, err = run_main(capsys, "bench", str(trained_run), "--compile", "--paged-attention", "flex")
    assert code != 0 and "--compile" in err and "--paged-attention" in err


def test_bench_compile_reports_it(trained_run, capsys, graph_calls):  # noqa: F811 (the fixture)
    code, out, err = run_main(capsys, "bench", str(trained_run), "--num-prompts", "3", "--prompt-len", "4:8",
                              "--max-new-tokens", "3:5", "--repeats", "1", "--batch", "2", "--json", "--device", "cpu",
                              "--compile")
    assert code == 0, err
    assert json.loads(out)["workload"]["compile"] is True
    assert sum(graph_calls) > 0


def test_other_compiled_forwards_keep_separate_projections():
    """Only the serving engine's graphs use fused weights; a model compiled elsewhere (training's
    ``train.compile``, say) neither makes nor reads the fused copies."""
    model = as_model(micro_config(MOR, num_recursions=2), seed=0).eval()
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = model(x).logits_BTV
        got = torch.compile(model, backend="aot_eager")(x).logits_BTV
    torch.testing.assert_close(got, want)
    assert not any("_fused" in m.__dict__ for m in model.modules())

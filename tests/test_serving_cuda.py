"""The serving engine's GPU paths give every request what decoding it alone gives, on the GPU: the gather
path and the compiled decode graphs (CUDA graphs, rows padded to buckets) in float64, and FlexAttention
over the pool, compiled, in float32 (its Triton kernel accumulates in float32, so float64 tolerances do
not apply to it). The CPU suite checks the same code eagerly; these need a CUDA device and skip without
one. ``benchmarks/gpu_checks.sh`` runs them on a lent GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adaptive.serving import compiled, paged_flex
from adaptive.testing import micro_config
from adaptive.testing.serving import Schedule, check_serving_consistency

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: the compiled FlexAttention kernel and CUDA graphs")

POLICIES = ("full", "recursion_wise", "recursive_sharing", "hybrid")
PROMPTS = [[5, 9, 2, 7, 1, 3], [11, 3], [8] * 13, [4, 4, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
BUSY = Schedule(arrivals=[0, 1, 1, 3, 4], max_batch=3, max_tokens_per_iteration=6, block_size=2,
                paged_attention="gather")


def mor(kv_policy: str, router: str = "expert_choice"):
    return micro_config({"sharing": "middle_cycle", "router": router, "kv_policy": kv_policy}, num_recursions=3)


@pytest.mark.parametrize("kv_policy", POLICIES)
def test_gather_path_on_the_gpu_equals_decoding_alone(kv_policy):
    check_serving_consistency(mor(kv_policy), prompts=PROMPTS, max_tokens=8, schedule=BUSY, seed=1,
                              capacities=[0.9, 0.6, 0.3], device="cuda")


@pytest.mark.parametrize("kv_policy", POLICIES)
def test_cuda_graph_decode_calls_equal_decoding_alone(kv_policy, monkeypatch):
    modes, runs = [], []
    real = compiled.compiled_call

    def counting(mode):
        modes.append(mode)
        graph = real(mode)

        def run(*args):
            runs.append(args[1])
            return graph(*args)
        return run

    def refuse(self, exc):  # a graph that cannot be built fails the test instead of running eagerly
        raise exc

    monkeypatch.setattr(compiled, "compiled_call", counting)
    monkeypatch.setattr(compiled.DecodeGraphs, "give_up", refuse)
    torch._dynamo.reset()
    check_serving_consistency(mor(kv_policy), prompts=PROMPTS, max_tokens=8,
                              schedule=dataclasses.replace(BUSY, compile=True), seed=1, capacities=[0.9, 0.6, 0.3],
                              device="cuda")
    assert modes == ["reduce-overhead"] and runs, "no decode call ran through a CUDA graph"


@pytest.mark.parametrize("router, kv_policy", [("expert_choice", p) for p in POLICIES]
                         + [("token_choice", "recursion_wise")])
def test_compiled_flex_attention_equals_decoding_alone(router, kv_policy):
    assert paged_flex.flex_available(torch.device("cuda")), "FlexAttention is not available on this GPU"
    check_serving_consistency(mor(kv_policy, router), prompts=PROMPTS, max_tokens=8,
                              schedule=dataclasses.replace(BUSY, paged_attention="flex"), seed=1,
                              capacities=[0.9, 0.6, 0.3], device="cuda", dtype=torch.float32, atol=1e-4, rtol=1e-4)

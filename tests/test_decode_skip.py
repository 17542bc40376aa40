"""Early-exited tokens really skip the deeper recursion steps when decoding (block calls are counted)."""

import pytest
import torch

from adaptive.serving import SamplingParams, generate
from adaptive.testing.serving import decode_alone
from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry

NUM_STEPS = 3
# below 1 at every step: with capacity 1 the inference rule keeps every token, as top-k does
EXPERT = {"name": "expert_choice", "capacities": [0.9, 0.6, 0.3]}


def mor_model(router: dict, kv_policy: str):
    cfg = ModelConfig(preset="micro", num_layers=5, num_recursions=NUM_STEPS, sharing={"name": "middle_cycle"},
                      router=router, kv_policy={"name": kv_policy})
    torch.manual_seed(0)
    model = build_model(cfg, get_registry()).double().eval()
    heads = model.router.heads
    with torch.no_grad():  # step s keeps a token iff its first hidden feature has the sign of step s's bias:
        for step, head in enumerate(heads):  # a spread of depths, decided per token, causally
            head.weight.zero_()
            head.weight[0, 0] = 40.0
            head.bias.fill_(-0.6 * step)
    return model


def count_shared_tokens(model):
    """Tokens seen by the shared block's FFN, per call (the block runs only on gathered tokens)."""
    shared = {p for step in model.plan.steps for p in step}
    seen = []
    for physical in shared:
        model.engine.layers[physical].ffn.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("kv_policy", ["recursion_wise", "recursive_sharing"])
def test_decoding_runs_the_shared_block_only_for_tokens_that_continue(kv_policy):
    model = mor_model(EXPERT, kv_policy)
    seen = count_shared_tokens(model)
    per_step = len(model.plan.steps[0])
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(1, 40)
    depths = []
    with torch.no_grad():
        for t in range(40):
            before = len(seen)
            depth = int(model(tokens[:, t:t + 1], cache=cache).stats.depth_BT[0, 0])
            calls = seen[before:]
            assert calls == [1] * (depth * per_step), f"token {t}: depth {depth} but block calls {calls}"
            depths.append(depth)
    assert len(set(depths)) == NUM_STEPS + 1, "the fixture must produce every depth 0..N_r"


def test_generate_reports_the_depth_behind_each_generated_token():
    model = mor_model(EXPERT, "recursion_wise")
    result = generate(model, [[3, 17, 8, 42]], SamplingParams(max_tokens=6, temperature=0))[0]
    assert len(result.depths) == len(result.tokens) == 6
    assert result.depths == decode_alone(model, [3, 17, 8, 42], 6).depths


def test_a_batch_gathers_only_the_rows_that_continue():
    model = mor_model(EXPERT, "recursion_wise")
    seen = count_shared_tokens(model)
    cache = model.new_cache(4, 8)
    tokens = torch.tensor([[3], [17], [8], [42]])
    with torch.no_grad():
        out = model(tokens, cache=cache)
    per_step = len(model.plan.steps[0])
    reached = [int(sel.sum()) for sel in out.stats.selected_per_step]
    expected = [n for n in reached if n > 0 for _ in range(per_step)]
    assert seen == expected and len(set(reached)) > 1


def test_with_gradients_an_empty_step_still_runs_so_every_process_calls_the_same_modules():
    model = mor_model(EXPERT, "recursion_wise")
    seen = count_shared_tokens(model)
    with torch.no_grad():
        model.router.heads[0].bias.fill_(1e3)  # every token runs the first step
        for head in model.router.heads[1:]:
            head.bias.fill_(-1e3)  # and none continues past it
    model(torch.tensor([[3, 17, 8, 42]]), training_rule=False).logits_BTV.sum().backward()
    assert seen == [4, 0, 0]
    assert all(head.weight.grad is not None for head in model.router.heads)

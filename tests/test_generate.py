"""Cached generation equals recomputing the full forward at every step."""

import pytest
import torch

from adaptive.serving.generate import SamplingConfig, generate, left_pad
from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry


def micro_model(**overrides):
    cfg = ModelConfig(preset="micro", num_layers=5, **overrides)
    torch.manual_seed(0)
    return build_model(cfg, get_registry()).double().eval()


def greedy_by_full_forward(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits_BTV
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("overrides", [{}, {"num_recursions": 3, "sharing": {"name": "middle_cycle"}}])
def test_greedy_generation_matches_full_forward(overrides):
    model = micro_model(**overrides)
    prompts = [[5, 9, 2, 7], [11, 3]]
    got = generate(model, prompts, SamplingConfig(max_new_tokens=6, greedy=True))
    for prompt, tokens in zip(prompts, got.tokens):
        assert tokens == greedy_by_full_forward(model, prompt, 6)


def test_left_padding_positions_restart_after_pads():
    tokens, valid, positions = left_pad([[1, 2, 3], [4]], pad_id=0, device=torch.device("cpu"))
    assert tokens.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert positions[1, 2].item() == 0 and positions[0].tolist() == [0, 1, 2]


def test_sampling_is_reproducible_with_a_seed_and_stops_at_eos():
    model = micro_model()
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=20, seed=3)
    first = generate(model, [[1, 2, 3]], cfg).tokens
    assert first == generate(model, [[1, 2, 3]], cfg).tokens
    eos = first[0][2]
    cut = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=20, seed=3, eos_id=eos)).tokens
    assert cut[0] == first[0][: first[0].index(eos) + 1]


def test_bad_sampling_settings_are_rejected():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)

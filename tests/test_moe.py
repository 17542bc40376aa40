"""The ``moe`` FFN: dispatch against a per-expert loop, routing and gates, balance losses and their
normalisation, the loss-free bias (selection only, float32, all-reduced, checkpointed and resumed bit for
bit), the engine's valid mask and counts, the accountant, and the property checks on the MoE recipes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from adaptive import recipe as recipes
from adaptive.errors import RecipeError
from adaptive.flops import count_flops
from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry
from adaptive.testing import check_all, combinations
from adaptive.train import checkpoint as ckpt
from adaptive.train.loop import Trainer, train
from adaptive_moe.dispatch import ExpertWeights, expert_outputs, loop_expert_outputs
from adaptive_moe.moe import LOAD_COUNT, MoE, MoEConfig

ROOT = Path(__file__).resolve().parents[1]
D, D_FFN = 16, 48


def make_moe(dtype=torch.float64, seed=0, **config) -> MoE:
    torch.manual_seed(seed)
    return MoE(MoEConfig(**config), d_model=D, d_ffn=D_FFN).to(dtype)


def reference_output(moe: MoE, x_ND: torch.Tensor) -> torch.Tensor:
    """The MoE written out plainly: top-k of the (biased) scores, renormalised gates, an expert loop."""
    logits_NE = x_ND @ moe.router.weight.T
    scores_NE = torch.softmax(logits_NE, -1) if moe.config.score == "softmax" else torch.sigmoid(logits_NE)
    bias_E = getattr(moe, "balance_bias", torch.zeros(moe.config.num_experts)).to(scores_NE.dtype)
    expert_NK = torch.topk(scores_NE + bias_E, moe.config.top_k, dim=-1).indices
    gate_NK = scores_NE.gather(-1, expert_NK)
    if moe.config.renormalize:
        gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True)
    out_ND = (loop_expert_outputs(x_ND, expert_NK, moe.experts()) * gate_NK[..., None]).sum(1)
    return out_ND + (moe.shared(x_ND) if moe.shared is not None else 0)


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("tokens", [0, 1, 5, 37, 300])
def test_batched_dispatch_equals_the_per_expert_loop(tokens):
    g = torch.Generator().manual_seed(tokens)
    E, K = 6, 2
    weights = ExpertWeights(torch.randn(E, 2 * 8, D, generator=g, dtype=torch.float64),
                            torch.randn(E, D, 8, generator=g, dtype=torch.float64))
    x_ND = torch.randn(tokens, D, generator=g, dtype=torch.float64)
    spread_NK = torch.topk(torch.randn(tokens, E, generator=g), K).indices
    crowded_NK = torch.stack([torch.zeros(tokens, dtype=torch.long), torch.full((tokens,), E - 1)], -1)
    for expert_NK in (spread_NK, crowded_NK):  # even load, and every token on the same two experts
        got = expert_outputs(x_ND, expert_NK, weights, "batched")
        torch.testing.assert_close(got, loop_expert_outputs(x_ND, expert_NK, weights), rtol=1e-12, atol=1e-12)


def test_grouped_mm_path_equals_the_per_expert_loop():
    """The ``torch._grouped_mm`` call (offsets, weight layout) checked where torch runs it on the CPU
    (float32); the model itself uses it only on CUDA GPUs of capability >= 9.0."""
    g = torch.Generator().manual_seed(0)
    weights = ExpertWeights(torch.randn(4, 32, D, generator=g), torch.randn(4, D, 16, generator=g))
    x_ND = torch.randn(50, D, generator=g)
    expert_NK = torch.topk(torch.randn(50, 4, generator=g), 2).indices
    try:
        got = expert_outputs(x_ND, expert_NK, weights, "grouped_mm")
    except (RuntimeError, AttributeError) as exc:
        pytest.skip(f"torch {torch.__version__} has no CPU torch._grouped_mm for float32 ({exc})")
    torch.testing.assert_close(got, loop_expert_outputs(x_ND, expert_NK, weights), rtol=1e-4, atol=1e-4)


def test_the_forward_needs_no_host_sync():
    """On the meta device any ``.item()``, ``.tolist()``, ``nonzero`` or data-dependent shape fails, so a
    meta forward (training mode, padding mask, loss-free bias, shared expert) proves there is none; the
    per-expert loop, which syncs, fails there."""
    with torch.device("meta"):
        moe = MoE(MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, bias_rate=0.01), d_model=D, d_ffn=D_FFN)
        x_ND, valid_N = torch.randn(20, D), torch.ones(20, dtype=torch.bool)
        out = moe.train()(x_ND, valid_N=valid_N)
        assert out.out_BTD.shape == (20, D) and set(out.aux_losses) == {"moe_balance", "moe_z"}
        with pytest.raises((RuntimeError, NotImplementedError)):
            loop_expert_outputs(x_ND, torch.zeros(20, 2, dtype=torch.long), moe.experts())


# ---------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("config", [dict(score="softmax"), dict(score="sigmoid"), dict(score="sigmoid", renormalize=False),
                                    dict(num_shared_experts=1, top_k=1), dict(num_experts=3, top_k=3)])
def test_output_is_the_gated_sum_of_each_tokens_top_k_experts(config):
    moe = make_moe(**config).eval()
    x_ND = torch.randn(40, D, dtype=torch.float64)
    torch.testing.assert_close(moe(x_ND).out_BTD, reference_output(moe, x_ND), rtol=1e-12, atol=1e-12)


def test_no_token_is_dropped_when_every_token_picks_the_same_experts():
    moe = make_moe(num_experts=4, top_k=2).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:2, 0] = 5.0  # with x[:, 0] > 0 every token prefers experts 0 and 1
    x_ND = torch.randn(64, D, dtype=torch.float64)
    x_ND[:, 0] = x_ND[:, 0].abs() + 1
    out_ND = moe(x_ND).out_BTD
    assert out_ND.abs().sum(-1).min() > 0
    torch.testing.assert_close(out_ND, reference_output(moe, x_ND), rtol=1e-12, atol=1e-12)


def test_saturated_sigmoid_scores_still_pick_the_highest_logit():
    """sigmoid(50) and sigmoid(60) are both 1.0 in float64: ranking the scores would tie, the logits do not."""
    moe = make_moe(num_experts=4, top_k=1, score="sigmoid").eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor([60.0, 50.0, 0.0, 0.0], dtype=torch.float64)
    x_ND = torch.zeros(3, D, dtype=torch.float64)
    x_ND[:, 0], x_ND[:, 1:] = 1.0, torch.randn(3, D - 1, dtype=torch.float64)
    expected = loop_expert_outputs(x_ND, torch.zeros(3, 1, dtype=torch.long), moe.experts())[:, 0]
    torch.testing.assert_close(moe(x_ND).out_BTD, expected, rtol=1e-12, atol=1e-12)


def test_the_bias_changes_the_selection_but_not_the_gates():
    moe = make_moe(num_experts=4, top_k=2, bias_rate=0.01).eval()
    x_ND = torch.randn(30, D, dtype=torch.float64)
    with torch.no_grad():
        moe.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 wins every selection
    scores_NE = torch.softmax(x_ND @ moe.router.weight.T, -1)
    torch.testing.assert_close(moe(x_ND).out_BTD, reference_output(moe, x_ND), rtol=1e-12, atol=1e-12)
    expert_NK = torch.topk(scores_NE + moe.balance_bias.double(), 2).indices
    assert (expert_NK == 3).any(-1).all()
    gate_NK = scores_NE.gather(-1, expert_NK)  # the unbiased scores, renormalised
    manual = (loop_expert_outputs(x_ND, expert_NK, moe.experts()) * (gate_NK / gate_NK.sum(-1, keepdim=True))[..., None]).sum(1)
    torch.testing.assert_close(moe(x_ND).out_BTD, manual, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- balance


def test_switch_loss_and_z_loss_follow_the_stated_normalisation_over_real_tokens_only():
    moe = make_moe(num_experts=4, top_k=2, balance_coef=0.5, z_loss_coef=0.25, bias_rate=0.01).train()
    x_ND = torch.randn(24, D, dtype=torch.float64)
    valid_N = torch.arange(24) < 17
    out = moe(x_ND, valid_N=valid_N)
    real_ND = x_ND[valid_N]
    logits_NE = real_ND @ moe.router.weight.T
    probs_NE = torch.softmax(logits_NE, -1)
    chosen_NE = torch.zeros_like(probs_NE).scatter_(-1, torch.topk(probs_NE, 2).indices, 1.0)
    f_E, p_E = chosen_NE.sum(0) / (2 * 17), probs_NE.mean(0)
    torch.testing.assert_close(out.aux_losses["moe_balance"], 0.5 * 4 * (f_E * p_E).sum(), rtol=1e-12, atol=0)
    z = torch.logsumexp(logits_NE, -1).square().mean()
    torch.testing.assert_close(out.aux_losses["moe_z"], 0.25 * z, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.counts[LOAD_COUNT], chosen_NE.sum(0), rtol=0, atol=0)
    assert moe.eval()(x_ND).aux_losses == {}


def test_balanced_routing_gives_the_switch_loss_its_coefficient():
    """``E · Σ f_i P_i`` is 1 when every expert gets the same share (here: 4 tokens, each expert once)."""
    moe = make_moe(num_experts=4, top_k=1, balance_coef=1.0, z_loss_coef=0).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = 30 * torch.eye(4, dtype=torch.float64)
    out = moe(torch.eye(4, D, dtype=torch.float64))
    assert abs(float(out.aux_losses["moe_balance"].detach()) - 1.0) < 1e-9


def test_loss_free_bias_update_rule_and_all_reduce(monkeypatch):
    moe = make_moe(num_experts=4, top_k=1, bias_rate=0.125)
    moe.after_optimizer_step({LOAD_COUNT: torch.tensor([1.0, 2.0, 3.0, 6.0])})  # mean 3
    assert moe.balance_bias.tolist() == [0.125, 0.125, 0.0, -0.125]
    other_process = torch.tensor([5.0, 0.0, 0.0, 0.0])  # another process's loads, summed in by the all-reduce
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(other_process))
    moe.after_optimizer_step({LOAD_COUNT: torch.tensor([1.0, 2.0, 3.0, 6.0])})  # global [6, 2, 3, 6], mean 4.25
    assert moe.balance_bias.tolist() == [0.0, 0.25, 0.125, -0.25]


def test_the_bias_stays_float32_under_casts_and_autocast():
    model = build_model(micro_moe_config(bias_rate=0.01), get_registry())
    for dtype in (torch.float64, torch.bfloat16):
        model = model.to(dtype)
        biases = [b for name, b in model.named_buffers() if name.endswith("balance_bias")]
        assert len(biases) == 4 and all(b.dtype == torch.float32 for b in biases)
    model = model.float().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 64, (2, 8)))
    assert torch.isfinite(out.logits_BTV).all()
    assert all(v.dtype == torch.float32 for v in out.stats.ffn_counts.values())


def micro_moe_config(num_recursions: int = 1, **moe) -> ModelConfig:
    sharing = {"name": "middle_cycle"} if num_recursions > 1 else {"name": "none"}
    return ModelConfig(num_layers=num_recursions + 2 if num_recursions > 1 else 4, d_model=32, num_heads=4, num_kv_heads=2, d_ffn=64, vocab_size=64, max_seq_len=64,
                       num_recursions=num_recursions, sharing=sharing,
                       ffn={"name": "moe", "num_experts": 4, "top_k": 2, **moe})


# ---------------------------------------------------------------------------------------------- engine and trainer


def test_engine_passes_the_padding_mask_and_sums_counts_per_physical_layer():
    """MoR-3 with the ``all`` router: the shared block's FFN runs 3 times per token, the prelude's once;
    left padding is excluded from every count."""
    model = build_model(micro_moe_config(num_recursions=3, bias_rate=0.01), get_registry()).double().train()
    valid_BT = torch.arange(10)[None, :] >= torch.tensor([[0], [4]])
    out = model(torch.randint(0, 64, (2, 10)), valid_BT=valid_BT)
    n_real, k = int(valid_BT.sum()), 2
    counts = {key: int(v.sum()) for key, v in out.stats.ffn_counts.items()}
    shared = {p for step in model.plan.steps for p in step}
    assert set(counts) == {f"layer{p}/{LOAD_COUNT}" for p in range(model.plan.num_physical)}
    for p in range(model.plan.num_physical):
        assert counts[f"layer{p}/{LOAD_COUNT}"] == k * n_real * (3 if p in shared else 1)
    assert {"moe_balance", "moe_z"} <= set(out.aux_losses)
    before = [layer.ffn.balance_bias.clone() for layer in model.engine.layers]
    model.engine.ffns_after_optimizer_step(out.stats)
    assert all(not torch.equal(b, layer.ffn.balance_bias) for b, layer in zip(before, model.engine.layers))


def test_gradient_accumulation_sums_the_counts_of_its_micro_batches():
    from adaptive import RoutingStats
    from adaptive.train.loop import merge_stats

    key = f"layer0/{LOAD_COUNT}"
    parts = [RoutingStats(ffn_counts={key: torch.tensor([1.0, 2.0])}), RoutingStats(ffn_counts={key: torch.tensor([3.0, 0.0])})]
    assert merge_stats(parts).ffn_counts[key].tolist() == [4.0, 2.0]


BASE = """\
name: moe-test
seed: 2
model: {preset: micro, num_layers: 4, d_model: 32, d_ffn: 64, num_recursions: 2, sharing: {name: middle_cycle},
        router: {name: expert_choice}, kv_policy: {name: recursion_wise},
        ffn: {name: moe, num_experts: 4, top_k: 2, score: sigmoid, bias_rate: 0.01}}
data: {source: {name: pydoc_topics}, seq_len: 32}
tokenizer: {vocab_size: 300}
train: {steps: 8, batch_size: 4, log_every: 1, eval_every: 8, eval_batches: 1, checkpoint_every: 4, progress_bar: false}
"""


def biases(run: Path) -> dict[str, torch.Tensor]:
    weights = ckpt.load_weights(ckpt.latest_checkpoint(run))
    return {name: t for name, t in weights.items() if name.endswith("balance_bias")}


def test_loss_free_bias_survives_checkpoint_and_resume_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "recipe.yaml").write_text(BASE)
    load = lambda out: recipes.load(tmp_path / "recipe.yaml", [f"train.out_dir={tmp_path / out}"], get_registry())  # noqa: E731
    train(load("reference"), get_registry())
    original = Trainer.train_step

    def interrupt_at_5(self):
        original(self)
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_5)
    assert train(load("run"), get_registry()).step == 5
    at_5 = biases(tmp_path / "run")
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train(load("run"), get_registry(), resume=True).step == 8
    expected, got = biases(tmp_path / "reference"), biases(tmp_path / "run")
    assert set(got) == set(expected) and len(got) == 3  # 1 unique + 1 shared + 1 unique layer
    assert all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in got.values())
    assert any(not torch.equal(at_5[name], got[name]) for name in got)  # it kept moving after the resume
    assert all(torch.equal(expected[name], got[name]) for name in got)  # bit for bit


# ---------------------------------------------------------------------------------------------- recipes, grid, flops


@pytest.mark.parametrize("name", ["moe", "mor_moe"])
def test_every_property_check_passes_on_the_moe_recipes(name):
    """Causality, cache consistency, batch and padding invariance and serving consistency, inference mode."""
    check_all(ROOT / "recipes" / f"{name}.yaml")


def test_the_registry_grid_runs_moe_beside_every_router():
    runnable = {c.names()["router"] for c in combinations(probe=False) if c.names()["ffn"] == "moe" and c.skip is None}
    assert runnable == set(get_registry().names("router"))


def test_flops_count_only_the_active_experts():
    registry = get_registry()
    moe = recipes.load(ROOT / "recipes" / "moe.yaml").model
    vanilla = recipes.load(ROOT / "recipes" / "vanilla.yaml").model
    a, b = count_flops(moe, registry, 128, 2048), count_flops(vanilla, registry, 128, 2048)
    layers, d, experts = 8, 128, 8
    router = layers * d * experts
    assert a.params_active_per_token == b.params_active_per_token + router  # top-2 of 172 wide = vanilla's 344
    assert a.params_unique == b.params_unique + router + layers * (experts - 2) * 3 * d * 172
    assert b.params_active_per_token == b.params_unique
    assert a.flops_per_token_forward == b.flops_per_token_forward + 2 * router


def test_bad_moe_options_name_the_recipe_key():
    with pytest.raises(RecipeError, match=r"model\.ffn.*top_k=9 exceeds num_experts=8"):
        recipes.load(ROOT / "recipes" / "moe.yaml", ["model.ffn.top_k=9"])
    with pytest.raises(RecipeError, match=r"model\.ffn\.score"):
        recipes.load(ROOT / "recipes" / "moe.yaml", ["model.ffn.score=relu"])
    with pytest.raises(ValueError, match="d_ffn=2 is too small"):
        MoE(MoEConfig(top_k=2, num_shared_experts=1), d_model=D, d_ffn=2)
    with pytest.raises(ValueError, match="dispatch='grouped_mm' needs"):
        make_moe(dispatch="grouped_mm")(torch.randn(3, D, dtype=torch.float64))

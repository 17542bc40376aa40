"""The accountant against hand-computed values, and over every registered router and KV policy."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

from adaptive import ComponentConfig, KVPolicy, Router, hookimpl
from adaptive.cli import main
from adaptive.flops import count_flops
from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry, register_plugin, unregister_plugin

# The micro preset: D=64, H=4, G=2, E=16, F=172, V=512; T=128 below.
#   Q and O projections  2·2·64·64          = 16384
#   K and V projections  2·2·64·(2·16)      =  8192
#   SwiGLU               2·3·64·172         = 66048
#   attention, n keys    2·2·64·(n+1)/2     = 128·(n+1)   (n=128: 16512)
#   a full layer                            = 107136
#   LM head              2·64·512           = 65536
#   KV entry             2·2·16 · 2 bytes   = 128 bytes per layer
#   parameters: embedding 512·64 = 32768 (tied), final norm 64,
#   a layer 2·64·64 + 2·64·32 + 3·64·172 + 2·64 (its norms) = 45440
T = 128


class StepCaps(Router):
    """Test router: keeps 1, 1/2, 1/4 of the tokens at steps 0, 1, 2, with one linear scorer per step."""

    name = "test_caps"
    Config = ComponentConfig

    def __init__(self, config, *, d_model, num_steps):
        super().__init__(config, d_model=d_model, num_steps=num_steps)
        self.scorers = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(num_steps))

    def base_capacities(self):
        return [0.5 ** r for r in range(self.num_steps)]

    def route(self, hidden_BTD, ctx):  # never run by the accountant
        raise NotImplementedError


class Selected(KVPolicy):
    name = "test_selected_kv"
    Config = ComponentConfig

    def writes(self, step):
        return "selected"

    def reads(self, step):
        return (step,)


class ShareFirst(KVPolicy):
    name = "test_share_first_kv"
    Config = ComponentConfig

    def writes(self, step):
        return "all" if step == 0 else "none"

    def reads(self, step):
        return (0,)


@pytest.fixture(autouse=True)
def test_parts():
    plugin = types.ModuleType("flops_test_parts")

    @hookimpl
    def register_routers(register):
        register(StepCaps)

    @hookimpl
    def register_kv_policies(register):
        register(Selected)
        register(ShareFirst)

    plugin.register_routers, plugin.register_kv_policies = register_routers, register_kv_policies
    assert register_plugin(plugin, "flops_test_parts").error is None
    yield
    unregister_plugin("flops_test_parts")


def recursive(kv: str, router: str = "test_caps", **extra) -> ModelConfig:
    """micro, middle_cycle with N_r=3: prelude 1 layer, three steps of 1 layer, coda 1 layer."""
    return ModelConfig(preset="micro", num_recursions=3, sharing={"name": "middle_cycle"}, router={"name": router},
                       kv_policy={"name": kv}, **extra)


def test_vanilla_micro_by_hand():
    report = count_flops(ModelConfig(preset="micro"), get_registry(), T)
    assert report.params_unique == 32768 + 64 + 5 * 45440 == 260032
    assert report.flops_per_token_forward == 5 * 107136 + 65536 == 601216
    assert report.flops_per_token_train == 3 * 601216
    assert report.kv_bytes_per_token == 5 * 128
    assert [p.name for p in report.breakdown] == ["layers", "lm_head"]


def test_recursion_wise_by_hand():
    report = count_flops(recursive("test_selected_kv"), get_registry(), T)
    # step r keeps a = 1, 1/2, 1/4; its queries see a·T keys and only its tokens compute K/V
    step0 = 107136
    step1 = 0.5 * (16384 + 66048 + 128 * 65) + 0.5 * 8192  # 49472
    step2 = 0.25 * (16384 + 66048 + 128 * 33) + 0.25 * 8192  # 23712
    assert (step1, step2) == (49472, 23712)
    assert report.flops_per_token_forward == 2 * 107136 + step0 + step1 + step2 + 65536 == 460128
    assert report.kv_bytes_per_token == 128 * (2 + 1 + 0.5 + 0.25) == 480
    router = 3 * (64 + 1)
    assert report.params_unique == 32768 + 64 + 3 * 45440 + router
    steps = {p.name: p for p in report.breakdown}
    assert [steps[f"step {r}"].keys for r in range(3)] == [128, 64, 32]
    assert [steps[f"step {r}"].active_fraction for r in range(3)] == [1, 0.5, 0.25]


def test_full_policy_by_hand():
    report = count_flops(recursive("full"), get_registry(), T)
    # every token computes K/V at every step (exited ones from their frozen state); queries see all T keys
    steps = [c * (16384 + 66048 + 128 * 129) + 8192 for c in (1, 0.5, 0.25)]
    assert steps == [107136, 57664, 32928]
    assert report.flops_per_token_forward == 2 * 107136 + sum(steps) + 65536 == 477536
    assert report.kv_bytes_per_token == 5 * 128


def test_recursive_sharing_by_hand():
    report = count_flops(recursive("test_share_first_kv"), get_registry(), T)
    # later steps compute queries only, against the T keys step 0 stored
    steps = [107136, 0.5 * (16384 + 66048 + 128 * 129), 0.25 * (16384 + 66048 + 128 * 129)]
    assert report.flops_per_token_forward == 2 * 107136 + sum(steps) + 65536 == 461152
    assert report.kv_bytes_per_token == 3 * 128


def test_all_router_with_full_policy_costs_the_unrolled_vanilla_model():
    vanilla = count_flops(ModelConfig(preset="micro"), get_registry(), T)
    rec = count_flops(recursive("full", router="all"), get_registry(), T)
    assert rec.flops_per_token_forward == vanilla.flops_per_token_forward
    assert rec.kv_bytes_per_token == vanilla.kv_bytes_per_token
    assert rec.params_unique == vanilla.params_unique - 2 * 45440


def test_parameters_match_the_built_model_and_bytes_option():
    cfg = recursive("test_selected_kv", tie_embeddings=False)
    report = count_flops(cfg, get_registry(), T, kv_bytes_per_element=4)
    assert report.params_unique == build_model(cfg, get_registry()).num_params()
    assert report.kv_bytes_per_token == 2 * 480


@pytest.mark.parametrize("preset, params", [("smollm-135m", 134_515_008), ("smollm-360m", 361_821_120),
                                             ("smollm-1.7b", 1_711_376_384)])
def test_smollm_presets_have_the_released_parameter_counts(preset, params):
    """The presets reproduce the published SmolLM models exactly (tied embeddings, no biases)."""
    assert count_flops(ModelConfig(preset=preset), get_registry(), 2048).params_unique == params


def test_vocab_must_be_known():
    cfg = ModelConfig(preset="micro", vocab_size=None).model_copy(update={"vocab_size": None})
    with pytest.raises(ValueError, match="vocab_size"):
        count_flops(cfg, get_registry(), T)
    assert count_flops(cfg, get_registry(), T, vocab_size=1000).vocab_size == 1000


def registered(kind):
    from adaptive.plugins import PluginHost

    host = PluginHost()
    host.load_entry_points()
    return host.registry.names(kind)


@pytest.mark.parametrize("router", registered("router"))
@pytest.mark.parametrize("kv", registered("kv_policy"))
def test_every_registered_router_and_policy_is_counted(router, kv):
    """Whatever the parts, routing and caching can only save: at most the cost of the recursive baseline,
    plus the router's own scoring (its ``router`` segment)."""
    base = count_flops(recursive("full", router="all"), get_registry(), T)
    report = count_flops(recursive(kv, router=router), get_registry(), T)
    scoring = sum(part.flops_per_token for part in report.breakdown if part.name == "router")
    assert (scoring == 0) == (router == "all")
    assert 0 < report.flops_per_token_forward - scoring <= base.flops_per_token_forward
    assert 0 < report.kv_bytes_per_token <= base.kv_bytes_per_token
    assert report.params_unique >= base.params_unique
    assert report.flops_per_token_train == 3 * report.flops_per_token_forward


def test_cli_json(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    # the model has the tokenizer's vocabulary (adaptive.vocab): 512, the micro preset's, only when the tokenizer has 512
    recipe.write_text("name: t\nmodel: {preset: micro}\ndata: {seq_len: 64}\ntokenizer: {vocab_size: 512}\n")
    main(["flops", str(recipe), "--json", "--seq-len", str(T)])
    report = json.loads(capsys.readouterr().out)
    assert report["params_unique"] == 260032
    assert report["flops_per_token_forward"] == 601216
    assert report["flops_per_token_train"] == 3 * 601216
    assert report["kv_bytes_per_token"] == 640
    main(["flops", str(recipe), "model.num_recursions=3", "model.sharing.name=middle_cycle", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["seq_len"] == 64 and report["params_unique"] == 260032 - 2 * 45440
    main(["flops", str(recipe)])
    assert "forward FLOPs/token" in capsys.readouterr().out


def test_cli_user_error_exits_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: micro}\n")
    with pytest.raises(SystemExit) as info:
        main(["flops", str(recipe), "model.num_recursions=2"])
    assert info.value.code == 2
    assert "model.num_recursions=1" in capsys.readouterr().err


@pytest.mark.parametrize("kv", ["full", "test_selected_kv", "test_share_first_kv"])
def test_kv_bytes_match_what_the_cache_stores(kv):
    """With every token at every step the accountant's KV bytes equal the entries the cache really holds."""
    cfg = recursive(kv, router="all")
    torch.manual_seed(0)
    model = build_model(cfg, get_registry()).float().eval()
    cache = model.new_cache(2, 16)
    model(torch.randint(0, 512, (2, 16)), cache=cache)
    stored_per_token = int(cache.entries_written()) * cache.bytes_per_entry() / (2 * 16)
    assert stored_per_token == count_flops(cfg, get_registry(), 16, kv_bytes_per_element=4).kv_bytes_per_token


def test_router_scoring_is_counted_per_step():
    """expert_choice scores every token at every step with its step's head: 2·D FLOPs (one logit) each;
    token_choice scores once, at the first step, with N_r logits."""
    D = 64  # micro
    for router, expected in (({"name": "expert_choice"}, 3 * 2 * D), ({"name": "token_choice"}, 2 * D * 3),
                             ({"name": "expert_choice", "head": "mlp"}, 3 * (2 * D * 2 * D + 2 * 2 * D))):
        cfg = ModelConfig(preset="micro", num_layers=5, num_recursions=3, sharing={"name": "middle_cycle"}, router=router)
        report = count_flops(cfg, get_registry(), T)
        assert [p.flops_per_token for p in report.breakdown if p.name == "router"] == [expected]

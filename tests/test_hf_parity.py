"""Our vanilla model equals HF transformers' LlamaForCausalLM on the same weights; ``adaptive convert
hf-llama`` imports a local checkpoint; a recursive model can be initialised from a vanilla one."""

from __future__ import annotations

import json

import pytest
import torch

from adaptive.cli import main
from adaptive.convert import init_recursive_from_vanilla, load_hf_llama, load_pretrained, vanilla_source_layers
from adaptive.errors import CheckpointError
from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry

transformers = pytest.importorskip("transformers")


def hf_checkpoint(path, seed=0, **overrides):
    """A small random LlamaForCausalLM saved with save_pretrained (safetensors); no download."""
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False, initializer_range=0.1)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).float().eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped or missing norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def ours_from(path):
    cfg, state = load_hf_llama(path)
    model = build_model(cfg, get_registry()).float().eval()
    model.load_state_dict(state, strict=True)
    return model


INPUT = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "num_key_value_heads": 1},
    {"num_key_value_heads": 4, "num_hidden_layers": 2},
])
def test_logits_equal_hf_llama(tmp_path, overrides):
    hf = hf_checkpoint(tmp_path, **overrides)
    ours = ours_from(tmp_path)
    cfg = ours.config
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (hf.config.rope_parameters["rope_theta"],
                                                                  hf.config.rms_norm_eps, hf.config.tie_word_embeddings)
    with torch.no_grad():
        expected = hf(INPUT).logits
        got = ours(INPUT).logits_BTV
    assert expected.abs().max() > 0.5, "logits too small to make the comparison meaningful"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_cli_convert_writes_our_format(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "ours"
    hf = hf_checkpoint(src, tie_word_embeddings=True)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(src / "tokenizer.json"))
    main(["convert", "hf-llama", str(src), str(out)])
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "recipe.yaml", "tokenizer.json"}
    model = load_pretrained(out)
    assert model.config.sharing.name == "none" and model.config.num_layers == 3 and model.config.tie_embeddings
    assert model.lm_head.weight is model.embed.weight
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT).logits_BTV, hf(INPUT).logits, atol=1e-5, rtol=0)


def test_sharded_checkpoints_load(tmp_path):
    hf = hf_checkpoint(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    a, b = load_hf_llama(tmp_path / "a")[1], load_hf_llama(tmp_path / "b")[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_configs_name_the_key(tmp_path):
    hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, words in [("attention_bias", True, "attention_bias"), ("hidden_act", "gelu", "hidden_act"),
                              ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "rope_type"),
                              ("model_type", "mistral", "model_type"), ("head_dim", 32, "head_dim")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=words):
            load_hf_llama(tmp_path)


def test_cli_errors_are_clean(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", "hf-llama", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert info.value.code == 2 and "no such directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SystemExit) as info:
        main(["convert", "hf-llama", str(tmp_path), str(tmp_path / "out")])
    assert info.value.code == 2 and "hidden_size: required key is missing" in capsys.readouterr().err
    hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_llama(tmp_path)


# ---------------------------------------------------------------------------------------------- recursive init


def micro(L, **overrides):
    cfg = ModelConfig(num_layers=L, d_model=32, num_heads=4, num_kv_heads=2, d_ffn=48, vocab_size=61, max_seq_len=32, **overrides)
    return build_model(cfg, get_registry()).double().eval()


def layer_weight(model, phys, attr="attn.q_proj"):
    return model.engine.layers[phys].get_submodule(attr).weight


@pytest.mark.parametrize("per_step_norms", [False, True])
def test_init_from_vanilla_average_and_select(per_step_norms):
    torch.manual_seed(0)
    vanilla = micro(8)
    for norms in vanilla.engine.norms:
        norms.attn_norm.weight.data.uniform_(0.5, 1.5)
    state = vanilla.state_dict()
    rec = {m: micro(8, num_recursions=3, sharing={"name": "middle_cycle"}, per_step_norms=per_step_norms)
           for m in ("average", "select")}
    for method, model in rec.items():
        init_recursive_from_vanilla(state, vanilla.plan, model, method=method)
    # middle_cycle, L=8, N_r=3: logical (0 | 1 2 | 3 4 | 5 6 | 7) -> physical (0 | 1 2 | 1 2 | 1 2 | 3)
    avg, sel = rec["average"], rec["select"]
    for attr in ("attn.q_proj", "attn.v_proj", "ffn.down"):
        torch.testing.assert_close(layer_weight(avg, 1, attr), (layer_weight(vanilla, 1, attr) + layer_weight(vanilla, 3, attr)
                                                                + layer_weight(vanilla, 5, attr)) / 3)
        torch.testing.assert_close(layer_weight(avg, 2, attr), (layer_weight(vanilla, 2, attr) + layer_weight(vanilla, 4, attr)
                                                                + layer_weight(vanilla, 6, attr)) / 3)
        # stepwise: the block's 2 physical layers over its 6 depths take vanilla layers 1 and 1 + 6/2 = 4
        assert torch.equal(layer_weight(sel, 1, attr), layer_weight(vanilla, 1, attr))
        assert torch.equal(layer_weight(sel, 2, attr), layer_weight(vanilla, 4, attr))
        for model in (avg, sel):  # the unique ends are copied
            assert torch.equal(layer_weight(model, 0, attr), layer_weight(vanilla, 0, attr))
            assert torch.equal(layer_weight(model, 3, attr), layer_weight(vanilla, 7, attr))
    for model in (avg, sel):
        assert torch.equal(model.embed.weight, vanilla.embed.weight)
        assert torch.equal(model.final_norm.weight, vanilla.final_norm.weight)
        norm = lambda m, i: m.engine.norms[i].attn_norm.weight  # noqa: E731
        if per_step_norms:  # every depth keeps the vanilla norms of its own depth
            assert all(torch.equal(norm(model, l), norm(vanilla, l)) for l in range(8))
    if not per_step_norms:
        torch.testing.assert_close(norm(avg, 1), (norm(vanilla, 1) + norm(vanilla, 3) + norm(vanilla, 5)) / 3)
        assert torch.equal(norm(sel, 2), norm(vanilla, 4))


def test_select_is_stepwise_for_cycle_and_sequence():
    registry = get_registry()
    from adaptive.registry import ComponentSpec

    vanilla = registry.build("sharing_scheme", ComponentSpec(name="none")).plan(9, 1)
    cycle = registry.build("sharing_scheme", ComponentSpec(name="cycle")).plan(9, 3)
    sequence = registry.build("sharing_scheme", ComponentSpec(name="sequence")).plan(9, 3)
    assert vanilla_source_layers(vanilla, cycle, "select") == {0: [0], 1: [3], 2: [6]}  # every N_r-th layer
    assert vanilla_source_layers(vanilla, sequence, "select") == {0: [0], 1: [3], 2: [6]}  # first of each group
    assert vanilla_source_layers(vanilla, cycle, "average") == {0: [0, 3, 6], 1: [1, 4, 7], 2: [2, 5, 8]}
    assert vanilla_source_layers(vanilla, sequence, "average") == {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7, 8]}
    with pytest.raises(CheckpointError, match="same unrolled depth"):
        vanilla_source_layers(registry.build("sharing_scheme", ComponentSpec(name="none")).plan(8, 1), cycle, "average")


def test_init_recovers_a_recursive_model_from_its_unrolled_copy():
    """Unroll a recursive model into a vanilla one, initialise a fresh recursive model from it: both methods
    give back the original weights, so the logits match."""
    torch.manual_seed(1)
    original = micro(6, num_recursions=3, sharing={"name": "cycle"})
    vanilla = micro(6)
    state = dict(vanilla.state_dict())
    for name, tensor in original.state_dict().items():
        if not name.startswith("engine."):
            state[name] = tensor
    for l, phys in enumerate(original.engine.physical_of):
        for suffix, tensor in original.engine.layers[phys].state_dict().items():
            state[f"engine.layers.{l}.{suffix}"] = tensor
        for suffix, tensor in original.engine.norms[phys].state_dict().items():
            state[f"engine.norms.{l}.{suffix}"] = tensor
    x = torch.randint(0, 61, (1, 7))
    for method in ("average", "select"):
        torch.manual_seed(2)
        fresh = micro(6, num_recursions=3, sharing={"name": "cycle"})
        init_recursive_from_vanilla(state, vanilla.plan, fresh, method=method)
        torch.testing.assert_close(fresh(x).logits_BTV, original(x).logits_BTV, atol=1e-12, rtol=0)

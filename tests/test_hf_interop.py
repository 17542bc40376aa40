"""Hugging Face interop both ways: llama3 RoPE scaling imports with logits parity, conversion checks tensor
shapes and the tokenizer, an exported model loads in transformers with our logits, and ``convert --recipe``
initialises a recursive model from a vanilla checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from adaptive.cli import main
from adaptive.convert import load_hf_llama, load_pretrained, save_pretrained
from adaptive.errors import CheckpointError
from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
          "original_max_position_embeddings": 64}
TOKENS_BT = torch.randint(0, 60, (2, 40), generator=torch.Generator().manual_seed(0))


def hf_checkpoint(path, seed=0, **overrides):
    """A small random LlamaForCausalLM saved as safetensors (no download)."""
    kwargs = dict(vocab_size=64, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False, initializer_range=0.1)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def word_tokenizer(path, size=60):
    """A word-level tokenizer of ``size`` tokens with the document separator."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def hf_logits(directory, tokens_BT):
    model = transformers.LlamaForCausalLM.from_pretrained(directory).float().eval()
    with torch.no_grad():
        return model(tokens_BT).logits


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    hf = hf_checkpoint(tmp_path, rope_scaling=LLAMA3)
    cfg, state = load_hf_llama(tmp_path)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    ours = build_model(cfg, get_registry()).float().eval()
    ours.load_state_dict(state)
    plain = build_model(cfg.model_copy(update={"rope_scaling": None}), get_registry())
    assert not torch.allclose(ours.rotary.inv_freq, plain.rotary.inv_freq)  # the scaling changes frequencies
    with torch.no_grad():
        expected = hf(TOKENS_BT).logits
        torch.testing.assert_close(ours(TOKENS_BT).logits_BTV, expected, atol=1e-5, rtol=0)


def test_invalid_llama3_scaling_names_the_key(tmp_path):
    hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    bad = {**LLAMA3, "high_freq_factor": 0.5}  # must exceed low_freq_factor
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": bad, "rope_parameters": None}))
    with pytest.raises(CheckpointError, match="rope_scaling.*high_freq_factor"):
        load_hf_llama(tmp_path)


def test_config_sizes_that_disagree_with_the_tensors_name_the_tensor(tmp_path, capsys):
    hf_checkpoint(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(SystemExit) as info:
        main(["convert", "hf-llama", str(tmp_path / "hf"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "model.layers.0.mlp.gate_proj.weight is (80, 64)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_padded_embedding_converts_and_generates(tmp_path, capsys):
    """64 embedding rows, 60 tokens: the model is built with the rows its weights have."""
    hf_checkpoint(tmp_path / "hf")
    word_tokenizer(tmp_path / "hf" / "tokenizer.json", 60)
    main(["convert", "hf-llama", str(tmp_path / "hf"), str(tmp_path / "out")])
    from adaptive.serving.loading import load_run

    assert load_run(tmp_path / "out", get_registry()).model.vocab_size == 64
    main(["generate", str(tmp_path / "out"), "--prompt", "w3 w4", "--max-new-tokens", "3", "--greedy"])
    assert "tokens in" in capsys.readouterr().err


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    hf_checkpoint(tmp_path / "hf")
    word_tokenizer(tmp_path / "hf" / "tokenizer.json", 70)
    with pytest.raises(CheckpointError, match="70 tokens but the model's embedding has 64 rows"):
        main(["--debug", "convert", "hf-llama", str(tmp_path / "hf"), str(tmp_path / "out")])


def test_a_source_without_tokenizer_warns(tmp_path):
    hf_checkpoint(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        main(["convert", "hf-llama", str(tmp_path / "hf"), str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------- export


def our_model(tmp_path, **overrides):
    """A saved model of ours (with a tokenizer) with non-trivial norms, and the model itself."""
    shape = dict(num_layers=6, d_model=32, num_heads=4, num_kv_heads=2, d_ffn=48, vocab_size=64, max_seq_len=64,
                 tie_embeddings=False, init_std=0.1)
    cfg = ModelConfig(**{**shape, **overrides})
    torch.manual_seed(3)
    model = build_model(cfg, get_registry()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    word_tokenizer(tmp_path / "tok.json", 60)
    save_pretrained(tmp_path / "ours", cfg, model.state_dict(), tokenizer_file=tmp_path / "tok.json")
    return tmp_path / "ours", model


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": True, "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 16}},
    {"num_recursions": 2, "sharing": {"name": "middle_cycle"}},
    {"num_recursions": 2, "sharing": {"name": "cycle"}, "per_step_norms": True},
    {"num_recursions": 2, "sharing": {"name": "middle_cycle"}, "kv_policy": {"name": "hybrid"}},
])
def test_exported_model_loads_in_transformers_with_our_logits(tmp_path, overrides):
    src, ours = our_model(tmp_path, **overrides)
    main(["export", "hf-llama", str(src), str(tmp_path / "hf")])
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 6  # unrolled
    tokens_BT = TOKENS_BT[:, :30]
    with torch.no_grad():
        expected = ours(tokens_BT).logits_BTV
    got = hf_logits(tmp_path / "hf", tokens_BT)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_routed_model_is_refused_with_the_reason(tmp_path, capsys):
    src, _ = our_model(tmp_path, num_recursions=2, sharing={"name": "middle_cycle"}, router={"name": "expert_choice"})
    with pytest.raises(SystemExit) as info:
        main(["export", "hf-llama", str(src), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "routed model gives tokens different depths" in err
    assert not (tmp_path / "hf").exists()
    (tmp_path / "b").mkdir()
    src, _ = our_model(tmp_path / "b", num_recursions=2, sharing={"name": "middle_cycle"},
                       kv_policy={"name": "recursive_sharing"})
    with pytest.raises(SystemExit) as info:
        main(["export", "hf-llama", str(src), str(tmp_path / "hf")])
    assert info.value.code == 2 and "step 1 attends to keys and values another step wrote" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- uptraining


@pytest.mark.parametrize("init", ["select", "average"])
def test_convert_with_a_recipe_initialises_the_recursive_model(tmp_path, init):
    hf_checkpoint(tmp_path / "hf", num_hidden_layers=8)
    word_tokenizer(tmp_path / "hf" / "tokenizer.json", 60)
    main(["convert", "hf-llama", str(tmp_path / "hf"), str(tmp_path / "out"), "--recipe", "recipes/mor_expert.yaml",
          "--init", init])
    model = load_pretrained(tmp_path / "out")
    cfg = model.config
    assert (cfg.sharing.name, cfg.num_recursions, cfg.router.name, cfg.d_model) == ("middle_cycle", 3, "expert_choice", 64)
    _, vanilla = load_hf_llama(tmp_path / "hf")
    q = lambda state, i: state[f"engine.layers.{i}.attn.q_proj.weight"]  # noqa: E731
    ours = model.state_dict()
    # middle_cycle, 8 layers, N_r=3: physical 1 serves depths 1, 3, 5; select takes depth 1, average the mean
    want = q(vanilla, 1) if init == "select" else (q(vanilla, 1) + q(vanilla, 3) + q(vanilla, 5)) / 3
    torch.testing.assert_close(q(ours, 1), want)
    assert torch.equal(ours["embed.weight"], vanilla["embed.weight"])


def test_training_the_uptrained_recipe_starts_from_its_weights(tmp_path, monkeypatch, capsys):
    """The saved recipe sets train.init_from: a step at a tiny learning rate barely moves the vanilla weights."""
    from adaptive.train.checkpoint import latest_checkpoint, load_weights

    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path / "cache"))
    hf_checkpoint(tmp_path / "hf", num_hidden_layers=8)
    word_tokenizer(tmp_path / "hf" / "tokenizer.json", 60)
    main(["convert", "hf-llama", str(tmp_path / "hf"), str(tmp_path / "out"), "--recipe", "recipes/mor_expert.yaml"])
    start = load_weights(tmp_path / "out")
    args = ["train", str(tmp_path / "out" / "recipe.yaml"), f"train.out_dir={tmp_path / 'run'}", "train.steps=1",
            "train.lr=1e-7", "train.batch_size=2", "data.seq_len=16", "data.source.name=pydoc_topics",
            "train.progress_bar=false", "train.tensorboard=false", "train.eval_every=1", "train.eval_batches=1"]
    main(args)
    trained = load_weights(latest_checkpoint(tmp_path / "run"))
    key = "engine.layers.1.attn.q_proj.weight"
    assert (trained[key] - start[key]).abs().max() < 1e-5 < start[key].abs().max()
    bad = tmp_path / "other"
    hf_checkpoint(tmp_path / "hf2", hidden_size=32, intermediate_size=64)
    main(["convert", "hf-llama", str(tmp_path / "hf2"), str(bad)])
    with pytest.raises(SystemExit) as info:
        main([*args[:2], f"train.out_dir={tmp_path / 'run2'}", f"train.init_from={bad}", *args[3:]])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "train.init_from" in err and "embed.weight" in err, err


def test_convert_init_without_recipe_is_refused(tmp_path, capsys):
    hf_checkpoint(tmp_path / "hf")
    with pytest.raises(SystemExit) as info:
        main(["convert", "hf-llama", str(tmp_path / "hf"), str(tmp_path / "out"), "--init", "average"])
    assert info.value.code == 2 and "--init needs --recipe" in capsys.readouterr().err


def test_a_recipe_the_checkpoint_depth_cannot_hold_is_refused(tmp_path, capsys):
    hf_checkpoint(tmp_path / "hf")  # 2 layers; middle_cycle with N_r=3 needs more
    with pytest.raises(SystemExit) as info:
        main(["convert", "hf-llama", str(tmp_path / "hf"), str(tmp_path / "out"), "--recipe", "recipes/mor_expert.yaml"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "model.sharing 'middle_cycle' with num_recursions=3" in err and "Traceback" not in err


def test_load_pretrained_on_weights_of_another_shape_names_the_tensor(tmp_path):
    src, _ = our_model(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(src / "model.safetensors"))
    weights["final_norm.weight"] = torch.ones(31)
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"final_norm.weight is \(31,\), the model expects \(32,\)"):
        load_pretrained(src)

"""`adaptive generate` misuse: bad sampling options, a damaged tokenizer or weights of another shape are one-line
errors (exit 2, no traceback); temperature 0 and top-k 0 work; --max-new-tokens is capped at the context."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptive.cli import main
from adaptive.convert import save_pretrained
from adaptive.model import ModelConfig, build_model
from adaptive.plugins import get_registry

CONTEXT = 24


@pytest.fixture
def model_dir(tmp_path):
    """A saved model (context 24) with a word-level tokenizer of 40 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tok.json"))
    cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ffn=48, vocab_size=40,
                      max_seq_len=CONTEXT)
    torch.manual_seed(0)
    model = build_model(cfg, get_registry())
    return save_pretrained(tmp_path / "model", cfg, model.state_dict(), tokenizer_file=tmp_path / "tok.json")


def run(capsys, *args):
    capsys.readouterr()
    try:
        main(["generate", *map(str, args)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


@pytest.mark.parametrize("option, value", [("--temperature", "-1"), ("--top-k", "-5"), ("--top-k", "x"),
                                           ("--top-p", "0"), ("--top-p", "1.5")])
def test_bad_sampling_options_are_one_line_errors(model_dir, capsys, option, value):
    code, _, err = run(capsys, model_dir, "--prompt", "w2", option, value)
    assert code == 2 and option in err


def test_temperature_zero_is_greedy_and_top_k_zero_samples_from_all(model_dir, capsys):
    zero = run(capsys, model_dir, "--prompt", "w2 w3", "--max-new-tokens", "5", "--temperature", "0", "--top-k", "0")
    greedy = run(capsys, model_dir, "--prompt", "w2 w3", "--max-new-tokens", "5", "--greedy")
    assert zero[0] == greedy[0] == 0 and zero[1] == greedy[1] and "5 tokens in" in zero[2]
    sampled = run(capsys, model_dir, "--prompt", "w2 w3", "--max-new-tokens", "5", "--top-k", "0", "--seed", "1")
    assert sampled[0] == 0 and "5 tokens in" in sampled[2]


def test_max_new_tokens_is_capped_at_the_context(model_dir, capsys):
    with pytest.warns(UserWarning, match="--max-new-tokens 1000000000000: capped at 21") as caught:
        code, _, err = run(capsys, model_dir, "--prompt", "w2 w3", "--max-new-tokens", 10 ** 12, "--greedy")
    room = CONTEXT - 3  # separator + two words
    assert code == 0 and len(caught) == 1
    assert int(err.split(" tokens in")[0].split()[-1]) <= room


def test_a_prompt_that_fills_the_context_is_an_error(model_dir, capsys):
    code, _, err = run(capsys, model_dir, "--prompt", " ".join(["w2"] * CONTEXT))
    assert code == 2 and "fill the model's context of 24 tokens" in err


def test_a_corrupt_tokenizer_is_an_error_naming_the_file(model_dir, capsys):
    (model_dir / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    code, _, err = run(capsys, model_dir, "--prompt", "w2")
    assert code == 2 and "tokenizer.json: not a readable tokenizers JSON file" in err and len(err.splitlines()) <= 2


def test_weights_of_another_shape_are_an_error_naming_the_tensor(model_dir, capsys):
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["engine.layers.0.ffn.up.weight"] = torch.zeros(50, 32)
    save_file(weights, str(model_dir / "model.safetensors"))
    code, _, err = run(capsys, model_dir, "--prompt", "w2")
    assert code == 2 and "engine.layers.0.ffn.up.weight is (50, 32), the model expects (48, 32)" in err

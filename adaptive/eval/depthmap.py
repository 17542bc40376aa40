"""Per-token recursion depth of a text: an HTML page (no network needed) and a PNG heatmap.

The text is opened by the document separator and run once through the model in eval mode, so every
router decides with its causal inference rule, as in decoding. A token's depth is the number of recursion
steps its hidden state ran (``RoutingStats.depth_BT``). Each token is shown as the slice of the text from
its first character to the next token's first character, so the pieces add up to the text exactly.

Shapes: T tokens.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptive.errors import AdaptiveError, DataError
from adaptive.serving.loading import LoadedRun

# light to dark: depth 0 (exited before the first step) ... N_r (ran every step)
ANCHORS = ["#fff7bc", "#fec44f", "#ec7014", "#993404", "#4a1486"]


@dataclass
class TokenDepths:
    pieces: list[str]
    depth: list[int]
    nll: list[float]  # nats: -log p(token | what precedes it)
    num_steps: int
    title: str

    @property
    def mean_depth(self) -> float:
        return sum(self.depth) / max(len(self.depth), 1)

    def counts(self) -> list[int]:
        return [self.depth.count(d) for d in range(self.num_steps + 1)]


def token_depths(loaded: LoadedRun, text: str, title: str = "") -> TokenDepths:
    """Depth and surprisal of every token of ``text`` under the run's model (causal routing)."""
    model, tok = loaded.model, loaded.tokenizer
    if not model.plan.steps:
        raise AdaptiveError(f"{loaded.checkpoint}: the model has no recursion steps (sharing "
                            f"{model.config.sharing.name!r}); there is no per-token depth to show")
    if not text.strip():
        raise DataError("--text: give some text to inspect")
    encoding = tok.tok.encode(text, add_special_tokens=False)
    ids = [tok.separator_id, *encoding.ids]
    if len(ids) > model.config.max_seq_len:
        raise DataError(f"--text: {len(ids)} tokens, more than the model's max_seq_len={model.config.max_seq_len}; "
                        "shorten the text")
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids], device=device))
    logprob_TV = torch.log_softmax(out.logits_BTV[0, :-1].float(), dim=-1)
    nll_T = -logprob_TV.gather(-1, torch.tensor(ids[1:], device=device)[:, None]).squeeze(-1)
    starts = [start for start, _ in encoding.offsets]
    starts[0] = 0
    pieces = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]
    return TokenDepths(pieces, out.stats.depth_BT[0, 1:].tolist(), nll_T.tolist(), model.plan.num_steps,
                       title or str(loaded.checkpoint))


def palette(num_steps: int) -> list[str]:
    """One colour per depth 0..num_steps, interpolated along ANCHORS."""
    def mix(a: str, b: str, t: float) -> str:
        ca, cb = (tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in (a, b))
        return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))

    out = []
    for d in range(num_steps + 1):
        pos = d / max(num_steps, 1) * (len(ANCHORS) - 1)
        i = min(int(pos), len(ANCHORS) - 2)
        out.append(mix(ANCHORS[i], ANCHORS[i + 1], pos - i))
    return out


def ink(background: str) -> str:
    """Black or white text, whichever reads better on ``background``."""
    r, g, b = (int(background[i:i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"


def to_html(td: TokenDepths) -> str:
    """A self-contained page: the text with each token coloured by its depth, a legend with counts."""
    colours = palette(td.num_steps)
    css = "\n".join(f".d{d} {{ background: {c}; color: {ink(c)}; }}" for d, c in enumerate(colours))
    total = max(len(td.depth), 1)
    legend = "".join(f'<span class="swatch d{d}">{d} step{"s" if d != 1 else ""}</span> {n} tokens '
                     f"({100 * n / total:.0f}%)&emsp;" for d, n in enumerate(td.counts()))
    spans = "".join(f'<span class="d{d}" title="depth {d}, -log p = {nll:.2f}">{html.escape(piece)}</span>'
                    for piece, d, nll in zip(td.pieces, td.depth, td.nll))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Recursion depth per token</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
.text {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; font-size: 1.05rem; }}
.text span {{ padding: 0.15rem 0; border-radius: 2px; box-shadow: inset -1px 0 0 rgba(255, 255, 255, 0.9); }}
.swatch {{ display: inline-block; padding: 0.1rem 0.5rem; border-radius: 3px; font-family: ui-monospace, monospace; }}
{css}
</style></head><body>
<h1>Recursion depth per token</h1>
<p>{html.escape(td.title)}: {len(td.depth)} tokens, mean depth {td.mean_depth:.2f} of {td.num_steps} recursion steps
(causal inference rule). Hover a token for its depth and surprisal.</p>
<p class="legend">{legend}</p>
<div class="text">{spans}</div>
</body></html>
"""


def to_png(td: TokenDepths, path: Path, line_chars: int = 80) -> None:
    """The text in a monospace layout, each token on a box coloured by its depth, with a legend."""
    Figure, ListedColormap, BoundaryNorm, Rectangle, ScalarMappable = _matplotlib()
    lines = layout(td.pieces, line_chars)
    width_in = 11.0
    fontsize = width_in * 72 / (line_chars * 0.62)  # a monospace glyph is ~0.6 em wide
    fig = Figure(figsize=(width_in, 1.3 + 0.3 * len(lines)), layout="constrained")
    ax = fig.add_subplot()
    colours = palette(td.num_steps)
    for row, line in enumerate(lines):
        for col, text, i in line:
            colour = colours[td.depth[i]]  # a small gap between boxes shows the token boundaries
            ax.add_patch(Rectangle((col + 0.04, row), max(len(text), 0.5) - 0.08, 0.9, color=colour, lw=0))
            ax.text(col, row + 0.5, text, family="monospace", fontsize=fontsize, va="center", ha="left",
                    color=ink(colour))
    ax.set_xlim(0, line_chars)
    ax.set_ylim(len(lines), 0)
    ax.axis("off")
    cmap = ListedColormap(colours)
    norm = BoundaryNorm([d - 0.5 for d in range(td.num_steps + 2)], cmap.N)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, orientation="horizontal", fraction=0.05,
                       aspect=40, ticks=list(range(td.num_steps + 1)))
    bar.set_label("recursion steps run by the token")
    ax.set_title(f"{td.title}: recursion depth per token (mean {td.mean_depth:.2f} of {td.num_steps})", fontsize=10)
    fig.savefig(path, dpi=130)


def layout(pieces: list[str], line_chars: int) -> list[list[tuple[int, str, int]]]:
    """Pieces placed on lines of ``line_chars`` columns: (column, text, token index); a newline breaks."""
    lines: list[list[tuple[int, str, int]]] = [[]]
    col = 0
    for i, piece in enumerate(pieces):
        parts = piece.split("\n")
        for k, part in enumerate(parts):
            if k:
                lines.append([])
                col = 0
            if col and col + len(part) > line_chars:
                lines.append([])
                col = 0
                part = part.lstrip(" ") or part
            if part or len(parts) == 1:
                lines[-1].append((col, part, i))
                col += len(part)
    while len(lines) > 1 and not lines[-1]:
        lines.pop()
    return lines


def _matplotlib():
    try:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        raise AdaptiveError("PNG output needs matplotlib: pip install 'adaptive-lm[viz]' (or write .html)") from None
    return Figure, ListedColormap, BoundaryNorm, Rectangle, ScalarMappable


def write(td: TokenDepths, out: str | Path) -> Path:
    """Write ``out`` as HTML (.html/.htm) or PNG (.png), chosen by its suffix."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise AdaptiveError(f"--out: {out} must end in .html or .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        to_png(td, out)
    else:
        out.write_text(to_html(td), encoding="utf-8")
    return out

"""The report as blocks (headings, sentences, lists, tables, figures), written out as Markdown or as one
self-contained HTML page (figures embedded), and the way the report writes its numbers.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from matplotlib.figure import Figure

STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left;font-size:14px}th{background:#f3f3f3}img{max-width:100%}"
    "figcaption{color:#555;font-size:13px}"
)


@dataclass
class FigureFile:
    """A figure of the report: its file under figures/, its PNG bytes and its caption."""

    name: str  # file name under figures/
    png: bytes
    caption: str


class Doc:
    """The report as blocks (headings, sentences, lists, tables, figures), written as Markdown or HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []
        self.figures: list[FigureFile] = []

    def heading(self, level: int, text: str) -> None:
        """A heading of `level` (1: the title)."""
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        """A paragraph."""
        self.blocks.append(("p", text))

    def items(self, lines: Sequence[str]) -> None:
        """A bulleted list (nothing for no lines)."""
        if lines:
            self.blocks.append(("ul", list(lines)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table (nothing for no rows); cells are written by `_cell`."""
        if rows:
            self.blocks.append(("table", list(header), [[_cell(v) for v in r] for r in rows]))

    def figure(self, name: str, fig: Figure | bytes, caption: str) -> None:
        """A figure (a Matplotlib figure or PNG bytes), saved as figures/`name`."""
        png = fig if isinstance(fig, bytes) else _png(fig)
        self.figures.append(FigureFile(name, png, caption))
        self.blocks.append(("figure", self.figures[-1]))

    def markdown(self) -> str:
        """The report as Markdown, figures linked under figures/."""
        return "\n\n".join(_markdown(block) for block in self.blocks) + "\n"

    def html(self, title: str) -> str:
        """The report as one HTML page, figures embedded (nothing is fetched)."""
        body = "\n".join(_html(block) for block in self.blocks)
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + body + "\n</body></html>\n"
        )


def _markdown(block: tuple) -> str:
    kind = block[0]
    if kind == "h":
        return f"{'#' * block[1]} {block[2]}"
    if kind == "p":
        return block[1]
    if kind == "ul":
        return "\n".join(f"- {line}" for line in block[1])
    if kind == "table":
        header, rows = block[1], block[2]
        esc = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
        return "\n".join(
            [f"| {' | '.join(esc[0])} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(r)} |" for r in esc[1:])]
        )
    f = block[1]
    return f"![{f.caption}](figures/{f.name})\n\n*{f.caption}*"


def _html(block: tuple) -> str:
    e, kind = _inline, block[0]
    if kind == "h":
        return f"<h{block[1]}>{e(block[2])}</h{block[1]}>"
    if kind == "p":
        return f"<p>{e(block[1])}</p>"
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{e(line)}</li>" for line in block[1]) + "</ul>"
    if kind == "table":
        head = "".join(f"<th>{e(c)}</th>" for c in block[1])
        rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in block[2])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    f = block[1]
    data = base64.b64encode(f.png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(f.caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{e(f.caption)}</figcaption></figure>"
    )


def _inline(text: str) -> str:
    """`text` escaped for HTML, with Markdown's `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cell(value: Any) -> str:
    """A table cell: – for None and NaN (nothing recorded), 4 decimals for a float."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def short_value(value: Any) -> str:
    """A hyperparameter's value: 3 significant digits for a float (a learning rate)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def acc(x: Optional[float]) -> str:
    """An accuracy or loss as the report writes it."""
    return "–" if x is None or not math.isfinite(x) else f"{x:.4f}"


def pm(s: Mapping[str, Any]) -> str:
    """'mean ± std (n=N)' of a stats() dict; one value has no spread: 'value (n=1)'."""
    if not s or not s.get("n"):
        return "– (n=0)"
    if s["std"] is None:
        return f"{s['mean']:.4f} (n=1)"
    return f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})"


def span(s: Mapping[str, Any]) -> str:
    """The range of a stats() dict of counts: '25', or '3-25'."""
    if not s or not s.get("n"):
        return "–"
    return f"{s['min']:g}" if s["min"] == s["max"] else f"{s['min']:g}-{s['max']:g}"


def share(k: int, n: int) -> str:
    """'k of n (p%)'."""
    return f"{k} of {n} ({100 * k / n:.0f}%)" if n else "0 of 0"

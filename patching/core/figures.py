"""Figures: one way to make a matplotlib figure (a bare Figure on the Agg canvas: headless, without
pyplot's import and figure manager), and the few plots the analyses share.

matplotlib is imported inside the functions that draw: a run that draws nothing never pays for it.
This module imports neither torch nor numpy when it is imported: the heatmap helper process
(patching.core.painter) is forked after importing it, and must not inherit their threads.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable



def show(token: str) -> str:
    """A token as printable text (tables, figures): spaces visible at the edges, newlines and tabs escaped."""
    return repr(token)[1:-1] if token.strip() != token or not token.isprintable() else token


def token_labels(tokens) -> list[str]:
    """Axis labels of positions: 'token (i)'."""
    return [f"{show(t)} ({i})" for i, t in enumerate(tokens)]


def figure(width: float, height: float, layout: str | None = None):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def png(draw: Callable[[], object], dpi: int = 120) -> Callable[[Path], None]:
    """A write_folder entry that draws the figure only when the folder is written."""
    def save(path: Path):
        fig = draw()
        fig.savefig(path, dpi=dpi)
    return save


def png_bytes(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def diverging(values):
    """A colour norm centred on zero for signed quantities."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    values = np.asarray(values)
    lim = float(np.nanmax(np.abs(values))) if values.size and np.isfinite(values).any() else 0.0
    lim = lim or 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)


def layer_head_figure(values, title: str, scale: tuple[float, float] | None = None, cmap: str = "RdBu_r",
                      digits: str = ".3g"):
    """An L x H heatmap of one value per head, each value written in its cell: a signed quantity
    centred on zero, or on a fixed colour range `scale` (vmin, vmax), e.g. a score in [0, 1]."""
    L, H = values.shape
    fig = figure(max(5.5, 2.5 + 0.5 * H), max(3.2, 1.6 + 0.4 * L), layout="constrained")
    ax = fig.add_subplot()
    if scale is None:
        norm = diverging(values)
        im = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto")
        dark = lambda v: abs(v) > 0.6 * norm.vmax  # noqa: E731 - white text on the saturated colours
    else:
        vmin, vmax = scale
        im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")

        def dark(v):  # white text where the colour map is dark: both ends of a diverging one, the low end else
            light = (v - vmin) / (vmax - vmin) if math.isfinite(v) else 0.5
            return light > 0.8 or light < 0.2 if cmap == "RdBu_r" else light < 0.6
    if L * H <= 200:
        for l in range(L):
            for h in range(H):
                ax.text(h, l, f"{values[l, h]:{digits}}", ha="center", va="center", fontsize=7,
                        color="white" if dark(values[l, h]) else "black")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def layer_bars_figure(bars: dict, ylabel: str, title: str):
    """Two bars per layer (e.g. attention and MLP) around a zero line."""
    import numpy as np
    (a_label, a), (b_label, b) = bars.items()
    fig = figure(max(4.5, 2.5 + 0.5 * len(a)), 3.5)
    ax = fig.add_subplot()
    x = np.arange(len(a))
    ax.bar(x - 0.2, a, 0.4, label=a_label)
    ax.bar(x + 0.2, b, 0.4, label=b_label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

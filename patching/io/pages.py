"""HTML pages from jinja2 templates (patching/io/templates/): rendering, number formats, colours.

The pages are self-contained (figures are PNG data URIs, the sort script and styles are inline, no
request leaves the page), so a folder can be mailed or opened from a cluster's file share.
base.html holds the styles and the table-sorting script; each page extends it. What a page shows is
its owner's business: an analysis renders its report, a study its index.
"""
from __future__ import annotations

import base64
import math
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _env():
    import jinja2
    return jinja2.Environment(loader=jinja2.PackageLoader("patching.io", "templates"),
                              autoescape=jinja2.select_autoescape(("html",)), trim_blocks=False)


def render(template: str, **context) -> str:
    """A page from its template, every value HTML-escaped unless the template says otherwise."""
    return _env().get_template(template).render(fmt=fmt, **context)


def fmt(v) -> str:
    """Numbers to 4 significant digits; None/NaN as an empty cell."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def colour(v: float, lim: float) -> str:
    """A diverging background (red positive, blue negative, white zero), light enough for black text."""
    if not math.isfinite(v) or lim == 0:
        return "transparent"
    x = max(-1.0, min(1.0, v / lim))
    fade = lambda c: int(255 - (255 - c) * abs(x) * 0.8)  # noqa: E731
    r, g, b = (214, 96, 77) if x > 0 else (67, 147, 195)
    return f"rgb({fade(r)}, {fade(g)}, {fade(b)})"

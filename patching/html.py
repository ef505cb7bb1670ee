"""HTML pages: report.html of one experiment and index.html of a study, from jinja2 templates.

The pages are self-contained (figures are PNG data URIs, the sort script and styles are inline, no
request leaves the page), so a folder can be mailed or opened from a cluster's file share.
Templates live in patching/templates/ (base.html holds the styles and the table-sorting script).
"""
from __future__ import annotations

import base64
import math
from functools import lru_cache

import numpy as np

from patching.api import PatchResult
from patching.engines import METRICS

HOW_TO_READ_SWEEP = (
    "Every cell is one patched run: denoising, the corrupt run with one activation (the site, at that layer, "
    "head and position) replaced by the clean run's; noising, the clean run with one activation replaced by "
    "the corrupt run's. The metric is measured at the last position. In the table, white is the patched run's "
    "own value (the patch changed nothing) and blue moves towards the other run's value. A cell that moves "
    "it all the way carries what the other prompt knows; follow those cells down the layers to see where the "
    "information travels. Positions before the first differing token cannot matter (both prompts agree there).")
HOW_TO_READ_AGGREGATE = (
    "Each cell is the mean over the pairs of the normalised recovery of logit(foil) − logit(target), "
    "(patched − own) / (other − own), where own is the patched run's value and other the other run's "
    "(denoising: own = corrupt, other = clean): 0 = the patch changes nothing, 1 = it moves the answer "
    "completely to the other run's, blue = towards it. Below the mean: its 95% bootstrap interval (pairs resampled with replacement). "
    "Hatched cells have an interval that contains 0: over these pairs the cell has no effect we can tell from "
    "none. The table gives the standard error, the share of pairs whose recovery exceeds 0.5 and the mean of "
    "the run's own metric.")
HOW_TO_READ_RAW = (
    "This analysis reads each pair's clean prompt alone, so there is no recovery: each cell is the mean over "
    "the pairs of the analysis's own value ({metric}: {definition}); red is positive (the foil gains over the "
    "target), blue negative (the target gains), as in the analysis's own figures. Below the mean: its 95% bootstrap interval (pairs resampled with "
    "replacement). Hatched cells have an interval that contains 0: over these pairs the cell has no effect we "
    "can tell from none. The table gives the standard error and the interval of every cell.")


@lru_cache(maxsize=1)
def _env():
    import jinja2
    return jinja2.Environment(loader=jinja2.PackageLoader("patching", "templates"),
                              autoescape=jinja2.select_autoescape(("html",)), trim_blocks=False)


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


def _colour(v: float, lim: float) -> str:
    """A diverging background (red positive, blue negative, white zero), light enough for black text."""
    if not math.isfinite(v) or lim == 0:
        return "transparent"
    x = max(-1.0, min(1.0, v / lim))
    fade = lambda c: int(255 - (255 - c) * abs(x) * 0.8)  # noqa: E731
    r, g, b = (214, 96, 77) if x > 0 else (67, 147, 195)
    return f"rgb({fade(r)}, {fade(g)}, {fade(b)})"


def experiment_page(result: PatchResult, heatmap_png: bytes | None = None, doc: dict | None = None) -> str:
    """report.html of one experiment: settings, tokens, top-k tables, the sweep (figure and values),
    strongest patches, timing and versions. `doc`: result.to_json() if the caller has it already."""
    from patching.report import as_rows, base_value, column_labels, describe_cell, row_labels, strongest
    r = doc or result.to_json()
    m, base = as_rows(result), base_value(result)
    lim = float(np.nanmax(np.abs(m - base))) if m.size else 0.0
    # colour = distance from the patched run's own value (towards the other run: blue)
    other = (result.clean if result.settings.direction == "denoise" else result.corrupt).value
    sign = 1.0 if other < base else -1.0
    cells = [(label, [(fmt(v), _colour(sign * (v - base), lim)) for v in row])
             for label, row in zip(row_labels(result), m.tolist())]
    settings = [("model", r["model"]), ("metric", f"{r['metric']} = {r['metric_definition']}"),
                ("site", r.get("site")), ("direction", f"{r.get('direction')}: {r.get('direction_definition')}"),
                ("axes", " × ".join(r.get("axes", []))), ("engine", r["engine"]), ("device", r["device"]),
                ("dtype", r["dtype"]), ("top_k", result.settings.top_k)]
    strong = [(describe_cell(result, e), fmt(e[-1])) for e in strongest(result)]
    return _env().get_template("report.html").render(
        r=r, clean="".join(r["tokens"]), corrupt="".join(r["corrupt_tokens"]), settings=settings, cells=cells,
        columns=column_labels(result), row_axis="layer.head" if len(result.axes) == 3 else "layer",
        heatmap=data_uri(heatmap_png) if heatmap_png else None, how_to_read=HOW_TO_READ_SWEEP,
        strongest=strong, fmt=fmt)


TIDY_PAGE_LIMIT = 20000  # rows of the tidy table on the page; beyond it the page links results.csv


def study_page(summary: dict, aggs: list, pngs: list[bytes], tidy: list[dict]) -> str:
    """index.html of a study: counts and reasons, settings, aggregate figure(s) and cells (sortable),
    every pair with a link to its report.html, the tidy table (sortable), timing and versions."""
    from patching.stats import tidy_head, tidy_keys
    from patching.study import title
    a = summary["analysis"]
    metric, metrics, axes, labels = a["metric"], a.get("metrics", list(METRICS)), a["axes"], a.get("labels")
    recovery = "recovery" in metrics
    # the aggregate's table: recovery's statistics and the raw mean, or (no recovery) the raw value's
    stat_keys = ("mean", "sem", "ci_low", "ci_high", "share_above_half", "raw_mean") if recovery else \
        ("raw_mean", "raw_sem", "raw_ci_low", "raw_ci_high")
    stat_heads = (["mean recovery", "sem", "ci_low", "ci_high", "share > 0.5", f"raw mean ({metric})"] if recovery
                  else [f"mean {metric}", "sem", "ci_low", "ci_high"])
    groups = []
    for g, png in zip(aggs, pngs):
        rows = [[label, j, g.columns[j], *(fmt(getattr(g, k)[i, j]) for k in stat_keys)]
                for i, label in enumerate(g.rows) for j in range(len(g.columns))]
        groups.append(({"n_pairs": g.n_pairs, "n_columns": len(g.columns), "row_axis": g.row_axis,
                        "column_axis": g.column_axis, "rows": rows}, data_uri(png)))
    n_tidy = sum(np.asarray(t["metrics"][metric]).size for t in tidy)
    tidy_rows = None
    if n_tidy <= TIDY_PAGE_LIMIT:
        tidy_rows = []
        for t in tidy:
            arrays = [np.asarray(t["metrics"][k]) for k in metrics]
            for cell in np.ndindex(arrays[0].shape):
                keys = tidy_keys(t, cell, axes, labels)
                tidy_rows.append([*keys[:2], *keys[3:], *(fmt(x[cell]) for x in arrays)])  # n_tokens: in the CSV
    s = summary
    head = tidy_head(axes, labels)
    from patching.study import PATCH_ONLY
    shown = {k: v for k, v in s["settings"].items() if a["kind"] == "patch" or k not in PATCH_ONLY}  # what the analysis reads
    about = {k: v for k, v in a.items() if k not in ("labels", "metrics", "scalars")}  # the grid's labels: the tables
    settings = [*shown.items(), ("analysis", ", ".join(f"{k}={v}" for k, v in about.items())),
                *((f"study {k}", v) for k, v in s["options"].items())]
    how = HOW_TO_READ_AGGREGATE if recovery else HOW_TO_READ_RAW.format(metric=metric,
                                                                         definition=a.get("metric_definition", ""))
    return _env().get_template("index.html").render(
        s=s, c=s["counts"], settings=settings, groups=groups, how_to_read=how, title=title(a),
        stat_heads=stat_heads, tidy_head=[*head[:2], *head[3:]], metrics=metrics, tidy_rows=tidy_rows,
        tidy_count=n_tidy, fmt=fmt)

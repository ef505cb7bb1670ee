"""index.html of a study: counts and reasons, settings, the aggregate (figures and sortable cells),
every pair with a link to its page, the tidy table, timing and versions. Self-contained, no network.

It reads the study's summary (what summary.json holds), its aggregates and tidy rows: nothing of any
particular analysis beyond what the analysis described of itself (axes, labels, metrics).
"""
from __future__ import annotations

import numpy as np

from patching.io.pages import data_uri, fmt, render
from patching.study.stats import tidy_head, tidy_keys

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
TIDY_PAGE_LIMIT = 20000  # rows of the tidy table on the page; beyond it the page links results.csv


def study_page(summary: dict, aggs: list, pngs: list[bytes], tidy: list[dict]) -> str:
    """index.html of a study (see the module docstring)."""
    a = summary["analysis"]
    metric, metrics, axes, labels = a["metric"], a["metrics"], a["axes"], a.get("labels")
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
    about = {k: v for k, v in a.items() if k not in ("labels", "metrics", "scalars")}  # the grid's labels: the tables
    settings = [*s["settings"].items(), ("analysis", ", ".join(f"{k}={v}" for k, v in about.items())),
                *((f"study {k}", v) for k, v in s["options"].items())]
    how = HOW_TO_READ_AGGREGATE if recovery else HOW_TO_READ_RAW.format(metric=metric,
                                                                         definition=a.get("metric_definition", ""))
    return render("index.html", s=s, c=s["counts"], settings=settings, groups=groups, how_to_read=how,
                  title=s.get("title", a["kind"]), stat_heads=stat_heads, tidy_head=[*head[:2], *head[3:]],
                  metrics=metrics, tidy_rows=tidy_rows, tidy_count=n_tidy)

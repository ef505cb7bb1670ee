"""Statistics of a study: every cell of the patching grid aggregated over the pairs that share it.

One pair is an anecdote; a study reports, per (layer, position) cell, over the pairs whose prompts
have the same token count (so positions align, as in pairs made from one template):

- the mean and the standard error (SEM = sample std with ddof=1 / sqrt(n)) of the normalised
  `recovery` = (patched - corrupt) / (clean - corrupt) of the logit difference, which is comparable
  across pairs (0 = no effect, 1 = fully clean), and of the run's own raw metric;
- a 95% percentile bootstrap interval of the mean recovery (Efron & Tibshirani 1993, ch. 13): the
  pairs are resampled with replacement N times with a seeded generator, and the interval is the
  2.5th and 97.5th percentiles of the resampled means. It is vectorised: each resample is a row of
  counts (how often each pair was drawn), so all N means are one matrix product, counts @ values;
- the share of pairs whose recovery exceeds 0.5 (how often the cell alone mostly restores the answer).

Files: aggregate.json / aggregate.csv (schema in README), the aggregate heatmap (mean recovery, cells
whose interval contains 0 hatched), and the study's tidy results.csv: one row per (pair, cell).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # the interval's coverage


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices of the pairs drawn in each resample; one seeded generator, one call."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of n_boot resamples of x's first axis: x (n, ...) -> (n_boot, ...)."""
    n = x.shape[0]
    idx = resample_indices(n, n_boot, seed)
    # Row b counts how often each pair is in resample b; the resample's mean is counts[b] @ x / n.
    counts = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n).reshape(n_boot, n)
    return (counts.astype(x.dtype) @ x.reshape(n, -1) / n).reshape(n_boot, *x.shape[1:])


def interval(x: np.ndarray, n_boot: int, seed: int, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean of x (n, ...): (low, high), each of shape x.shape[1:]."""
    means = bootstrap_means(x, n_boot, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return low, high


def sem(x: np.ndarray) -> np.ndarray:
    """Standard error of the mean over the first axis; NaN for a single pair (no spread to estimate)."""
    n = x.shape[0]
    if n < 2:
        return np.full(x.shape[1:], math.nan)
    return x.std(axis=0, ddof=1) / math.sqrt(n)


@dataclass
class Aggregate:
    """One group of aligned pairs. Statistics are (rows, columns) arrays over the grid as the heatmap
    draws it: rows are layers (or layer.head), columns positions (or heads, with all_positions)."""

    n_pairs: int
    row_axis: str  # "layer" or "layer.head"
    column_axis: str  # "position" or "head"
    rows: list[str]
    columns: list[str]  # positions: the token all pairs share there, or "*" where they differ
    mean: np.ndarray
    sem: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    share_above_half: np.ndarray
    raw_mean: np.ndarray
    raw_sem: np.ndarray

    def to_json(self) -> dict:
        grid = lambda a: [[_finite(v) for v in row] for row in a.tolist()]  # noqa: E731
        return {"n_pairs": self.n_pairs, "n_tokens": len(self.columns) if self.column_axis == "position" else None,
                "axes": {"rows": self.row_axis, "columns": self.column_axis, self.row_axis: self.rows,
                         "token" if self.column_axis == "position" else "head": self.columns},
                "mean": grid(self.mean), "sem": grid(self.sem), "ci_low": grid(self.ci_low),
                "ci_high": grid(self.ci_high), "share_above_half": grid(self.share_above_half),
                "raw_mean": grid(self.raw_mean), "raw_sem": grid(self.raw_sem)}

    @property
    def contains_zero(self) -> np.ndarray:
        return (self.ci_low <= 0) & (self.ci_high >= 0)


def grid_axes(axes: list[str], shape: tuple) -> tuple[str, str, list[str]]:
    """(row axis, column axis, row labels) of a metric array with these axes (api.axes_of), as 2-D."""
    if axes == ["layer", "head", "position"]:
        return "layer.head", "position", [f"{l}.{h}" for l in range(shape[0]) for h in range(shape[1])]
    return "layer", axes[-1], [str(l) for l in range(shape[0])]


def aggregate(recovery: np.ndarray, raw: np.ndarray, axes: list[str], tokens: list[list[str]], n_boot: int,
              seed: int) -> Aggregate:
    """Aggregate aligned pairs: recovery and raw are (n, *grid) with these axes; tokens: each pair's clean tokens."""
    n = recovery.shape[0]
    row_axis, column_axis, rows = grid_axes(axes, recovery.shape[1:])
    rec, raw = recovery.reshape(n, len(rows), -1), raw.reshape(n, len(rows), -1)
    low, high = interval(rec, n_boot, seed)
    columns = ([col[0] if len(set(col)) == 1 else "*" for col in zip(*tokens)] if column_axis == "position"
               else [str(h) for h in range(rec.shape[2])])
    return Aggregate(n_pairs=n, row_axis=row_axis, column_axis=column_axis, rows=rows, columns=columns,
                     mean=rec.mean(axis=0), sem=sem(rec), ci_low=low, ci_high=high,
                     share_above_half=(rec > 0.5).mean(axis=0), raw_mean=raw.mean(axis=0), raw_sem=sem(raw))


def _finite(v: float):
    return v if math.isfinite(v) else None  # JSON has no NaN


# ----------------------------------------------------------------------------- files


CSV_STATS = ("mean", "sem", "ci_low", "ci_high", "share_above_half", "raw_mean", "raw_sem")


def aggregate_csv(groups: list[Aggregate]) -> str:
    """One row per (group, grid row, grid column) with every statistic."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    g0 = groups[0]
    w.writerow(["n_columns", "n_pairs", g0.row_axis, g0.column_axis, "label", *CSV_STATS])
    for g in groups:
        for i, row in enumerate(g.rows):
            for j, col in enumerate(g.columns):
                w.writerow([len(g.columns), g.n_pairs, row, j, col,
                            *(repr(float(getattr(g, s)[i, j])) for s in CSV_STATS)])
    return buf.getvalue()


TIDY_HEAD = ["pair", "name", "n_tokens", "layer", "head", "position", "token"]


def tidy_csv(rows: list[dict], metrics: list[str], axes: list[str]) -> str:
    """The study's results.csv: one row per (pair, cell); rows are {index, name, tokens, metrics: {m: array}}
    with arrays over `axes` (api.axes_of); a column that does not apply (head of a residual site) is empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*TIDY_HEAD, *metrics])
    for r in rows:
        arrays = [np.asarray(r["metrics"][m]) for m in metrics]
        for cell in np.ndindex(arrays[0].shape):
            at = dict(zip(axes, cell))
            p = at.get("position")
            w.writerow([r["index"], r["name"], len(r["tokens"]), at["layer"], at.get("head", ""),
                        "" if p is None else p, "" if p is None else r["tokens"][p],
                        *(repr(float(a[cell])) for a in arrays)])
    return buf.getvalue()


def read_tidy(text: str, axes: list[str]) -> tuple[list[str], list[dict]]:
    """Inverse of tidy_csv: (metric names, rows); floats round-trip exactly (written with repr).
    A pair's tokens are read back where its cells name them (all of them unless all_positions)."""
    reader = csv.reader(io.StringIO(text))
    head = next(reader)
    metrics = head[len(TIDY_HEAD):]
    col = {name: TIDY_HEAD.index(name) for name in axes}
    rows: dict[int, dict] = {}
    for rec in reader:
        i = int(rec[0])
        row = rows.setdefault(i, {"index": i, "name": rec[1], "tokens": [""] * int(rec[2]), "cells": {}})
        if rec[5] != "":
            row["tokens"][int(rec[5])] = rec[6]
        row["cells"][tuple(int(rec[col[a]]) for a in axes)] = [float(v) for v in rec[len(TIDY_HEAD):]]
    out = []
    for row in rows.values():
        shape = tuple(1 + max(c[k] for c in row["cells"]) for k in range(len(axes)))
        row["metrics"] = {m: np.array([row["cells"][c][k] for c in np.ndindex(shape)]).reshape(shape)
                          for k, m in enumerate(metrics)}
        del row["cells"]
        out.append(row)
    return metrics, sorted(out, key=lambda r: r["index"])


def heatmap_png(g: Aggregate, title: str, ylabel: str) -> bytes:
    """Mean recovery per cell (blue = restored to clean, as in the single-pair heatmap), each cell
    annotated with its interval when the grid is small; cells whose interval contains 0 are hatched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    L, T = g.mean.shape  # grid rows and columns
    lim = max(1.0, float(np.nanmax(np.abs(g.mean))))
    fig = Figure(figsize=(min(3.0 + 0.95 * T, 40), max(3.4, 2.4 + 0.75 * L)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.matshow(g.mean, cmap="RdBu", norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim), aspect="auto")
    for l, p in zip(*np.nonzero(g.contains_zero)):
        ax.add_patch(Rectangle((p - 0.5, l - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.45", linewidth=0))
    if L * T <= 400:  # the numbers stay legible on small grids only
        for l in range(L):
            for p in range(T):
                ink = "white" if abs(g.mean[l, p]) > 0.6 * lim else "black"
                two = lambda v: f"{round(float(v), 2) + 0.0:.2f}"  # noqa: E731  (no "-0.00")
                ax.text(p, l, f"{two(g.mean[l, p])}\n[{two(g.ci_low[l, p])}, {two(g.ci_high[l, p])}]",
                        ha="center", va="center", fontsize=6.5, color=ink)
    step = max(1, T // 60)
    ticks = list(range(0, T, step))
    if g.column_axis == "position":
        ax.set_xticks(ticks, [f"{g.columns[i]!r}"[1:-1] + f" ({i})" for i in ticks], rotation=90)
        ax.set_xlabel("position (clean token; * where the pairs differ)")
    else:
        ax.set_xticks(ticks, [f"head {g.columns[i]}" for i in ticks])
        ax.set_xlabel("head (every position at once)")
    ax.set_yticks(range(L), g.rows, fontsize=8 if L > 24 else None)
    ax.xaxis.set_ticks_position("bottom")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="mean recovery")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()

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

Analyses without a recovery (a study of lens, dla or ablate: one prompt, no pair to normalise by)
leave the recovery statistics null and aggregate the raw value alone: raw_mean, raw_sem and the
bootstrap interval raw_ci_low/raw_ci_high (the same resamples). Per-pair numbers that are not cells
(the clean run's value, dla's embedding term, ...) are aggregated the same way under `scalars`.

A cell that is not finite in some pair (path patching's not-applicable senders) has null statistics.

Files: aggregate.json / aggregate.csv (schema in README), the aggregate heatmap (mean recovery, cells
whose interval contains 0 hatched), and the study's tidy results.csv: one row per (pair, cell).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np

from patching.core.figures import figure, png_bytes
from patching.core.serial import json_floats

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


RECOVERY_STATS = ("mean", "sem", "ci_low", "ci_high", "share_above_half")  # null without a recovery
RAW_STATS = ("raw_mean", "raw_sem", "raw_ci_low", "raw_ci_high")


@dataclass
class Aggregate:
    """One group of aligned pairs. Statistics are (rows, columns) arrays over the grid as the heatmap
    draws it: rows are layers (or layer.head), columns positions (or heads, with all_positions, or an
    analysis's components). The recovery statistics are None for analyses without a recovery."""

    n_pairs: int
    row_axis: str  # "layer" or "layer.head"
    column_axis: str  # "position", "head" or "component"
    rows: list[str]
    columns: list[str]  # positions: the token all pairs share there, or "*" where they differ
    mean: np.ndarray | None
    sem: np.ndarray | None
    ci_low: np.ndarray | None
    ci_high: np.ndarray | None
    share_above_half: np.ndarray | None
    raw_mean: np.ndarray
    raw_sem: np.ndarray
    raw_ci_low: np.ndarray
    raw_ci_high: np.ndarray
    scalars: dict  # name -> {mean, sem, ci_low, ci_high} of a per-pair number

    def to_json(self) -> dict:
        grid = lambda a: None if a is None else json_floats(a)  # noqa: E731
        return {"n_pairs": self.n_pairs, "n_tokens": len(self.columns) if self.column_axis == "position" else None,
                "axes": {"rows": self.row_axis, "columns": self.column_axis, self.row_axis: self.rows,
                         "token" if self.column_axis == "position" else self.column_axis: self.columns},
                **{k: grid(getattr(self, k)) for k in (*RECOVERY_STATS, *RAW_STATS)},
                "scalars": {k: {s: json_floats(v) for s, v in d.items()} for k, d in self.scalars.items()}}

    @property
    def has_recovery(self) -> bool:
        return self.mean is not None

    def drawn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, ci_low, ci_high) of what the heatmap shows: recovery if there is one, else the raw value."""
        if self.has_recovery:
            return self.mean, self.ci_low, self.ci_high
        return self.raw_mean, self.raw_ci_low, self.raw_ci_high

    @property
    def contains_zero(self) -> np.ndarray:
        _, low, high = self.drawn()
        return (low <= 0) & (high >= 0)


def grid_axes(axes: list[str], shape: tuple, labels: dict | None = None) -> tuple[str, str, list[str]]:
    """(row axis, column axis, row labels) of a metric array with these axes (engines.axes_of), as 2-D;
    `labels` (axis -> labels) names the rows and non-position columns of an analysis's grid."""
    if labels:
        return axes[0], axes[1], list(labels[axes[0]])
    if axes == ["layer", "head", "position"]:
        return "layer.head", "position", [f"{l}.{h}" for l in range(shape[0]) for h in range(shape[1])]
    return "layer", axes[-1], [str(l) for l in range(shape[0])]


def _stats(x: np.ndarray, n_boot: int, seed: int, void: np.ndarray | None = None) -> tuple:
    """(mean, sem, ci_low, ci_high) over the first axis; every call draws the same resamples.
    void: cells (grid-shaped) whose statistics are NaN (null in JSON, empty in CSV)."""
    if void is not None and void.any():  # computed on zeros there (no NaN warnings), then voided
        out = _stats(np.where(void, 0.0, x), n_boot, seed)
        return tuple(np.where(void, math.nan, s) for s in out)
    low, high = interval(x, n_boot, seed)
    return x.mean(axis=0), sem(x), low, high


def aggregate(recovery: np.ndarray | None, raw: np.ndarray, axes: list[str], tokens: list[list[str]], n_boot: int,
              seed: int, labels: dict | None = None, scalars: dict | None = None) -> Aggregate:
    """Aggregate aligned pairs: recovery (None where the analysis has none) and raw are (n, *grid) with
    these axes; tokens: each pair's clean tokens; scalars: name -> (n,) per-pair numbers.
    A cell that is not finite in some pair (path patching's senders that reach no receiver: NaN in
    every pair) gets null statistics: it is not applicable, and a mean over fewer pairs would not
    be comparable with its neighbours'."""
    n = raw.shape[0]
    row_axis, column_axis, rows = grid_axes(axes, raw.shape[1:], labels)
    raw = raw.reshape(n, len(rows), -1)
    void = ~np.isfinite(raw).all(axis=0)
    if column_axis == "position":
        columns = [col[0] if len(set(col)) == 1 else "*" for col in zip(*tokens)]
    else:
        columns = list(labels[column_axis]) if labels else [str(h) for h in range(raw.shape[2])]
    rec_stats = [None] * 5
    if recovery is not None:
        rec = recovery.reshape(n, len(rows), -1)
        void |= ~np.isfinite(rec).all(axis=0)
        rec_stats = [*_stats(rec, n_boot, seed, void), np.where(void, math.nan, (rec > 0.5).mean(axis=0))]
    per_pair = {k: dict(zip(("mean", "sem", "ci_low", "ci_high"), map(float, _stats(np.asarray(v, float), n_boot, seed))))
                for k, v in (scalars or {}).items()}
    return Aggregate(n, row_axis, column_axis, rows, columns, *rec_stats, *_stats(raw, n_boot, seed, void), per_pair)


# ----------------------------------------------------------------------------- files


CSV_STATS = (*RECOVERY_STATS, *RAW_STATS)


def aggregate_csv(groups: list[Aggregate]) -> str:
    """One row per (group, grid row, grid column) with every statistic (empty where it is null)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    g0 = groups[0]
    w.writerow(["n_columns", "n_pairs", g0.row_axis, g0.column_axis, "label", *CSV_STATS])
    for g in groups:
        for i, row in enumerate(g.rows):
            for j, col in enumerate(g.columns):
                w.writerow([len(g.columns), g.n_pairs, row, j, col, *(_cell(getattr(g, s), i, j) for s in CSV_STATS)])
    return buf.getvalue()


def _cell(a: np.ndarray | None, i: int, j: int) -> str:
    """A statistic as aggregate.csv writes it: exactly (repr), or empty where it is null (no recovery,
    a not-applicable cell, the SEM of one pair)."""
    if a is None or not math.isfinite(float(a[i, j])):
        return ""
    return repr(float(a[i, j]))


TIDY_HEAD = ["pair", "name", "n_tokens", "layer", "head", "position", "token"]


def tidy_head(axes: list[str], labels: dict | None = None) -> list[str]:
    """results.csv's key columns: the patch sweep's fixed ones, or (with `labels`, another analysis's
    grid) pair, name, n_tokens, each axis of the grid, and the token where positions are an axis."""
    if not labels:
        return TIDY_HEAD
    return ["pair", "name", "n_tokens", *axes, *(["token"] if "position" in axes else [])]


def tidy_keys(r: dict, cell: tuple, axes: list[str], labels: dict | None = None) -> list:
    """The key columns of one (pair, cell) row, as tidy_head names them; labelled axes by label."""
    at = dict(zip(axes, cell))
    p = at.get("position")
    token = "" if p is None else r["tokens"][p]
    if not labels:  # a column that does not apply (head of a residual site) is empty
        return [r["index"], r["name"], len(r["tokens"]), at["layer"], at.get("head", ""), "" if p is None else p, token]
    keys = [labels[a][i] if a in labels else i for a, i in at.items()]
    return [r["index"], r["name"], len(r["tokens"]), *keys, *([token] if p is not None else [])]


def tidy_csv(rows: list[dict], metrics: list[str], axes: list[str], labels: dict | None = None) -> str:
    """The study's results.csv: one row per (pair, cell); rows are {index, name, tokens, metrics: {m: array}}
    with arrays over `axes` (engines.axes_of, or an analysis's labelled axes)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*tidy_head(axes, labels), *metrics])
    for r in rows:
        arrays = [np.asarray(r["metrics"][m]) for m in metrics]
        for cell in np.ndindex(arrays[0].shape):
            w.writerow([*tidy_keys(r, cell, axes, labels), *(repr(float(a[cell])) for a in arrays)])
    return buf.getvalue()


def read_tidy(text: str, axes: list[str], labels: dict | None = None) -> tuple[list[str], list[dict]]:
    """Inverse of tidy_csv: (metric names, rows); floats round-trip exactly (written with repr).
    A pair's tokens are read back where its cells name them (all of them unless all_positions)."""
    reader = csv.reader(io.StringIO(text))
    head, keys = next(reader), tidy_head(axes, labels)
    metrics = head[len(keys):]
    col = {name: keys.index(name) for name in axes}
    index_of = {a: {str(v): i for i, v in enumerate(labels[a])} for a in (labels or {})}
    pos, tok = keys.index("position") if "position" in keys else None, keys.index("token") if "token" in keys else None
    rows: dict[int, dict] = {}
    for rec in reader:
        i = int(rec[0])
        row = rows.setdefault(i, {"index": i, "name": rec[1], "tokens": [""] * int(rec[2]), "cells": {}})
        if pos is not None and rec[pos] != "":
            row["tokens"][int(rec[pos])] = rec[tok]
        cell = tuple(index_of[a][rec[col[a]]] if a in index_of else int(rec[col[a]]) for a in axes)
        row["cells"][cell] = [float(v) for v in rec[len(keys):]]
    out = []
    for row in rows.values():
        shape = tuple(1 + max(c[k] for c in row["cells"]) for k in range(len(axes)))
        row["metrics"] = {m: np.array([row["cells"][c][k] for c in np.ndindex(shape)]).reshape(shape)
                          for k, m in enumerate(metrics)}
        del row["cells"]
        out.append(row)
    return metrics, sorted(out, key=lambda r: r["index"])


def heatmap_png(g: Aggregate, title: str, ylabel: str, label: str = "mean recovery") -> bytes:
    """Mean recovery per cell (blue = restored to clean, as in the single-pair heatmap), or the mean raw
    value where the analysis has no recovery (label names it), each cell annotated with its interval
    when the grid is small; cells whose interval contains 0 are hatched."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    mean, low, high = g.drawn()
    L, T = mean.shape  # grid rows and columns
    peak = float(np.nanmax(np.abs(mean))) if np.isfinite(mean).any() else 0.0
    lim = max(1.0, peak) if g.has_recovery else (peak or 1.0)  # recovery's scale is 1; a raw value's its own
    fig = figure(min(3.0 + 0.95 * T, 40), max(3.4, 2.4 + 0.75 * L))
    ax = fig.add_subplot()
    # recovery: blue = restored, as the single-pair heatmap; a raw value: red = positive, as the toolkit's figures
    im = ax.matshow(mean, cmap="RdBu" if g.has_recovery else "RdBu_r", norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim), aspect="auto")
    for l, p in zip(*np.nonzero(g.contains_zero)):
        ax.add_patch(Rectangle((p - 0.5, l - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.45", linewidth=0))
    if L * T <= 400:  # the numbers stay legible on small grids only
        for l in range(L):
            for p in range(T):
                ink = "white" if abs(mean[l, p]) > 0.6 * lim else "black"
                two = lambda v: f"{round(float(v), 2) + 0.0:.2f}"  # noqa: E731  (no "-0.00")
                text = f"{two(mean[l, p])}\n[{two(low[l, p])}, {two(high[l, p])}]" if np.isfinite(mean[l, p]) else "n/a"
                ax.text(p, l, text,
                        ha="center", va="center", fontsize=6.5, color=ink)
    step = max(1, T // 60)
    ticks = list(range(0, T, step))
    if g.column_axis == "position":
        ax.set_xticks(ticks, [f"{g.columns[i]!r}"[1:-1] + f" ({i})" for i in ticks], rotation=90)
        ax.set_xlabel("position (clean token; * where the pairs differ)")
    elif g.column_axis == "head":
        ax.set_xticks(ticks, [f"head {g.columns[i]}" for i in ticks])
        ax.set_xlabel("head (every position at once)")
    else:
        ax.set_xticks(ticks, [g.columns[i] for i in ticks], rotation=90)
        ax.set_xlabel(g.column_axis)
    ax.set_yticks(range(L), g.rows, fontsize=8 if L > 24 else None)
    ax.xaxis.set_ticks_position("bottom")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return png_bytes(fig, dpi=110)

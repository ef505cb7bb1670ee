"""Attribution patching: every cell of a patching sweep estimated from one forward and one backward.

Method (Nanda, "Attribution patching", 2022; AtP, Kramár et al. 2024, arXiv 2403.00745): the metric
m of the base run, as a function of one activation a, is linearised at the base value,
    m(a_source) - m(a_base) ~= (a_source - a_base) . dm/da (a_base),
summed over the site's vector (C for residual sites, the head's hs for q/k/v/z, the source row T for
`pattern`; a neuron site's cell is one number, so nothing to sum; and over positions too with
all_positions). One backward gives dm/da at every layer,
head and position at once: the forward adds a zero leaf tensor to every block's site (mingpt.sites.Tap:
an exact no-op through the seam; the leaf's gradient is dm/da), and the metric is computed from the logits
with torch ops, so every metric (recovery and prob-diff included) has its gradient.

QK fix (AtP*, same paper, section 3.1.1): a query or key enters through a softmax, which saturates,
and the straight-line estimate can be far off. For q and k the new attention pattern is computed
exactly (row p with the patched query; rows p.. with the patched key in column p) and only what
follows the pattern is linearised: (pattern_new - pattern_base) . dm/dpattern.

The matrix returned holds estimated *values* of the metric (base value + estimate), on the same axes
as the exact sweep (engines.cells), so the two can be compared cell by cell; `compare` does that
(--check; the patch analysis's report shows it).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from mingpt.sites import NEURON_SITES, Tap
from patching.core import engines
from patching.core.metrics import metric_values

METHODS = ("exact", "attribution")
QK_SITES = ("q", "k")


def needed_sites(site: str, qk_fix: bool) -> list[str]:
    """What the base recording must hold beyond engines.record's: q and k for the QK fix."""
    return ["q", "k"] if qk_fix and site in QK_SITES else []


def backward_bytes(config, T: int, site: str, qk_fix: bool) -> int:
    """Estimated bytes of one estimate beside the recordings (float32, B = 1): what autograd keeps of
    the forward (~18 floats per token and channel in a block, measured, counted as 20, and twice the
    pattern where the site's gradient runs through it), a zero tap and its gradient per block, and
    for the QK fix the base pattern and the patched ones it compares."""
    L, H, C = config.n_layer, config.n_head, config.n_embd
    through_pattern = site == "pattern" or (qk_fix and site in QK_SITES)
    pattern = H * T * T
    # q/k/v/z hold H*T*hs = T*C per block too; a neuron site n_inner per position
    tap = pattern if through_pattern else T * config.n_inner if site in NEURON_SITES else T * C
    floats = L * (20 * T * C + 2 * pattern * through_pattern + 2 * tap) + config.vocab_size
    if qk_fix and site in QK_SITES:
        floats += 3 * L * pattern
    return 4 * floats


def plan(config, T: int, site: str, every: bool, max_rows: int, lse: bool, noop: torch.Tensor | None,
         qk_fix: bool, check: bool) -> engines.Plan:
    """engines.plan for an attribution estimate: the same cells; memory for the two recordings and the
    larger of the backward and (with check) the exact sweep's largest chunk."""
    exact = engines.plan(config, T, site, every, max_rows, lse, noop)
    recordings = engines.recording_bytes(config, T, site)
    work = max(backward_bytes(config, T, site, qk_fix), exact.peak_bytes - recordings if check else 0)
    return dataclasses.replace(exact, method="attribution", check=check, peak_bytes=recordings + work)


def _metric(metric: str, logits: torch.Tensor, target_id: int, foil_id: int, r_src, r_base) -> torch.Tensor:
    """The metric from last-position logits (vocab,), differentiable (patching.core.metrics.metric_values on torch
    readouts); float32 at least, float64 kept."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    r = torch.stack([x[target_id], x[foil_id], torch.logsumexp(x, -1)])
    return metric_values(metric, r, r_src.to(x), r_base.to(x))


def gradients(model, base_ids: torch.Tensor, base, site: str, metric: str, target_id: int, foil_id: int,
              r_src, r_base) -> torch.Tensor:
    """dm/da at every block's `site` of the base run (B = 1): (L, T, C) or (L, H, T, ...), batch axis
    dropped. One forward (with a zero leaf added at every block's site) and one backward."""
    L = model.config.n_layer
    like = base[site] if site in base else None
    if like is None:  # shapes of sites the recording lacks: q/k/v/z are (1, H, T, hs), pattern (1, H, T, T)
        H, T = model.config.n_head, base_ids.shape[1]
        like = torch.zeros(L, 1, H, T, T if site == "pattern" else model.config.n_embd // H,
                           device=base_ids.device, dtype=base.resid.dtype)
    taps = [Tap(l, site, like[l]) for l in range(L)]
    with torch.enable_grad():
        logits, _ = model(base_ids, patch=taps, last_only=True)
        m = _metric(metric, logits[0, -1], target_id, foil_id, r_src, r_base)
        grads = torch.autograd.grad(m, [t.zero for t in taps], allow_unused=True)
    return torch.stack([torch.zeros_like(t.zero) if g is None else g for t, g in zip(taps, grads)])[:, 0]


def estimate(model, base_ids: torch.Tensor, base, source: torch.Tensor, site: str, metric: str, target_id: int,
             foil_id: int, r_src, r_base, all_positions: bool = False, qk_fix: bool = True) -> torch.Tensor:
    """Estimated change of the metric for every cell (engines.cells' shape, float64 on the CPU).

    base: engines.record of the base run with `site` (and needed_sites) recorded; source: the value
    of every cell, batch axis dropped, as for engines.sweep."""
    if qk_fix and site in QK_SITES:
        return _qk_fixed(model, base_ids, base, source, site, metric, target_id, foil_id, r_src, r_base,
                         all_positions)
    grad = gradients(model, base_ids, base, site, metric, target_id, foil_id, r_src, r_base)
    delta = source.to(grad) - base[site][:, 0].to(grad)
    if site in NEURON_SITES:  # one cell per neuron: (L, T, N) -> (L, N, T), engines.cells' axes
        effect = (delta * grad).transpose(1, 2)
    else:
        effect = (delta * grad).sum(-1)  # (L, T) or (L, H, T): summed over the site's vector
    if all_positions:
        effect = effect.sum(-1)  # (L, H) or (L, N): every position of the head (neuron) at once
    return effect.detach().double().cpu()


def _qk_fixed(model, base_ids, base, source, site, metric, target_id, foil_id, r_src, r_base, every):
    """AtP*'s fix for q and k: the pattern exactly, then linear from the pattern on."""
    q, k = base["q"][:, 0], base["k"][:, 0]  # (L, H, T, hs)
    scale = 1.0 / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()

    def pattern(qq, kk):  # (..., T, hs) x (..., T, hs) -> (..., T, T), causal softmax as the model's attend
        return torch.softmax(((qq @ kk.transpose(-2, -1)) * scale).masked_fill(~mask, float("-inf")), dim=-1)

    base_pattern = pattern(q, k)  # (L, H, T, T)
    grad = gradients(model, base_ids, base, "pattern", metric, target_id, foil_id, r_src, r_base)  # (L, H, T, T)
    src = source.to(q)
    if site == "q":
        # a patched query at p changes row p only: row p of softmax(q_src k_base^T)
        change = ((pattern(src, k) - base_pattern) * grad).sum(-1)  # (L, H, T): row p = cell p
        return (change.sum(-1) if every else change).detach().double().cpu()
    if every:  # every key at once: every row changes
        return ((pattern(q, src) - base_pattern) * grad).sum((-1, -2)).detach().double().cpu()
    # a patched key at p changes column p of the scores, in rows p..T-1
    out = torch.empty(q.shape[:3], dtype=torch.float64)
    for p in range(T):
        kk = k.clone()
        kk[:, :, p] = src[:, :, p]
        out[:, :, p] = ((pattern(q, kk) - base_pattern) * grad).sum((-1, -2)).detach().double().cpu()
    return out


# ----------------------------------------------------------------------------- against the exact sweep


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as Spearman's correlation wants)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None  # undefined for a constant
    return float(np.corrcoef(a, b)[0, 1])


def compare(exact: np.ndarray, estimated: np.ndarray, base_value: float, live: np.ndarray, axes: list[str],
            tokens: list[str], k: int = 10, source_value: float = 0.0) -> dict:
    """How wrong the estimate was, over the live cells (those that patch a different value).

    exact, estimated: metric values per cell; live: bool, same shape. Effects are value - base_value.
    Effects within the noise floor (1e-5 of the values' scale, which includes the source run's
    value: float32 rounding of the exact sweep,
    ~1e-7 relative, is far below it) count as 0 for the ranks, and the top k are taken among the
    cells whose exact effect is above it: ranking rounding noise would say nothing."""
    e, a = (exact - base_value)[live], (estimated - base_value)[live]
    cells = np.argwhere(live)
    err = np.abs(a - e)
    n = len(e)
    noise = 1e-5 * max(abs(base_value), abs(source_value), float(np.abs(exact).max(initial=0.0)))
    e0, a0 = np.where(np.abs(e) > noise, e, 0.0), np.where(np.abs(a) > noise, a, 0.0)
    above = np.flatnonzero(e0)
    kk = min(k, len(above))
    top_exact = set(above[np.argsort(-np.abs(e0[above]), kind="stable")[:kk]].tolist())
    top_est = set(np.argsort(-np.abs(a0), kind="stable")[:kk].tolist())
    worst = np.argsort(-err, kind="stable")[:5]

    def cell(i):  # a cell by name: layer, (head,) (position and its token)
        named = dict(zip(axes, map(int, cells[i])))
        if "position" in named:
            named["token"] = tokens[named["position"]]
        return {**named, "exact": float(exact[tuple(cells[i])]), "estimate": float(estimated[tuple(cells[i])]),
                "error": float(err[i])}

    scale = float(np.abs(e).max()) if n else 0.0
    return {
        "cells": n, "noise_floor": noise, "cells_above_noise": int(len(above)),
        "pearson": _pearson(e, a), "spearman": _pearson(_ranks(e0), _ranks(a0)) if n else None,
        "max_abs_error": float(err.max()) if n else 0.0, "max_abs_error_cell": cell(int(worst[0])) if n else None,
        "max_abs_error_relative": float(err.max()) / scale if n and scale else None,
        "mean_abs_error": float(err.mean()) if n else 0.0, "largest_exact_effect": scale,
        "top_k": kk, "top_k_recall": len(top_exact & top_est) / kk if kk else None,
        "worst_cells": [cell(int(i)) for i in worst] if n else [],
    }

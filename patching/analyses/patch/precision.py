"""How far a half-precision sweep is from float32: the same cells patched exactly in float32.

bfloat16 keeps 8 significant bits, so a sweep in it can misplace small effects or reorder close ones.
Every bfloat16 (or float16) patch run therefore repeats a sample of its cells, the strongest ones and
a few drawn at random, as plain float32 forwards (one Patch each, the loop oracle) on the same weights
loaded in float32, and reports the largest error and how well the two orders agree.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from patching.core import engines
from patching.core.context import ModelSpec, load
from patching.core.metrics import metric_values, readout

N_TOP, N_RANDOM = 6, 4  # cells sampled: the strongest, and a few others drawn with a fixed seed


@lru_cache(maxsize=1)
def float32_model(name: str, device: str):
    """The run's weights in float32 (kept for the next pair of a batch or study)."""
    return load(ModelSpec(model=name, device=device, dtype="float32")).model


def sample(matrix: np.ndarray, base_value: float, seed: int = 0) -> list[int]:
    """Flat indices: the N_TOP cells that move the metric furthest from the base value, then N_RANDOM
    of the rest (fewer where the matrix is small)."""
    effect = np.abs(np.nan_to_num(matrix.ravel() - base_value))
    order = np.argsort(-effect, kind="stable")
    top = [int(i) for i in order[:N_TOP]]
    rest = np.setdiff1d(np.arange(matrix.size), top)
    drawn = np.random.default_rng(seed).choice(rest, size=min(N_RANDOM, rest.size), replace=False)
    return top + sorted(int(i) for i in drawn)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable") for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def compare(ctx, prep, options, matrix: np.ndarray, own_base: float, base: str, src: str) -> dict:
    """The float32 reference of a sample of a half-precision sweep's cells (matrix: its metric values,
    axes as the sweep's; own_base: its base run's value), as results.json's `precision`."""
    model = float32_model(ctx.spec.model, ctx.device.type)  # ModelSpec names a kind of device, not cuda:0
    ids = {"clean": torch.tensor([prep.clean_ids], device=ctx.device),
           "corrupt": torch.tensor([prep.corrupt_ids], device=ctx.device)}
    rec = {k: engines.record(model, v, [options.site]) for k, v in ids.items()}
    r = {k: readout(rec[k].last_logits[0], prep.target_id, prep.foil_id, True).cpu() for k in rec}
    source = rec[src][options.site][:, 0]
    slabs, shape = engines.cells(options.site, source, options.all_positions)
    base_value = float(metric_values(options.metric, r[base], r[src], r[base]))
    picked = sample(matrix, own_base)
    n_pos = 1 if options.all_positions else shape[-1]
    cells = [divmod(i, n_pos) for i in picked]  # (slab, position) in cells()' order
    got = engines.loop_cells(model, ids[base], options.site, slabs, source, cells, prep.target_id, prep.foil_id,
                             True, options.all_positions)
    ref = metric_values(options.metric, got, r[src], r[base]).double().numpy()
    half = matrix.ravel()[picked].astype(np.float64)
    err = np.abs(half - ref)
    return {"reference": "float32, one plain forward per cell", "dtype": ctx.spec.dtype,
            "cells": [{"cell": [int(x) for x in np.unravel_index(i, matrix.shape)], "value": float(h),
                       "float32": float(f)} for i, h, f in zip(picked, half, ref)],
            "n_top": min(N_TOP, len(picked)), "max_abs_error": float(err.max(initial=0.0)),
            "largest_effect": float(np.abs(ref - base_value).max(initial=0.0)),
            "spearman": _spearman(half, ref),
            "same_strongest": bool(picked and np.argmax(np.abs(half - own_base)) == np.argmax(np.abs(ref - base_value)))}

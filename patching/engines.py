"""Sweep engines: patch every (layer, position) of the corrupt run with the clean run's value.

Both engines return, for each patch, a *readout* of the corrupt run's last position: the target's
logit, the foil's logit and the log-sum-exp of all logits (NaN when no metric needs it). Metrics are
computed from readouts in one place (`metric_values`), so the engines cannot disagree on them.

- `loop`: the oracle. One full forward per patch, exactly the seed exercise's double loop.
- `fast`: the same numbers from `GPT.forward_patched`, which resumes from the corrupt run's recording
  at block l+1, recomputes only positions >= p and unembeds only the two wanted columns; patches are
  batched in chunks whose row count is bounded, so memory stays bounded for any prompt length.
  Columns where the clean and corrupt residuals are identical at every layer (positions before the
  first differing token) are no-ops: their value is the corrupt run's, with no forward at all.

Only the record/patch seam of mingpt.model is used here: forward(record=..., patch=...) and
forward_patched(...).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from mingpt.model import GPT, Patch, Recording

METRICS = {
    "logit-diff": "logit(foil) - logit(target)",
    "prob-diff": "p(foil) - p(target)",
    "target-logit": "logit(target)",
    "recovery": "(patched - corrupt) / (clean - corrupt) of logit(foil) - logit(target)",
}
ENGINES = ("fast", "loop")
Progress = Callable[[int, int], None]  # (patches done, patches in all)


def needs_lse(metric: str) -> bool:
    return metric == "prob-diff"


@torch.no_grad()
def record(model: GPT, ids: torch.Tensor) -> Recording:
    """One plain forward that keeps the residual stream, keys and values, and last logits."""
    rec = Recording(kv=True)
    model(ids, record=rec, last_only=True)
    return rec


def readout(logits: torch.Tensor, target_id: int, foil_id: int, lse: bool) -> torch.Tensor:
    """(..., vocab) last-position logits -> (..., 3): target logit, foil logit, log-sum-exp."""
    logits = logits.float()
    z = torch.logsumexp(logits, dim=-1) if lse else torch.full(logits.shape[:-1], math.nan, device=logits.device)
    return torch.stack([logits[..., target_id], logits[..., foil_id], z], dim=-1)


def metric_values(metric: str, r: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """Metric of readouts r (..., 3); clean/corrupt are the unpatched runs' readouts (3,)."""
    t, f, z = r.unbind(-1)
    if metric == "logit-diff":
        return f - t
    if metric == "target-logit":
        return t
    if metric == "prob-diff":
        return torch.exp(f - z) - torch.exp(t - z)
    if metric == "recovery":
        lo, hi = corrupt[1] - corrupt[0], clean[1] - clean[0]
        return (f - t - lo) / (hi - lo)
    raise AssertionError(f"unknown metric {metric}")  # validated by the caller


@torch.no_grad()
def loop_sweep(model: GPT, corrupt_ids: torch.Tensor, clean: Recording, target_id: int, foil_id: int,
               lse: bool, progress: Progress | None = None) -> torch.Tensor:
    """The oracle: (n_layer, T, 3) readouts from one forward per patch."""
    L, T = clean.resid.shape[0], corrupt_ids.shape[1]
    out = torch.empty(L, T, 3)
    for l in range(L):
        for p in range(T):
            logits, _ = model(corrupt_ids, patch=Patch(l, p, clean.resid[l, 0, p]), last_only=True)
            out[l, p] = readout(logits[0, -1], target_id, foil_id, lse).cpu()
            if progress:
                progress(l * T + p + 1, L * T)
    return out


def plan_chunks(n_layer: int, T: int, positions: list[int], max_rows: int,
                max_patches: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Split the (all layers) x positions grid into (layers, positions) chunks of at most max_rows
    suffix rows (and max_patches patches); a position whose suffix alone is too big for all layers
    gets chunks of fewer layers."""
    chunks, cur, rows = [], [], 0
    per_patch_cap = max_patches or n_layer * T
    for p in positions:
        S = T - p
        fits_rows = (rows + S) * n_layer <= max_rows
        fits_count = (len(cur) + 1) * n_layer <= per_patch_cap
        if cur and not (fits_rows and fits_count):
            chunks.append((list(range(n_layer)), cur))
            cur, rows = [], 0
        if S * n_layer > max_rows or n_layer > per_patch_cap:  # too big for one chunk of all layers
            step = max(1, min(max_rows // S, per_patch_cap))
            chunks += [(list(range(a, min(a + step, n_layer))), [p]) for a in range(0, n_layer, step)]
            continue
        cur.append(p)
        rows += S
    if cur:
        chunks.append((list(range(n_layer)), cur))
    return chunks


@torch.no_grad()
def fast_sweep(model: GPT, corrupt: Recording, clean: Recording, target_id: int, foil_id: int, lse: bool,
               max_rows: int = 8192, progress: Progress | None = None) -> torch.Tensor:
    """(n_layer, T, 3) readouts equal to loop_sweep's, from batched suffix-only recomputation."""
    L, T = clean.resid.shape[0], clean.resid.shape[2]
    corrupt_r = readout(corrupt.last_logits[0], target_id, foil_id, lse).cpu()
    out = corrupt_r.repeat(L, T, 1)  # no-op patches keep the corrupt run's readout
    same = (clean.resid[:, 0] == corrupt.resid[:, 0]).all(-1).all(0)  # (T,) identical at every layer
    positions = [p for p in range(T) if not bool(same[p])]
    ids = None if lse else torch.tensor([target_id, foil_id])
    chunks = plan_chunks(L, T, positions, max_rows, max_patches=512 if lse else None)
    done, total = 0, L * len(positions)
    for layers, pos in chunks:
        values = clean.resid[layers][:, 0][:, pos]  # (nL, nP, C) clean vectors for these patches
        got = model.forward_patched(corrupt, layers, pos, values, ids)  # (nL, nP, K)
        r = readout(got, 0, 1, False) if ids is not None else readout(got, target_id, foil_id, True)
        out[torch.tensor(layers)[:, None], torch.tensor(pos)[None, :]] = r.cpu()
        done += len(layers) * len(pos)
        if progress:
            progress(done, total)
    return out

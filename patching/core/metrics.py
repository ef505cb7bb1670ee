"""Metrics, defined once from readouts, and the directions of patching.

A *readout* of a run is its last position's target logit, foil logit and log-sum-exp of all logits
(NaN when no metric needs it). Every engine returns readouts; every metric is computed from them
here, so engines cannot disagree on a metric. Recovery is (patched - own) / (other - own) of the
logit difference: 0 = the patched run's own value, 1 = the other run's; it is undefined where the two
runs give the same logit difference up to rounding (`check_recovery`, the one rule for every analysis).
"""
from __future__ import annotations

import math

import torch

from mingpt.errors import quote
from patching.core.errors import PatchingError

METRICS = {
    "logit-diff": "logit(foil) - logit(target)",
    "prob-diff": "p(foil) - p(target)",
    "target-logit": "logit(target)",
    "recovery": "(patched - corrupt) / (clean - corrupt) of logit(foil) - logit(target)",
}
DIRECTIONS = {"denoise": "clean values patched into the corrupt run (is this activation sufficient?)",
              "noise": "corrupt values patched into the clean run (is this activation necessary?)"}


def needs_lse(metric: str) -> bool:
    return metric == "prob-diff"


def readout(logits: torch.Tensor, target_id: int, foil_id: int, lse: bool) -> torch.Tensor:
    """(..., vocab) last-position logits -> (..., 3): target logit, foil logit, log-sum-exp."""
    logits = logits.float()
    z = torch.logsumexp(logits, dim=-1) if lse else torch.full(logits.shape[:-1], math.nan, device=logits.device)
    return torch.stack([logits[..., target_id], logits[..., foil_id], z], dim=-1)


def metric_values(metric: str, r: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """Metric of readouts r (..., 3); clean/corrupt are the unpatched runs' readouts (3,) (for recovery:
    the run whose value is 1 and the one whose value is 0)."""
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


def indistinct(r_clean: torch.Tensor, r_corrupt: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the clean and corrupt logit differences are equal up to rounding of logits this size.
    Logits carry rounding errors accumulated over every block (float32 kernels differ by ~1e-6 on
    GPT-2's logits), so a gap below 1e-4 of the largest logit (8 ulps in half precision) is noise,
    and dividing by it gives meaningless recoveries like 2.0 or -1.0."""
    scale = float(torch.stack([r_clean[:2], r_corrupt[:2]]).abs().max())
    gap = abs(float((r_clean[1] - r_clean[0]) - (r_corrupt[1] - r_corrupt[0])))
    return gap <= max(1e-4, 8 * torch.finfo(dtype).eps) * max(scale, 1e-30)


def check_recovery(r_clean: torch.Tensor, r_corrupt: torch.Tensor, dtype: torch.dtype):
    """Refuse a recovery that is undefined: both runs give the same logit difference up to rounding."""
    if indistinct(r_clean, r_corrupt, dtype):
        d_clean, d_corrupt = float(r_clean[1] - r_clean[0]), float(r_corrupt[1] - r_corrupt[0])
        raise PatchingError(f"recovery is undefined here: the clean and corrupt runs give the same logit difference "
                            f"up to float rounding ({d_clean:.6g} vs {d_corrupt:.6g}), so the pair does not change "
                            f"the answer; use --metric logit-diff.")


def finite(values: torch.Tensor, what: str, model=None):
    """A damaged checkpoint (a NaN weight, a negative layer_norm_epsilon) makes every number NaN: say so,
    naming the damaged tensor when there is one."""
    if not bool(torch.isfinite(values).all()):
        bad = model.damaged() if model is not None and hasattr(model, "damaged") else None
        why = f"tensor {quote(bad, 60)} holds NaN or infinite values" if bad else \
            "the model's weights or config are damaged"
        raise PatchingError(f"{what} are not finite (NaN or infinity): {why}; re-download or re-save the checkpoint.")

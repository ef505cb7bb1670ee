"""`--unit all`'s bookkeeping for one layer, one batch at a time: every unit's top-k, density, mean,
exact histogram, and its values at a fixed uniform sample of tokens.

A batch arrives as a (tokens, units) float32 tensor a. The passes over a are few and plain, since the
whole point is to cost little beside the forward that made a:
- blocked maxima (the max of every 16 rows per unit), the blocked minimum and the sum per unit
  (a matrix-vector product): three reductions along the token axis;
- the top-k (scan.TopK.fold): a unit whose batch maximum is below its k-th value cannot change, and
  for one that can, only the 16-row blocks whose maximum reaches that value are read again;
- the histogram: one multiply, one ceil, one add and one integer conversion into a reused buffer,
  then one bincount of the (bin, unit) pairs.

Histogram bins (per unit, exact, resumable). A unit's bins are 2**e wide and aligned on multiples of
2**e: bin j holds the values x with ceil(x / 2**e) == start + j, that is the interval
((start + j - 1) 2**e, (start + j) 2**e], for j < HIST_BINS. Multiplying a float32 by a power of two
and taking the ceiling is exact, so a token's bin is a function of its value alone. When a batch
brings a value outside a unit's bins, e grows (each new bin is a union of whole old bins, because the
new edges are multiples of the old width) and the bins are recentred on the range seen so far; old
counts move to the bin that contains them, so the counts always equal a histogram of every value seen,
on the current bins. e is always the smallest that holds the range seen so far, so a unit's values
span about 32 to 64 bins. Whether a value lies above the density threshold is read from the bins when
the threshold is one of their edges (always for 0, the default), saving a pass; otherwise it is one
comparison more. Without histograms (--no-histograms) that comparison is the only pass beside the
reductions and the top-k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from patching.analyses.top.scan import TopK, block_maxima
from patching.core.errors import PatchingError

HIST_BINS = 64
E_MIN, E_MAX = -126, 23  # 2**-e stays a normal float32; up to 2**23 wide every normal value's ceiling is exact
UNSET = E_MIN - 1  # the exponent of a unit that has seen no value yet
KEY_LIMIT = 1 << 22  # |ceil(x / 2**e)| stays below this, so keys and starts are exact in float32
EXACT = 1 << 24  # float32 holds every integer below this


class NonFinite(Exception):
    """The batch holds NaN or an infinity (the caller names the site and layer)."""


@dataclass(frozen=True)
class Layer:
    """One layer's bookkeeping over the tokens folded in so far; `fold` returns a new one (so a batch
    counts only once every layer has seen it)."""

    top: TopK
    above: np.ndarray  # (U,) int64: tokens above the threshold
    total: np.ndarray  # (U,) float64: the sum of the values (each batch's float32 sum, added in float64)
    low: np.ndarray  # (U,) float32: the smallest value seen (+inf before any)
    high: np.ndarray  # (U,) float32: the largest value seen (-inf before any)
    exponent: np.ndarray  # (U,) int32: bins are 2**exponent wide (UNSET before any value)
    start: np.ndarray  # (U,) int64: bin j holds the x with ceil(x / 2**exponent) == start + j
    hist: np.ndarray  # (U, HIST_BINS) int64

    @classmethod
    def fresh(cls, units: int, k: int, histograms: bool = True) -> "Layer":
        """Nothing seen yet; without histograms, `hist` has no bins (and is never filled)."""
        return cls(TopK(units, k), np.zeros(units, np.int64), np.zeros(units, np.float64),
                   np.full(units, np.inf, np.float32), np.full(units, -np.inf, np.float32),
                   np.full(units, UNSET, np.int32), np.zeros(units, np.int64),
                   np.zeros((units, HIST_BINS if histograms else 0), np.int64))


class Scratch:
    """Buffers reused from batch to batch: a fresh 25 MB tensor per pass costs more in page faults than
    the pass itself."""

    def __init__(self):
        self._f = self._i = None

    def get(self, n: int, units: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        size = n * units
        if self._f is None or self._f.numel() < size or self._f.device != device:
            self._f = torch.empty(size, device=device)
            self._i = torch.empty(size, dtype=torch.int32, device=device)
        return self._f[:size].view(n, units), self._i[:size].view(n, units)


def keys(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """ceil(x / 2**e), exactly (x float32 widened to float64, a power-of-two scaling)."""
    return np.ceil(np.ldexp(x.astype(np.float64), -e.astype(np.int32)))


def _fit(lo: np.ndarray, hi: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smallest exponents >= e whose HIST_BINS bins hold [lo, hi] with keys below KEY_LIMIT, and the
    bins' starts, centred on the range (room to grow either way before the next regrid)."""
    lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
    with np.errstate(divide="ignore"):
        e = np.maximum(e, np.ceil(np.log2((hi64 - lo64) / (HIST_BINS - 1))))  # -inf for an empty range
        e = np.maximum(e, np.ceil(np.log2(np.maximum(np.abs(lo64), np.abs(hi64)) / KEY_LIMIT)))
    e = e.astype(np.int64)
    while True:  # the estimate is at most a step or two short (ceilings at both ends)
        klo, khi = keys(lo, e), keys(hi, e)
        bad = (khi - klo > HIST_BINS - 1) | (np.maximum(np.abs(klo), np.abs(khi)) > KEY_LIMIT)
        if not bad.any():
            break
        e = e + bad
    if e.max() > E_MAX:
        raise PatchingError(f"the model produced values of about {float(np.abs(np.r_[lo64, hi64]).max()):.3g}, "
                            f"too large for the index's histograms: its weights may be damaged.")
    klo, khi = klo.astype(np.int64), khi.astype(np.int64)
    return e.astype(np.int32), klo - (HIST_BINS - 1 - (khi - klo)) // 2


def regrid(low, high, exponent, start, hist):
    """Bins that hold [low, high] for every unit (the range seen so far, this batch included): units
    already covered keep theirs; the others get wider or recentred bins and their counts moved."""
    set_ = exponent != UNSET
    e = np.where(set_, exponent, E_MIN)
    klo, khi = keys(low, e), keys(high, e)
    need = ~set_ | (klo < start) | (khi > start + HIST_BINS - 1)
    if not need.any():
        return exponent, start, hist
    idx = np.nonzero(need)[0]
    e_new, c_new = _fit(low[idx], high[idx], e[idx])
    exponent, start, hist = exponent.copy(), start.copy(), hist.copy()
    old = hist[idx]
    moved = np.zeros_like(old)
    if old.any():
        # old bin j holds ceil(x / w) == start + j; in bins 2**d times wider that is ceil((start + j) / 2**d)
        d = np.where(set_[idx], e_new - exponent[idx], 0).astype(np.int64)
        m = start[idx][:, None] + np.arange(HIST_BINS)
        to = -((-m) >> d[:, None]) - c_new[:, None]
        rows, cols = np.nonzero(old)
        to = to[rows, cols]
        assert ((to >= 0) & (to < HIST_BINS)).all(), "a regrid lost counts"
        np.add.at(moved, (rows, to), old[rows, cols])
    exponent[idx], start[idx], hist[idx] = e_new, c_new, moved
    return exponent, start, hist


def batch_hist(a: torch.Tensor, exponent: np.ndarray, start: np.ndarray, scratch: Scratch) -> np.ndarray:
    """(U, HIST_BINS) counts of this batch on the given bins (which must hold every value of a)."""
    n, U = a.shape
    dev = a.device
    f, i = scratch.get(n, U, dev)
    torch.mul(a, torch.from_numpy(np.ldexp(np.float32(1), -exponent)).to(dev), out=f)  # exact: a power of two
    f.ceil_()
    # flat index (key - start) * U + unit: bin-major, so one token's units land on neighbouring counters
    if (int(np.abs(start).max()) + HIST_BINS) * U < EXACT:  # key * U stays exact: one pass
        torch.add(torch.from_numpy((np.arange(U) - start * U).astype(np.float32)).to(dev), f, alpha=U, out=f)
    else:
        f.sub_(torch.from_numpy(start.astype(np.float32)).to(dev))
        torch.add(torch.arange(U, dtype=torch.float32, device=dev), f, alpha=U, out=f)
    i.copy_(f)
    counts = torch.bincount(i.view(-1), minlength=HIST_BINS * U)
    assert counts.numel() == HIST_BINS * U, "a value fell outside its unit's bins"
    return counts.cpu().numpy().reshape(HIST_BINS, U).T


def fold(layer: Layer, a: torch.Tensor, document: np.ndarray, position: np.ndarray, threshold: float,
         scratch: Scratch, profile: dict | None = None) -> Layer:
    """`layer` with one batch folded in: a (n tokens, U units) float32, each token's (document, position);
    the histogram too unless the layer keeps none."""
    clock = time.process_time if profile is not None else None  # CPU time: steadier on a shared machine
    t0 = clock() if clock else 0.0
    blocks = block_maxima(a)
    mx = blocks.amax(0).cpu().numpy()
    mn = block_maxima(a, torch.amin).amin(0).cpu().numpy()
    sm = (a.new_ones(a.shape[0]) @ a).cpu().numpy()  # a matrix-vector product: the quickest sum over tokens
    # NaN and infinities reach the maximum, the minimum or the sum: no pass of its own
    if not (np.isfinite(mx).all() and np.isfinite(mn).all() and np.isfinite(sm).all()):
        raise NonFinite()
    t1 = clock() if clock else 0.0
    top = layer.top.fold(a, document, position, blocks)
    t2 = clock() if clock else 0.0
    low, high = np.minimum(layer.low, mn), np.maximum(layer.high, mx)
    exponent, start, hist = layer.exponent, layer.start, layer.hist
    h = None
    if hist.shape[1]:  # histograms kept
        exponent, start, hist = regrid(low, high, exponent, start, hist)
        h = batch_hist(a, exponent, start, scratch)
        hist = hist + h
    t3 = clock() if clock else 0.0
    thr = np.float32(threshold)  # a float32 tensor compares with its scalar in float32
    p = np.ldexp(np.float64(thr), -exponent.astype(np.int32))
    if h is not None and np.all(p == np.floor(p)) and np.abs(p).max() < KEY_LIMIT:
        # the threshold is a bin edge of every unit: above it means a key of at least p + 1
        first = np.clip(p.astype(np.int64) + 1 - start, 0, HIST_BINS)
        tail = np.concatenate([np.cumsum(h[:, ::-1], axis=1)[:, ::-1], np.zeros((len(h), 1), np.int64)], axis=1)
        up = tail[np.arange(len(h)), first]
    else:
        f, _ = scratch.get(*a.shape, a.device)
        torch.gt(a, float(thr), out=f)
        up = (a.new_ones(a.shape[0]) @ f).cpu().numpy().astype(np.int64)  # sums of 0 and 1 below 2**24: exact
    t4 = clock() if clock else 0.0
    if profile is not None:
        for key, dt in (("reductions", t1 - t0), ("top-k", t2 - t1), ("histogram", t3 - t2), ("density", t4 - t3)):
            profile[key] = profile.get(key, 0.0) + dt
    return Layer(top, layer.above + up, layer.total + sm.astype(np.float64), low, high, exponent, start, hist)


# ----------------------------------------------------------------------------- the token sample


SAMPLE_TOKENS = 512


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing hash (Steele, Lea and Flood's SplitMix64 finaliser), wrapping uint64 arithmetic."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_tokens(offsets: np.ndarray, size: int | None = None, chunk: int = 1 << 20) -> np.ndarray:
    """The corpus indices (offsets[document] + position, ascending) of a uniform sample of `size` tokens
    (SAMPLE_TOKENS): those with the smallest hash of (document, position), ties by index. A function of
    the corpus alone, so a resumed index samples the same tokens; the whole corpus when it is smaller.
    The corpus is hashed `chunk` tokens at a time, keeping the best `size` so far (bounded memory)."""
    size = SAMPLE_TOKENS if size is None else size
    n = int(offsets[-1])
    if n <= size:
        return np.arange(n, dtype=np.int64)
    best_h, best_i = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    for g0 in range(0, n, chunk):
        g = np.arange(g0, min(n, g0 + chunk), dtype=np.int64)
        doc = np.searchsorted(offsets, g, side="right") - 1
        with np.errstate(over="ignore"):
            h = splitmix64((doc.astype(np.uint64) << np.uint64(32)) | (g - offsets[doc]).astype(np.uint64))
        if len(h) > size:
            keep = np.argpartition(h, size - 1)[:size]
            h, g = h[keep], g[keep]
        h, g = np.concatenate([best_h, h]), np.concatenate([best_i, g])
        order = np.lexsort((g, h))[:size]
        best_h, best_i = h[order], g[order]
    return np.sort(best_i)

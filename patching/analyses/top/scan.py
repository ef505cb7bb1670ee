"""One pass of the model over a corpus: units, their activation at every token, and top-k bookkeeping.

A unit is one number per token:
- `mlp_post:L.N`: neuron N of block L's MLP, its hidden activation after the GELU (mingpt.sites);
- `z:L.H`: the norm of head H's output z (its mix of values, before attn.c_proj) at that token;
- `pattern:L.H`: the largest attention weight head H pays from that token (the destination) to any
  earlier document token of its window (the BOS and the token itself excluded; 0 at a window's first);
- `SITE:L@FILE.npy`: the dot product of block L's SITE (a residual site, or mlp_post) with the vector
  in FILE (its width);
- `all`: every unit of one site (mlp_post, z or pattern) at every layer at once.

The model is read through its seam only: an `Edit` that returns what it is given (so nothing changes)
sees each wanted block's site during an ordinary forward, keeps one unit's values (a single unit) or
folds every unit's values into a bounded top-k (all units), and is dropped when the call ends.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mingpt.errors import quote
from mingpt.sites import ALL_SITES, SITES, Edit
from patching.core.errors import PatchingError
from patching.core.serial import expand

UNIT_SITES = ("mlp_post", "z", "pattern")  # sites with units of their own (neurons, heads)
DIRECTION_SITES = tuple(s for s, layout in ALL_SITES.items() if layout in ("btc", "btn"))


@dataclass(frozen=True)
class Unit:
    site: str
    layer: int
    index: int | None = None  # neuron or head; None for a direction
    file: str | None = None  # a direction's .npy file

    @property
    def name(self) -> str:
        return f"{self.site}:{self.layer}@{self.file}" if self.file else f"{self.site}:{self.layer}.{self.index}"

    @property
    def kind(self) -> str:
        return "direction" if self.file else "neuron" if self.site == "mlp_post" else "head"


def width(site: str, config) -> int:
    """Units per layer of a unit site: neurons or heads."""
    return config.n_inner if site == "mlp_post" else config.n_head


def parse_unit(text: str, config) -> Unit | str:
    """A --unit value as a Unit (checked against the model), or "all"."""
    if not isinstance(text, str):
        raise PatchingError(f"unit must be text such as mlp_post:0.5, got {quote(text)}.")
    if text == "all":
        return "all"
    L = config.n_layer
    m = re.fullmatch(r"([a-z_]+):(\d+)\.(\d+)", text)
    if m:
        site, layer, index = m.group(1), int(m.group(2)), int(m.group(3))
        if site not in UNIT_SITES:
            raise PatchingError(f"unit {quote(text, 60)}: a unit L.N is a neuron (mlp_post:L.N) or a head (z:L.H, "
                                f"pattern:L.H); a direction at another site is SITE:L@FILE.npy.")
        n = width(site, config)
        what = ("neuron" if site == "mlp_post" else "head") + "s"
        if layer >= L or index >= n:
            raise PatchingError(f"unit {quote(text, 60)} does not exist: this model has layers 0..{L - 1} and "
                                f"{what} 0..{n - 1}.")
        return Unit(site, layer, index)
    m = re.fullmatch(r"([a-z_]+):(\d+)@(.+\.npy)", text)
    if m:
        site, layer, file = m.group(1), int(m.group(2)), m.group(3)
        if site not in DIRECTION_SITES:
            raise PatchingError(f"unit {quote(text, 60)}: a direction is read at {', '.join(DIRECTION_SITES)}.")
        if layer >= L:
            raise PatchingError(f"unit {quote(text, 60)} does not exist: this model has layers 0..{L - 1}.")
        return Unit(site, layer, None, file)
    raise PatchingError(f"unit {quote(text, 60)} is not a unit: give mlp_post:L.N, z:L.H, pattern:L.H, "
                        f"SITE:L@FILE.npy or all.")


def direction_vector(unit: Unit, config) -> torch.Tensor:
    """A direction unit's vector, checked: one finite float vector of the site's width."""
    path = expand(unit.file)
    try:
        v = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PatchingError(f"cannot read the direction {path} ({exc.__class__.__name__}): give a .npy file saved "
                            f"with numpy.save.") from None
    n = config.n_inner if unit.site == "mlp_post" else config.n_embd
    if v.ndim != 1 or v.shape[0] != n or not np.issubdtype(v.dtype, np.number):
        raise PatchingError(f"the direction {path} has shape {v.shape}, but {unit.site} is {n} wide: save one "
                            f"vector of {n} numbers.")
    if not np.isfinite(v).all():
        raise PatchingError(f"the direction {path} holds NaN or infinite values.")
    return torch.from_numpy(v.astype(np.float32))


def reduce(site: str, x: torch.Tensor, first: int, vector: torch.Tensor | None = None) -> torch.Tensor:
    """Every unit's value at every token: (B, T, units) float32 from the site's tensor of one block.
    first: the first document position of the windows (1 with a BOS): pattern units look at sources
    from there on, before the destination."""
    if vector is not None:
        return (x.float() @ vector.to(x.device))[..., None]  # (B, T, 1)
    if site == "mlp_post":
        return x.float()  # (B, T, N)
    if site == "z":
        return x.float().norm(dim=-1).transpose(1, 2)  # (B, nh, T, hs) -> (B, T, nh)
    if site == "pattern":
        return _paid(x, first)[0]
    raise AssertionError(site)


def _paid(w: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nh, T, T) pattern -> the largest weight from each destination to an earlier source at >= first,
    and that source: (B, T, nh) each (0 and -1 where there is none)."""
    T = w.shape[-1]
    s = torch.arange(T, device=w.device)
    ok = (s[None, :] < s[:, None]) & (s[None, :] >= first)  # (T dest, T source)
    v, src = w.float().masked_fill(~ok, -1.0).max(dim=-1)  # (B, nh, T)
    none = v < 0
    return v.masked_fill(none, 0.0).transpose(1, 2), src.masked_fill(none, -1).transpose(1, 2)


class Observe(Edit):
    """An edit that changes nothing: it hands each wanted block's `site` to `see(layer, x)`."""

    def __init__(self, site: str, layers, see: Callable[[int, torch.Tensor], None]):
        self.site, self._layers, self.see = site, tuple(layers), see

    def layers(self, n_layer: int):
        return self._layers

    def apply(self, x, layer, offset=0, length=None):
        assert offset == 0 and length in (None, x.shape[-2]), "a plain forward visits every site whole"
        self.see(layer, x)
        return x


@dataclass
class Batch:
    """One batch of windows as the model reads it: ids (B, T) and, for every model position, its
    document, its position in the document, and whether it is a document token (not BOS or padding)."""

    ids: torch.Tensor
    document: np.ndarray  # (B, T) int64
    position: np.ndarray  # (B, T) int64
    valid: np.ndarray  # (B, T) bool

    def where(self, offsets: np.ndarray) -> np.ndarray:
        """Every valid token's index in the corpus's end-to-end token ids, in (B, T) order."""
        return offsets[self.document[self.valid]] + self.position[self.valid]


def make_batch(corpus, wins, members: list[int], bos: bool, bos_id: int, device) -> Batch:
    b = len(members)
    T = max(wins[i].length for i in members) + (1 if bos else 0)
    ids = np.full((b, T), bos_id, dtype=np.int64)
    doc = np.zeros((b, T), dtype=np.int64)
    pos = np.zeros((b, T), dtype=np.int64)
    valid = np.zeros((b, T), dtype=bool)
    f = 1 if bos else 0
    for r, i in enumerate(members):
        w = wins[i]
        ids[r, f:f + w.length] = corpus.document(w.document)[w.start:w.start + w.length]
        doc[r] = w.document
        pos[r, f:f + w.length] = np.arange(w.start, w.start + w.length)
        valid[r, f:f + w.length] = True
    return Batch(torch.from_numpy(ids).to(device), doc, pos, valid)


# ----------------------------------------------------------------------------- bounded top-k


class TopK:
    """Every unit's k largest values over the tokens seen so far, ties broken by (document, position):
    values (U, k) float32 (-inf where fewer than k were seen), document and position (U, k) int64 (-1
    there). `fold` adds one batch exactly, whatever the order batches come in; memory is O(U k) plus
    the batch's candidates."""

    def __init__(self, units: int, k: int):
        self.k = k
        self.values = np.full((units, k), -np.inf, dtype=np.float32)
        self.document = np.full((units, k), -1, dtype=np.int64)
        self.position = np.full((units, k), -1, dtype=np.int64)

    @classmethod
    def of(cls, values, document, position) -> "TopK":
        t = cls(values.shape[0], values.shape[1])
        t.values, t.document, t.position = values, document, position
        return t

    def fold(self, a: torch.Tensor, document: np.ndarray, position: np.ndarray) -> "TopK":
        """The top-k of what was seen and of a (n tokens, U units) with each token's (document, position):
        a new TopK (self is left as it was)."""
        n, U = a.shape
        k = self.k
        kth = torch.from_numpy(self.values[:, -1]).to(a.device)  # (U,) -inf while not full
        # nothing below the old k-th value can enter; a value equal to it may, on its (document, position)
        full = bool(torch.isfinite(kth).all())
        tok = col = None
        if full:  # the usual case once every unit is full: few tokens pass its k-th value
            tok, col = (a >= kth[None, :]).nonzero(as_tuple=True)
            if len(tok) == 0:
                return self
        if full and len(tok) <= 2 * k * U:
            act_, col = torch.unique(col, return_inverse=True)
            active, sub = act_, None
            vals_ = a[tok, act_[col]]
        else:  # early batches: the merged k-th value is also at least the batch's own k-th
            vk = torch.topk(a, min(k, n), dim=0).values  # (min(k, n), U), largest first
            thr = torch.maximum(kth, vk[-1]) if n >= k else kth
            active = (vk[0] >= thr).nonzero().squeeze(1)  # units the batch can change
            if active.numel() == 0:
                return self
            sub = a[:, active]  # (n, A)
            tok, col = (sub >= thr[active][None, :]).nonzero(as_tuple=True)
            vals_ = sub[tok, col]
        tok, col = tok.cpu().numpy(), col.cpu().numpy()
        act = active.cpu().numpy()
        unit = act[col]
        vals = vals_.cpu().numpy()
        # the old entries of those units join the contest
        old_v, old_d, old_p = self.values[act].ravel(), self.document[act].ravel(), self.position[act].ravel()
        old_u = np.repeat(act, k)
        keep = old_d >= 0
        u = np.concatenate([unit, old_u[keep]])
        v = np.concatenate([vals.astype(np.float32), old_v[keep]])
        d = np.concatenate([document[tok], old_d[keep]])
        p = np.concatenate([position[tok], old_p[keep]])
        order = np.lexsort((p, d, -v.astype(np.float64), u))
        u, v, d, p = u[order], v[order], d[order], p[order]
        start = np.searchsorted(u, u, side="left")  # each entry's rank within its unit
        rank = np.arange(len(u)) - start
        sel = rank < k
        out = TopK.of(self.values.copy(), self.document.copy(), self.position.copy())
        out.values[act], out.document[act], out.position[act] = -np.inf, -1, -1
        out.values[u[sel], rank[sel]] = v[sel]
        out.document[u[sel], rank[sel]] = d[sel]
        out.position[u[sel], rank[sel]] = p[sel]
        return out


def brute_top(values: np.ndarray, document: np.ndarray, position: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, ties by (document, position): a full sort (the reference)."""
    return np.lexsort((position, document, -values.astype(np.float64)))[:k]

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
from mingpt.sites import ALL_SITES, Edit
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


BLOCK_ROWS = 16  # tokens per block of the blocked maxima: small blocks, little to read again (block_maxima)


def block_maxima(a: torch.Tensor, op=torch.amax) -> torch.Tensor:
    """(ceil(n / BLOCK_ROWS), U): every unit's maximum (or `op`, e.g. torch.amin) over each block of
    BLOCK_ROWS tokens of a (n, U). One pass, three times quicker on CPU than a.amax(0) (which strides
    across rows), and it says where a unit's large values are."""
    n, U = a.shape
    whole = n // BLOCK_ROWS * BLOCK_ROWS
    parts = [op(a[:whole].reshape(-1, BLOCK_ROWS, U), 1)] if whole else []
    if whole < n:
        parts.append(op(a[whole:], 0, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
        t = cls.__new__(cls)
        t.k, t.values, t.document, t.position = values.shape[1], values, document, position
        return t

    def fold(self, a: torch.Tensor, document: np.ndarray, position: np.ndarray,
             blocks: torch.Tensor | None = None) -> "TopK":
        """The top-k of what was seen and of a (n tokens, U units) with each token's (document, position):
        a new TopK (self is left as it was). blocks: a's block_maxima, when the caller has them."""
        n, U = a.shape
        k = self.k
        if n == 0:
            return self
        blocks = block_maxima(a) if blocks is None else blocks
        kth = torch.from_numpy(self.values[:, -1]).to(a.device)  # (U,) -inf while not full
        # nothing below the old k-th value can enter; a value equal to it may, on its (document, position)
        cand = (blocks.amax(0) >= kth).nonzero().squeeze(1)  # units this batch can change
        if cand.numel() == 0:  # the usual case once the lists are full and the corpus is long
            return self
        kc = kth[cand]
        if not bool(torch.isfinite(kc).all()):  # early batches: some lists are not full yet
            sub = a[:, cand]  # (n, A)
            # the merged k-th value is also at least the batch's own k-th
            thr = torch.maximum(kc, torch.topk(sub, k, dim=0).values[-1]) if n >= k else kc
            tok, col = (sub >= thr[None, :]).nonzero(as_tuple=True)
            unit, vals = cand[col].cpu().numpy(), sub[tok, col].cpu().numpy()
            tok = tok.cpu().numpy()
            return self._sorted_merge(cand.cpu().numpy(), unit, vals, document[tok], position[tok])
        # read again only the blocks whose maximum reaches the unit's k-th value
        blk, ci = (blocks[:, cand] >= kc).nonzero(as_tuple=True)
        unit = cand[ci]
        offset = (blk * (BLOCK_ROWS * U) + unit)[:, None] + torch.arange(0, BLOCK_ROWS * U, U, device=a.device)
        short = n % BLOCK_ROWS != 0  # the last block is short: its missing rows are masked out
        sub = a.take(offset.clamp_max(n * U - 1) if short else offset)  # (pairs, BLOCK_ROWS)
        hit = sub >= kth[unit][:, None]
        if short:
            hit &= offset < n * U
        pi, ri = hit.nonzero(as_tuple=True)
        tok = (blk[pi] * BLOCK_ROWS + ri).cpu().numpy()
        return self._ranked_merge(unit[pi].cpu().numpy(), sub[pi, ri].cpu().numpy(), document[tok], position[tok])

    def _sorted_merge(self, act, u, v, d, p) -> "TopK":
        """Entrants (unit u, value v, document d, position p) and the old entries of the units `act` (which
        hold every u), sorted together: any number of entrants, as early batches bring."""
        k = self.k
        old_v, old_d, old_p = self.values[act].ravel(), self.document[act].ravel(), self.position[act].ravel()
        old_u = np.repeat(act, k)
        keep = old_d >= 0
        u = np.concatenate([u, old_u[keep]])
        v = np.concatenate([v, old_v[keep]])
        d = np.concatenate([d, old_d[keep]])
        p = np.concatenate([p, old_p[keep]])
        order = np.lexsort((p, d, -v, u))  # float32 negation is exact; -0.0 and 0.0 tie, as in a sort
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

    def _ranked_merge(self, u, v, d, p) -> "TopK":
        """Entrants merged into the full old lists without sorting the lists again: on one int64 key
        (unit, then value) the old entries are one sorted run, so a stable sort of them and the entrants
        (few) costs little more than sorting the entrants; (document, position) settles equal values, and
        each entry's rank in that order, less its unit's start, is its new place."""
        k = self.k
        act, group = np.unique(u, return_inverse=True)
        before = np.concatenate([[0], np.cumsum(np.bincount(group, minlength=len(act)))])  # entrants of earlier units
        ov, od, op = self.values[act].ravel(), self.document[act].ravel(), self.position[act].ravel()
        old_group = np.repeat(np.arange(len(act)), k)
        keys = np.concatenate([merge_key(act[old_group], ov), merge_key(u, v)])
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        equal = sk[1:] == sk[:-1]
        if equal.any():  # runs of equal values (a few): each one ordered by (document, position)
            run = np.zeros(len(sk), bool)
            run[1:] |= equal
            run[:-1] |= equal
            at = np.flatnonzero(run)
            idx = order[at]
            ties = np.concatenate([tie_key(od, op), tie_key(d, p)])[idx]
            order[at] = idx[np.lexsort((ties, keys[idx]))]
        rank = np.empty(len(keys), np.int64)
        rank[order] = np.arange(len(keys))
        base = np.arange(len(act)) * k + before[:-1]  # where each unit's entries begin in the merged order
        old_at = rank[:len(ov)] - base[old_group]
        new_at = rank[len(ov):] - base[group]
        nv, nd, np_ = np.empty(len(ov), ov.dtype), np.empty(len(ov), od.dtype), np.empty(len(ov), op.dtype)
        keep = old_at < k
        dest = old_group[keep] * k + old_at[keep]
        nv[dest], nd[dest], np_[dest] = ov[keep], od[keep], op[keep]
        keep = new_at < k
        dest = group[keep] * k + new_at[keep]
        nv[dest], nd[dest], np_[dest] = v[keep], d[keep], p[keep]
        out = TopK.of(self.values.copy(), self.document.copy(), self.position.copy())
        out.values[act], out.document[act], out.position[act] = (x.reshape(len(act), k) for x in (nv, nd, np_))
        return out


def merge_key(unit: np.ndarray, value: np.ndarray) -> np.ndarray:
    """int64 keys ordered as the top-k lists are, up to ties: by unit, then larger value first. The low
    32 bits are the value's rank among float32s (its bits made monotone; -0.0 as 0.0), reversed."""
    bits = (value.astype(np.float32) + np.float32(0)).view(np.uint32).astype(np.int64)  # + 0: -0.0 becomes 0.0
    rank = np.where(bits >= 1 << 31, (1 << 32) - 1 - bits, bits + (1 << 31))  # ascending with the value
    return unit.astype(np.int64) * (1 << 32) + ((1 << 32) - 1 - rank)


def tie_key(document: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(document, position) order among equal values as one int64: document * 2**32 + position (a
    document is far shorter than 2**32 tokens, a corpus has fewer than 2**31 documents)."""
    return document.astype(np.int64) * (1 << 32) + position

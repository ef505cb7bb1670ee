"""The activation seam: named sites of GPT-2, what one forward call records, and what it replaces.

Every activation an analysis reads or edits has a name, as in TransformerLens, and one layout:

    resid_pre  (B, T, C)       input of block l (block 0: token + position embeddings)
    q, k, v    (B, nh, T, hs)  one head's query / key / value vectors
    pattern    (B, nh, T, T)   attention weights, destination x source (rows sum to 1)
    z          (B, nh, T, hs)  each head's mix of values, before attn.c_proj
    attn_out   (B, T, C)       attention sublayer output (after c_proj, with its bias)
    resid_mid  (B, T, C)       resid_pre + attn_out
    mlp_out    (B, T, C)       MLP sublayer output
    resid_post (B, T, C)       output of block l = resid_mid + mlp_out
    mlp_post   (B, T, n_inner) the MLP's hidden activation after its GELU, one channel per neuron

The model visits each site once per block with `x = at(name, x)`. `at` belongs to one forward call:
it keeps detached copies for a `Recording` and applies that call's edits; with neither it returns
`x` untouched. Nothing is registered on the model, so no state outlives the call.

An edit is anything declared as an `Edit`: which site, which blocks, and `apply(x, layer)`. Three
ship here: `Patch` (one value at one position, or per batch row), `Edits` (many cells at once, for
mingpt.resume) and `Tap` (adds a zero leaf, so a backward gives the gradient at that site).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from mingpt.errors import InputError, quote

SITES = {
    "resid_pre": "btc", "q": "bhtd", "k": "bhtd", "v": "bhtd", "pattern": "bhts", "z": "bhtd",
    "attn_out": "btc", "resid_mid": "btc", "mlp_out": "btc", "resid_post": "btc",
}
HEAD_SITES = tuple(s for s, layout in SITES.items() if layout.startswith("bh"))
# sites whose last axis is the MLP's neurons (n_inner wide, not the residual width): read and edited like
# the residual sites, addressed by neuron where a head site is addressed by head. Kept apart from SITES,
# whose every entry the sweep engines and attribution patching lay out by residual width or by head.
NEURON_SITES = {"mlp_post": "btn"}
ALL_SITES = {**SITES, **NEURON_SITES}


def check_site(site: str):
    if site not in ALL_SITES:
        raise InputError(f"unknown site {quote(site, 40)}: use one of {', '.join(ALL_SITES)}.")


# ----------------------------------------------------------------------------- recording


class Recording:
    """What forward(record=...) keeps: detached copies, never references into the live graph.

    rec[site] is the (n_layer, ...) stack of that site over blocks; rec[site, l] one block's
    activation; rec.resid the stack of block outputs; rec.last_logits the last position's logits.
    """

    def __init__(self, sites: Iterable[str] = ("resid_post",), kv: bool = False):
        names = set([sites] if isinstance(sites, str) else sites) | {"resid_post"} | ({"k", "v"} if kv else set())
        for s in names:
            check_site(s)
        self.sites, self.kv = frozenset(names), kv
        self.acts: dict[str, torch.Tensor] = {}
        self.last_logits: torch.Tensor | None = None
        self.n_layer = 0

    def __contains__(self, site: str) -> bool:
        return site in self.acts

    def __getitem__(self, key):
        site, layer = key if isinstance(key, tuple) else (key, None)
        if site not in self.acts:
            raise KeyError(f"site {site!r} was not recorded: ask for it with Recording(sites=...)")
        return self.acts[site] if layer is None else self.acts[site][layer]

    def keep(self, site: str, layer: int, x: torch.Tensor):
        if site not in self.sites:
            return
        buf = self.acts.get(site)
        if buf is None or buf.shape[1:] != x.shape:  # one (n_layer, ...) buffer per site, made at first sight
            buf = self.acts[site] = x.new_empty(self.n_layer, *x.shape)
        buf[layer].copy_(x.detach())

    @property
    def resid(self) -> torch.Tensor | None:
        return self.acts.get("resid_post")

    @property
    def keys(self) -> torch.Tensor | None:
        return self.acts.get("k")

    @property
    def values(self) -> torch.Tensor | None:
        return self.acts.get("v")


# ----------------------------------------------------------------------------- edits


class Edit(abc.ABC):
    """What forward(patch=...) takes: a change of one site's value in some blocks of one call."""

    site: str

    def layers(self, n_layer: int) -> Iterable[int]:
        """The blocks whose `site` this edit may change (their `at` calls apply it)."""
        return (self.layer,)

    @abc.abstractmethod
    def apply(self, x: torch.Tensor, layer: int, offset: int = 0, length: int | None = None) -> torch.Tensor:
        """x with this edit applied if it belongs to `layer`. offset/length: the rows of the site's
        sequence axis that x holds (mingpt.resume visits `pattern` one row group at a time; a plain
        forward visits every site whole). Return x itself or a new tensor: the model may write into what
        comes back when it is x (its own fresh buffer), never into a tensor the edit made or keeps."""


@dataclass
class Patch(Edit):
    """Replace `site` of block `layer` at position `pos` (head `head` of head sites) by `value`.

    Residual sites take value (C,); q/k/v/z (hs,); pattern (T,), one destination row; mlp_post
    (n_inner,), or one number with `neuron` (that neuron only; head= names it too). pos=None
    patches every position (value gets a leading T axis); head=None on a head site patches every
    head (value gets a leading n_head axis). With `layer` and `pos` LongTensors of shape (B,) and
    value (B, C) (residual sites only), batch row b is patched at (layer[b], pos[b]) with value[b];
    a layer of -1 leaves that row unpatched.
    """

    layer: int | torch.Tensor
    pos: int | torch.Tensor | None
    value: torch.Tensor
    site: str = "resid_post"
    head: int | None = None
    neuron: int | None = None

    def __post_init__(self):
        check_site(self.site)
        if self.site in NEURON_SITES and self.head is not None:  # a neuron site's cells are (layer, neuron, position)
            if self.neuron is not None and self.neuron != self.head:
                raise InputError("give a neuron site's neuron as neuron= (or head=), not two different ones.")
            self.neuron, self.head = self.head, None
        if self.head is not None and self.site not in HEAD_SITES:
            raise InputError(f"head= is for head sites ({', '.join(HEAD_SITES)}), not {self.site}.")
        if self.neuron is not None and self.site not in NEURON_SITES:
            raise InputError(f"neuron= is for neuron sites ({', '.join(NEURON_SITES)}), not {self.site}.")

    def layers(self, n_layer: int) -> Iterable[int]:
        return range(n_layer) if isinstance(self.layer, torch.Tensor) else (int(self.layer),)  # per-row: any block

    def apply(self, x: torch.Tensor, layer: int, offset: int = 0, length: int | None = None) -> torch.Tensor:
        if isinstance(self.layer, torch.Tensor):  # one patch per batch row
            rows = (self.layer == layer).nonzero().squeeze(1)
            if rows.numel() == 0:
                return x
            return x.index_put((rows, self.pos[rows]), self.value[rows].to(x.dtype))
        if self.layer != layer:
            return x
        x = x.clone()
        pos = slice(None) if self.pos is None else self.pos
        if self.site in NEURON_SITES:
            x[:, pos, slice(None) if self.neuron is None else self.neuron] = self.value.to(x.dtype)
        elif SITES[self.site] == "btc":
            x[:, pos] = self.value.to(x.dtype)
        else:
            x[:, slice(None) if self.head is None else self.head, pos] = self.value.to(x.dtype)
        return x


class Edits(Edit):
    """Many edits of one site, addressed by flat index tensors: x[batch, (head,) row] = value, and
    x[batch, row, neuron] = value for a neuron site (its `head` tensor holds the neurons).

    The resumable forward (mingpt.resume) uses this to patch a different cell in every batch row.
    `rows` index the sequence axis of the tensor the site is visited with; for `pattern`, which
    the resumable forward visits one row group at a time, `at` passes the group's row offset.
    """

    def __init__(self, site: str, layer: int, batch: torch.Tensor, rows: torch.Tensor, value: torch.Tensor,
                 head: torch.Tensor | None = None):
        self.site, self.layer, self.batch, self.rows, self.value, self.head = site, layer, batch, rows, value, head

    def apply(self, x: torch.Tensor, layer: int, offset: int = 0, length: int | None = None) -> torch.Tensor:
        if layer != self.layer:
            return x
        batch, rows, value, head = self.batch, self.rows - offset, self.value, self.head
        if offset or length is not None:  # only the edits whose row falls inside this window
            keep = (rows >= 0) & (rows < (length if length is not None else x.shape[-2]))
            if not bool(keep.any()):
                return x
            batch, rows, value = batch[keep], rows[keep], value[keep]
            head = None if head is None else head[keep]
        idx = (batch, rows) if head is None else (batch, rows, head) if self.site in NEURON_SITES else (batch, head, rows)
        return x.index_put(idx, value.to(x.dtype))


class Tap(Edit):
    """Adds a zero leaf to one block's site: x + 0 is x exactly, and after a backward the leaf's
    gradient is d(output)/d(site) there. Replacing x by a leaf instead would cut the graph, so an
    earlier block's activation would get no gradient through this one."""

    def __init__(self, layer: int, site: str, like: torch.Tensor):
        check_site(site)
        self.layer, self.site = layer, site
        self.zero = torch.zeros_like(like).requires_grad_()

    def apply(self, x: torch.Tensor, layer: int, offset: int = 0, length: int | None = None) -> torch.Tensor:
        return x + self.zero.to(x.dtype) if layer == self.layer else x


# ----------------------------------------------------------------------------- the per-call view


class At:
    """`at(site, x)` for one block of one forward call: patch, then record (the recording keeps the
    value that flows on, patched or not)."""

    def __init__(self, layer: int, record: Recording | None, edits: Sequence):
        self.layer, self.record = layer, record
        self.edits = {}
        for e in edits:
            self.edits.setdefault(e.site, []).append(e)

    def __call__(self, site: str, x: torch.Tensor, offset: int = 0, length: int | None = None) -> torch.Tensor:
        for e in self.edits.get(site, ()):
            x = e.apply(x, self.layer, offset, length)
        if self.record is not None:
            self.record.keep(site, self.layer, x)
        return x

    def wants(self, site: str) -> bool:
        """Whether this block must materialise `site` (the fused attention never forms `pattern`)."""
        return site in self.edits or (self.record is not None and site in self.record.sites)


NO_SITES = At(-1, None, ())


def views(n_layer: int, record: Recording | None, patch: Edit | Sequence[Edit] | None) -> list[At]:
    """One At per block for this call; patch is an Edit or a list of them."""
    edits = [] if patch is None else list(patch) if isinstance(patch, (list, tuple)) else [patch]
    if record is None and not edits:
        return [NO_SITES] * n_layer
    if record is not None:
        record.n_layer = n_layer
    by_layer: dict[int, list] = {}
    for e in edits:
        if not isinstance(e, Edit):
            raise InputError(f"patch= takes mingpt.sites edits (Patch, Edits, Tap), got {type(e).__name__}.")
        for l in e.layers(n_layer):
            by_layer.setdefault(l, []).append(e)
    return [At(l, record, by_layer.get(l, ())) for l in range(n_layer)]

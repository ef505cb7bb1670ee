"""Many patches at once, exactly: resume a recorded run inside the block where each patch lands.

A patch of site s in block l at position p cannot change blocks < l (they come first) nor
positions < p (attention is causal). So every patch is a *slab* of rows that starts at block l from
the base run's recorded input of that block, holds only positions p..T-1 (a *group*), and borrows the
keys and values of positions < p from the base recording. Slabs of every patched (layer, head) and
groups of every patched position are stacked into one (n_slabs, R, C) tensor, R = the summed group
lengths, and go through each block as one batch; each slab's patch is applied at its own block
through the same `at(site, x)` calls the plain forward makes (mingpt.sites.Edits).

Three exact savings: a `resid_post` patch of block l is a patch of block l+1's input (block l is
skipped); in the block where an input patch joins, rows after the patched one still hold the base
run's input, so their q, k and v are the base run's (when the recording has q); and at the last block
only each group's last row is needed for the logits, so the other rows give their keys and values
only. Only the wanted columns of the unembedding are formed.

Attention: each row sees the base keys before its group's position and its own group's keys up to
itself. mingpt.ragged computes exactly those, for the whole batch in one compiled call (in float32:
bfloat16 on the CPU is widened for it). Where that kernel is not available (or for float16, or a
GPU), torch ops run it per *bucket* of consecutive groups (at most BUCKET_ROWS rows, or one group)
with a mask: short groups share one call; long groups stay alone, where a shared call would mostly
compute masked-out scores.
"""
from __future__ import annotations

from typing import Sequence

import contextlib
import math
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mingpt import ragged
from mingpt.sites import HEAD_SITES, At, Edits

BUCKET_ROWS = 32  # rows of short groups that share one attention call
SHORT_KEYS = 128  # attention over at most this many keys is written out (see _attend)
# On a GPU, the fused kernels that take a mask, but not cuDNN's: it builds a graph for every new shape
# (hundreds of ms; each bucket of rows has its own shape), which made long bfloat16 sweeps up to 16x slower
GPU_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@torch.no_grad()
def forward_cells(model, base, site: str, slabs: Sequence[tuple[int, int | None]], positions: Sequence[int] | None,
                  values: torch.Tensor, token_ids: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """Last-position logits of `token_ids` for the base run (B = 1) patched at every cell.

    slabs: (layer, head) per slab (head None for residual sites, or for all heads at once);
    positions: the patched positions, or None to patch every position at once.
    values: (n_slabs, len(positions), *value) or, with positions None, (n_slabs, T - start, *value), where
    value is (C,) for residual sites, (hs,) for q/k/v/z, (T,) for pattern (one destination row).
    start (positions None only): positions before it keep the base run's values, so rows start.. are
    all that is recomputed.
    Returns (n_slabs, len(positions) or 1, K): cell (i, j) equals
    forward(idx, patch=Patch(layer_i, positions[j], values[i, j], site, head_i))[0][0, -1, token_ids].
    """
    L, T = model.config.n_layer, base.resid.shape[2]
    dev = base.resid.device
    every = positions is None
    assert every or start == 0, "start is for patches of every position"
    assert site != "pattern" or start == 0, "a pattern row spans every key: patch it from position 0"
    positions = [start] if every else list(positions)
    # resid_post of block l is the input of block l+1: start there (block L is the final norm)
    first = [l + 1 if site == "resid_post" else l for l, _ in slabs]
    edit_site = "resid_pre" if site == "resid_post" else site
    order = sorted(range(len(slabs)), key=lambda i: first[i])  # slabs join in block order
    sizes = [T - p for p in positions]
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()  # group j holds rows starts[j]..starts[j+1]-1
    groups = [(p, starts[j], sizes[j]) for j, p in enumerate(positions)]
    suffix = torch.cat([torch.arange(p, T) for p in positions]).to(dev)  # (R,) position of each row
    last = torch.tensor(starts[1:], device=dev) - 1  # each group's last row: position T-1
    firsts = torch.tensor(starts[:-1], device=dev)  # each group's first row: the patched position
    layout = _Layout(groups, last, dev)  # attention buckets and their masks, the same in every block
    joins = [sum(first[i] == k for i in order) for k in range(L + 2)]  # slabs starting at each block
    x, joined = None, 0
    for k in range(first[order[0]], L + 1):
        new = [i for i in order if first[i] == k]
        edits, fresh = None, 0
        if new:  # these slabs start here, from the base run's input of block k
            rows = _block_input(base, k)[0].index_select(0, suffix)  # (R, C), whole rows copied
            roomy = x is not None and len(x) == joined + len(new)  # the block before left room for them
            slab = x[joined:].copy_(rows.expand(len(new), -1, -1)) if roomy else rows.expand(len(new), -1, -1).clone()
            if edit_site == "resid_pre":  # the input itself is patched: each group's first row (every row)
                mine = values.index_select(0, torch.tensor(new, device=values.device))  # (n_new, X, C)
                slab[:, slice(None) if every else firsts] = mine.to(slab)
                # only each group's first row differs from the base run's input: the rest keep its q, k, v
                fresh = len(new) if not every and "q" in base else 0
            else:  # edits address the new slabs where the edited tensor holds them: after the earlier slabs,
                # except at the last block, where the new slabs run on their own
                edits = _edits(edit_site, k, new, 0 if k == L - 1 else joined, slabs, groups, every, values, dev)
            if k == L:  # patched after the last block: only the last rows reach the logits
                slab = slab[:, last]  # (n_new, G, C)
            if not roomy:
                x = slab if x is None else torch.cat([x, slab])  # (n, R, C), or (n, G, C) after the last block
            joined += len(new)
        if k == L:
            break
        block = model.transformer.h[k]
        prefix = (base["k", k][0], base["v", k][0])  # (nh, T, hs) each: keys/values of the base run
        at = At(k, None, [edits] if edits is not None else ())
        mix = _Groups(block.attn, layout, prefix)
        known = _Known(base, k, suffix, firsts, fresh) if fresh else None
        if k < L - 1:
            room = joins[k + 1] if k + 1 < L else 0  # the slabs of the next block, written in place there
            x = block(x, at, mix) if known is None else _block(block, x, known, mix, room)  # (n [+ room], R, C)
            continue
        # last block: slabs patched inside it run in full; the rest only for each group's last row
        n_in = len(new) if edits is not None else 0
        head = _last_rows(block, x[:x.shape[0] - n_in], layout, prefix, last, known)  # (n - n_in, G, C)
        if n_in:
            tail = block(x[x.shape[0] - n_in:], At(k, None, [edits]), mix)[:, last]  # (n_in, G, C)
            head = torch.cat([head, tail])
        x = head
    h = model.transformer.ln_f(x)  # (n, G, C)
    w = model.transformer.wte.weight  # the tied unembedding; only the wanted columns if given
    out = h @ (w if token_ids is None else w[token_ids.to(dev)]).T  # (n, G, K)
    return out[torch.argsort(torch.tensor(order)).to(dev)]  # back to the caller's slab order


def _block_input(base, k: int) -> torch.Tensor:
    """The base run's input of block k (k = n_layer: of the final norm), (B, T, C)."""
    if k == 0 or "resid_post" not in base:
        return base["resid_pre", k]
    return base["resid_post", k - 1]


def _edits(site, k, new, offset, slabs, groups, every, values, dev) -> Edits:
    """One Edits for the slabs that start at block k: slab offset+i gets values[new[i], j] at the
    first row of group j (every row of the one group, when every position is patched)."""
    idx = torch.tensor(new)
    vals = values[idx.to(values.device)]  # (n, X, *value): X = groups, or every position of the one group
    n, X = vals.shape[:2]
    rows = torch.arange(groups[0][2]) if every else torch.tensor([start for _, start, _ in groups])  # (X,)
    batch = (offset + torch.arange(n))[:, None].expand(n, X)
    rows = rows[None, :].expand(n, X)
    heads = None
    all_heads = site in HEAD_SITES and slabs[new[0]][1] is None
    assert all(site in HEAD_SITES and (slabs[i][1] is None) == all_heads for i in new) or site not in HEAD_SITES
    if all_heads:  # one edit per head
        nh = vals.shape[2]
        batch, rows = (t[..., None].expand(n, X, nh) for t in (batch, rows))
        heads, vals = torch.arange(nh).expand(n, X, nh), vals.flatten(0, 2)  # vals: (n*X*nh, ...)
    else:
        vals = vals.flatten(0, 1)  # (n*X, ...)
        if site in HEAD_SITES:
            heads = torch.tensor([slabs[i][1] for i in new])[:, None].expand(n, X)
    flat = lambda t: t.reshape(-1).to(dev)  # noqa: E731
    return Edits(site, k, flat(batch), flat(rows), vals, None if heads is None else flat(heads))


class _Known:
    """The base run's q, k, v of block k for the last `fresh` slabs of a batch: those slabs differ from
    the base run's input only at rows `firsts`, so every other row's q, k, v are the base run's."""

    def __init__(self, base, k: int, suffix: torch.Tensor, firsts: torch.Tensor, fresh: int):
        heads = torch.cat([base[s, k][0] for s in "qkv"])  # (3nh, T, hs)
        # (T, 3C) as c_attn lays them out, then the rows of the flat groups (R, 3C): a fresh tensor of
        # this block's own, which linear() may write into; whole-row copies, unlike x[suffix]
        self.qkv = heads.transpose(0, 1).flatten(-2).index_select(0, suffix)
        self.firsts, self.fresh = firsts, fresh

    def linear(self, c_attn, h: torch.Tensor, cols: slice) -> list[torch.Tensor]:
        """c_attn(h, rows=cols) for h = ln_1 of the block input (n, R, C), computed only where it is not
        known: every row of the slabs that joined earlier, the patched rows of the fresh ones. Returned
        in two parts, (n - fresh, R, width) (absent if none) and (fresh, R, width), never copied into one."""
        old, R = h.shape[0] - self.fresh, h.shape[1]
        known = self.qkv[:, cols]  # (R, width)
        # one fresh slab writes its rows into qkv itself; more need a copy each
        new = known[None] if self.fresh == 1 else known.expand(self.fresh, -1, -1).clone()  # (fresh, R, width)
        patched = h[old:, self.firsts]  # (fresh, G, C)
        if not old or old * R >= new.shape[-1]:  # copying the old rows would cost more than reading the weight again
            new[:, self.firsts] = c_attn(patched, rows=cols)
            return [c_attn(h[:old], rows=cols), new] if old else [new]
        # few old rows: one call for them and the patched rows
        y = c_attn(torch.cat([h[:old].flatten(0, 1), patched.flatten(0, 1)]), rows=cols)  # (old*R + fresh*G, width)
        new[:, self.firsts] = y[old * R:].view(self.fresh, -1, y.shape[-1])  # (fresh, G, width)
        return [y[:old * R].view(old, R, -1), new]


def _block(block, x: torch.Tensor, known: _Known, mix, room: int = 0) -> torch.Tensor:
    """block(x) where some q, k, v are known (no site of this block is edited: the patch was its input)."""
    attn, z, a = block.attn, torch.empty_like(x), 0  # z: (n, R, C)
    for qkv in known.linear(attn.c_attn, block.ln_1(x), slice(None)):  # (n_part, R, 3C)
        mix.fill(z[a:a + len(qkv)].unflatten(-1, (attn.n_head, -1)), *attn.heads(qkv))  # (n_part, R, nh, hs)
        a += len(qkv)
    return block.rest(x, z, room=room)


class _Layout:
    """The flat row groups as the compiled kernel reads them (table), and how torch ops share
    attention calls among them: buckets of consecutive groups of at most BUCKET_ROWS rows in all (a
    longer group alone), as (P, start, S, members): P the largest position among them, rows
    start..start+S-1; with each bucket's masks for all its rows and for its groups' last rows
    (mask_rows, mask_last, made only if torch ops run)."""

    def __init__(self, groups, last: torch.Tensor, device):
        self.groups, cur, rows, members = groups, [], 0, []
        for j, (_, _, S) in enumerate(groups):
            if cur and rows + S > BUCKET_ROWS:
                members.append(cur)
                cur, rows = [], 0
            cur.append(j)
            rows += S
        members += [cur] if cur else []
        self.buckets = [(max(groups[i][0] for i in m), groups[m[0]][1], sum(groups[i][2] for i in m), m) for m in members]
        self.table = ragged.table(groups)  # the groups as the compiled kernel reads them
        self.last, self.device = last, device

    @cached_property
    def mask_rows(self) -> list[torch.Tensor]:
        """Each bucket's additive mask for all its rows (torch's attention only: the kernel needs none)."""
        return [self._additive(self.mask(b, None)) for b in self.buckets]

    @cached_property
    def mask_last(self) -> list[torch.Tensor]:
        """Each bucket's additive mask for its groups' last rows."""
        return [self._additive(self.mask(b, self.last.cpu())) for b in self.buckets]

    def _additive(self, m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(m.shape).masked_fill_(~m, float("-inf")).to(self.device)

    def mask(self, bucket, last) -> torch.Tensor:
        """(queries, P + S) True where a query may look: base keys before its group's position, and its
        own group's rows up to its own. Queries: the bucket's rows, or (last given) its groups' last rows."""
        P, start, S, members = bucket
        row = torch.arange(start, start + S)  # flat row of each own key
        group = torch.cat([torch.full((self.groups[i][2],), i) for i in members])  # its group
        q_row, q_group = (row, group) if last is None else (last[members], torch.tensor(members))
        p = torch.tensor([self.groups[i][0] for i in q_group.tolist()])  # each query's group position
        return torch.cat([torch.arange(P)[None, :] < p[:, None],
                          (group[None, :] == q_group[:, None]) & (row[None, :] <= q_row[:, None])], dim=1)


class _Groups:
    """Causal attention over the flat row groups: group (p, start, S) holds positions p..T-1 of
    each slab; its keys and values before p are the base run's (prefix: (nh, T, hs) each)."""

    def __init__(self, attn, layout: _Layout, prefix):
        self.attn, self.layout, self.prefix = attn, layout, prefix

    def __call__(self, q, k, v, at):  # (n, nh, R, hs) each
        n, nh, R, hs = q.shape
        if at.wants("pattern"):  # the pattern has one row per query and T columns: one group per call
            z = torch.empty_like(q)
            for p, start, S in self.layout.groups:
                kk, vv = self.keys(k, v, p, start, S)  # (n, nh, T, hs) each
                mask = torch.ones(S, p + S, dtype=torch.bool, device=q.device).tril(diagonal=p)  # query i sees <= p+i
                z[:, :, start:start + S] = self.attn.attend(q[:, :, start:start + S], kk, vv, mask, at, start)
            return z
        z = q.new_empty(n, R, nh, hs)  # rows first, so that c_proj reads it without a copy
        self.fill(z, q, k, v)
        return z.transpose(1, 2)  # (n, nh, R, hs)

    @cached_property
    def prefix32(self):
        return [t.float() for t in self.prefix]

    def _kernel(self, z, q, k, v, last_only: bool = False) -> bool:
        """The compiled kernel (float32): bfloat16 on the CPU is widened for it and z narrowed back,
        which costs far less than the padded torch-op buckets."""
        if q.dtype != torch.bfloat16 or q.device.type != "cpu" or not ragged.enabled:
            return ragged.attend(q, k, v, self.prefix, self.layout.table, z, last_only)
        z32 = torch.empty(z.shape, dtype=torch.float32)
        if not ragged.attend(q.float(), k.float(), v.float(), self.prefix32, self.layout.table, z32, last_only):
            return False
        z.copy_(z32)
        return True

    def fill(self, z, q, k, v):
        """z (n, R, nh, hs) <- attention of every row; q, k, v (n, nh, R, hs)."""
        if self._kernel(z, q, k, v):  # only the visible keys, in one call
            return
        for (P, start, S, _), mask in zip(self.layout.buckets, self.layout.mask_rows):
            z[:, start:start + S] = _attend(q[:, :, start:start + S], *self.keys(k, v, P, start, S), mask)

    def fill_last(self, z, q, k, v):
        """z (n, G, nh, hs) <- attention of each group's last row only: q (n, nh, G, hs), k, v (n, nh, R, hs)."""
        if self._kernel(z, q, k, v, last_only=True):
            return
        for (P, start, S, members), mask in zip(self.layout.buckets, self.layout.mask_last):
            g = slice(members[0], members[-1] + 1)
            z[:, g] = _attend(q[:, :, g], *self.keys(k, v, P, start, S), mask)

    def keys(self, k, v, P: int, start: int, S: int):
        """The base run's keys and values before position P, then rows start..start+S-1 of the slabs'."""
        n = k.shape[0]
        return [torch.cat([base[None, :, :P].expand(n, -1, -1, -1), own[:, :, start:start + S]], dim=2)
                for base, own in zip(self.prefix, (k, v))]  # (n, nh, P + S, hs) each


def _attend(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q (n, nh, Q, hs) over k, v (n, nh, K, hs) where the additive mask (Q, K)
    is 0, as (n, Q, nh, hs). Written out for short keys: on small, many-headed shapes two matmuls beat
    the fused kernel; long ones take the fused kernel, which never holds the (Q, K) weights."""
    if k.shape[-2] > SHORT_KEYS:
        with sdpa_kernel(GPU_ATTENTION) if q.is_cuda else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype)).transpose(1, 2)
    w = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.shape[-1])).add_(mask)  # (n, nh, Q, K)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(v.dtype)  # half precision: normalise in float32
    return torch.matmul(w, v).transpose(1, 2)  # (n, Q, nh, hs)


def _last_rows(block, x: torch.Tensor, layout: _Layout, prefix, last: torch.Tensor, known: _Known | None) -> torch.Tensor:
    """Block output at each group's last row only, (n, G, C): every row gives its key and value,
    only the last row queries (it sees the whole prefix and its group)."""
    if x.shape[0] == 0:
        return x[:, last]
    attn, (n, _, C), G = block.attn, x.shape, len(last)
    h = block.ln_1(x)
    kv = slice(C, None)  # c_attn's output features are q | k | v
    parts = [attn.c_attn(h, rows=kv)] if known is None else known.linear(attn.c_attn, h, kv)  # (n_part, R, 2C)
    q = attn.split(attn.c_attn(h[:, last], rows=slice(None, C)))  # (n, nh, G, hs): only the last rows query
    mix, z, a = _Groups(attn, layout, prefix), x.new_empty(n, G, C), 0
    for t in parts:
        k, v = (attn.split(u) for u in t.split(C, dim=-1))  # (n_part, nh, R, hs) each
        mix.fill_last(z[a:a + len(t)].unflatten(-1, (attn.n_head, -1)), q[a:a + len(t)], k, v)  # (n_part, G, nh, hs)
        a += len(t)
    return block.rest(x[:, last], z)

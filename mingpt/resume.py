"""Many patches at once, exactly: resume a recorded run inside the block where each patch lands.

A patch of site s in block l at position p cannot change blocks < l (they come first) nor
positions < p (attention is causal). So every patch is a *slab* of rows that starts at block l from
the base run's recorded input of that block, holds only positions p..T-1 (a *group*), and borrows the
keys and values of positions < p from the base recording. Slabs of every patched (layer, head) and
groups of every patched position are stacked into one (n_slabs, R, C) tensor, R = the summed group
lengths, and go through each block as one batch; each slab's patch is applied at its own block
through the same `at(site, x)` calls the plain forward makes (mingpt.sites.Edits).

Two exact savings: a `resid_post` patch of block l is a patch of block l+1's input (block l is
skipped), and at the last block only each group's last row is needed for the logits, so the other
rows contribute their keys and values only. Only the wanted columns of the unembedding are formed.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mingpt.sites import HEAD_SITES, At, Edits


@torch.no_grad()
def forward_cells(model, base, site: str, slabs: Sequence[tuple[int, int | None]], positions: Sequence[int] | None,
                  values: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Last-position logits of `token_ids` for the base run (B = 1) patched at every cell.

    slabs: (layer, head) per slab (head None for residual sites, or for all heads at once);
    positions: the patched positions, or None to patch every position at once.
    values: (n_slabs, len(positions), *value) or, with positions None, (n_slabs, T, *value), where
    value is (C,) for residual sites, (hs,) for q/k/v/z, (T,) for pattern (one destination row).
    Returns (n_slabs, len(positions) or 1, K): cell (i, j) equals
    forward(idx, patch=Patch(layer_i, positions[j], values[i, j], site, head_i))[0][0, -1, token_ids].
    """
    L, T = model.config.n_layer, base.resid.shape[2]
    dev = base.resid.device
    every = positions is None
    positions = [0] if every else list(positions)
    # resid_post of block l is the input of block l+1: start there (block L is the final norm)
    first = [l + 1 if site == "resid_post" else l for l, _ in slabs]
    edit_site = "resid_pre" if site == "resid_post" else site
    order = sorted(range(len(slabs)), key=lambda i: first[i])  # slabs join in block order
    sizes = [T - p for p in positions]
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()  # group j holds rows starts[j]..starts[j+1]-1
    groups = [(p, starts[j], sizes[j]) for j, p in enumerate(positions)]
    suffix = torch.cat([torch.arange(p, T) for p in positions]).to(dev)  # (R,) position of each row
    last = torch.tensor(starts[1:], device=dev) - 1  # each group's last row: position T-1
    x, joined = None, 0
    for k in range(first[order[0]], L + 1):
        new = [i for i in order if first[i] == k]
        edits = None
        if new:  # these slabs start here, from the base run's input of block k
            rows = _block_input(base, k)[0, suffix]  # (R, C)
            slab = rows.expand(len(new), -1, -1).clone()  # (n_new, R, C)
            # edits address the new slabs where the edited tensor holds them: after the earlier slabs,
            # except for the input itself and at the last block, where the new slabs run on their own
            in_place = edit_site == "resid_pre" or k == L - 1
            edits = _edits(edit_site, k, new, 0 if in_place else joined, slabs, groups, every, values, dev)
            if edit_site == "resid_pre":  # the input itself is what is patched
                slab, edits = edits.apply(slab, k), None
            if k == L:  # patched after the last block: only the last rows reach the logits
                slab = slab[:, last]  # (n_new, G, C)
            x = slab if x is None else torch.cat([x, slab])  # (n, R, C), or (n, G, C) after the last block
            joined += len(new)
        if k == L:
            break
        block = model.transformer.h[k]
        prefix = (base["k", k][0], base["v", k][0])  # (nh, T, hs) each: keys/values of the base run
        at = At(k, None, [edits] if edits is not None else ())
        mix = _Groups(block.attn, groups, prefix)
        if k < L - 1:
            x = block(x, at, mix)  # (n, R, C)
            continue
        # last block: slabs patched inside it run in full; the rest only for each group's last row
        n_in = len(new) if edits is not None else 0
        head = _last_rows(block, x[:x.shape[0] - n_in], groups, prefix, last)  # (n - n_in, G, C)
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


def _group_kv(prefix, k, v, p: int, start: int, S: int):
    """Keys and values seen by group (p, start, S): the base run's before p, the group's own after."""
    n = k.shape[0]
    return [torch.cat([base[None, :, :p].expand(n, -1, -1, -1), own[:, :, start:start + S]], dim=2)
            for base, own in zip(prefix, (k, v))]  # (n, nh, T, hs) each


class _Groups:
    """Causal attention over the flat row groups: group (p, start, S) holds positions p..T-1 of
    each slab; its keys and values before p are the base run's (prefix: (nh, T, hs) each)."""

    def __init__(self, attn, groups, prefix):
        self.attn, self.groups, self.prefix = attn, groups, prefix

    def __call__(self, q, k, v, at):  # (n, nh, R, hs) each
        z = torch.empty_like(q)
        for p, start, S in self.groups:
            kk, vv = _group_kv(self.prefix, k, v, p, start, S)  # (n, nh, T, hs) each
            mask = torch.ones(S, p + S, dtype=torch.bool, device=q.device).tril(diagonal=p)  # query i sees <= p+i
            qq = q[:, :, start:start + S]
            if at.wants("pattern"):
                z[:, :, start:start + S] = self.attn.attend(qq, kk, vv, mask, at, start)
            else:
                z[:, :, start:start + S] = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
        return z


def _last_rows(block, x: torch.Tensor, groups, prefix, last: torch.Tensor) -> torch.Tensor:
    """Block output at each group's last row only, (n, G, C): every row gives its key and value,
    only the last row queries (it sees the whole prefix and its group)."""
    if x.shape[0] == 0:
        return x[:, last]
    attn, C = block.attn, x.shape[-1]
    h = block.ln_1(x)
    w, b = attn.c_attn.weight, attn.c_attn.bias  # output rows: q | k | v
    k, v = (attn.split(t) for t in F.linear(h, w[C:], b[C:]).split(C, dim=-1))  # (n, nh, R, hs) each
    q = attn.split(F.linear(h[:, last], w[:C], b[:C]))  # (n, nh, G, hs): only the last rows query
    z = q.new_empty(x.shape[0], q.shape[1], len(groups), q.shape[-1])  # (n, nh, G, hs)
    for j, (p, start, S) in enumerate(groups):
        kk, vv = _group_kv(prefix, k, v, p, start, S)  # (n, nh, T, hs) each
        z[:, :, j:j + 1] = F.scaled_dot_product_attention(q[:, :, j:j + 1], kk, vv)  # sees every key
    a = attn.c_proj(z.transpose(1, 2).flatten(-2))  # (n, G, C)
    h = x[:, last] + a
    return h + block.mlp(block.ln_2(h))


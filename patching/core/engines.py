"""Sweep engines: patch every cell of a site of the base run with a source's value, and read it out.

Both engines return, for each patch, a *readout* of the base run's last position (patching.core.metrics:
the target's logit, the foil's logit and the log-sum-exp of all logits), from which every metric is
computed in one place.

- `loop`: the oracle. One full forward per patch, exactly the seed exercise's double loop.
- `fast`: the same numbers from `GPT.forward_patched`, which resumes from the corrupt run's recording
  at block l+1, recomputes only positions >= p and unembeds only the two wanted columns; patches are
  batched in chunks whose row count is bounded, so memory stays bounded for any prompt length.
  Columns where the clean and corrupt residuals are identical at every layer (positions before the
  first differing token) are no-ops: their value is the corrupt run's, with no forward at all.

A neuron site (`mlp_post`, one MLP neuron of one block at one position per cell) runs on the same
fast engine through the residual stream: neuron n of block l reaches it only through column n of
that block's `mlp.c_proj`, so patching it at position p changes block l's output at p by
(source - base) * that column and nothing else in block l. Each cell is then a `resid_post` patch of
block l at p with value base + delta * column, built chunk by chunk (never for every cell at once).

Only the record/patch seam of mingpt.model is used here: forward(record=..., patch=...) and
forward_patched(...).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from mingpt.model import GPT
from mingpt.resume import forward_cells
from mingpt.sites import ALL_SITES, NEURON_SITES, SITES, Patch, Recording
from patching.core.context import available_memory
from patching.core.errors import PatchingError
from patching.core.metrics import readout

ENGINES = ("fast", "loop")
Progress = Callable[[int, int], None]  # (patches done, patches in all)


MAX_ROWS = 4096  # suffix rows per chunk: bounds memory; larger chunks gain nothing (their big tensors are
# mapped afresh from the OS on every allocation)
BASE_SITES = ("resid_pre", "resid_post", "q", "k", "v")  # what the fast engine resumes from


@torch.no_grad()
def record(model: GPT, ids: torch.Tensor, sites=()) -> Recording:
    """One plain forward that keeps what a sweep needs (block inputs and outputs, keys, values,
    and the given sites) and the last logits."""
    rec = Recording(sites=set(sites) | set(BASE_SITES))
    model(ids, record=rec, last_only=True)
    return rec


def unit_axis(site: str) -> str | None:
    """The axis between layer and position: head for head sites, neuron for neuron sites, else None."""
    return "neuron" if site in NEURON_SITES else None if ALL_SITES[site] == "btc" else "head"


def axes_of(site: str, all_positions: bool) -> list[str]:
    """The axes of a sweep's matrix: layer, then head (head sites) or neuron (neuron sites), then
    position (unless a head or neuron is patched at every position at once)."""
    unit = unit_axis(site)
    return ["layer"] + ([unit] if unit else []) + ([] if all_positions else ["position"])


def n_units(config, site: str) -> int:
    """Slabs per layer: heads of a head site, neurons of a neuron site, 1 for a residual site."""
    return {"head": config.n_head, "neuron": config.n_inner, None: 1}[unit_axis(site)]


def cells(site: str, source: torch.Tensor, all_positions: bool) -> tuple[list[tuple[int, int | None]], tuple]:
    """The slabs (layer, head or neuron) of a sweep over `site` and the shape of its readouts (without
    the 3). source: (L, T, C) for residual sites, (L, H, T, ...) for head sites, (L, T, N) for neuron
    sites (whose slabs are still laid out layer-major, neuron within layer)."""
    if site in NEURON_SITES:
        L, T, N = source.shape
        return [(l, n) for l in range(L) for n in range(N)], ((L, N) if all_positions else (L, N, T))
    if SITES[site] == "btc":
        L, T = source.shape[:2]
        return [(l, None) for l in range(L)], ((L,) if all_positions else (L, T))
    L, H, T = source.shape[:3]
    return [(l, h) for l in range(L) for h in range(H)], ((L, H) if all_positions else (L, H, T))


def sweep(model: GPT, base_ids: torch.Tensor, base: Recording, source: torch.Tensor, site: str, target_id: int,
          foil_id: int, lse: bool, all_positions: bool = False, engine: str = "fast", max_rows: int = MAX_ROWS,
          progress: Progress | None = None) -> torch.Tensor:
    """Readouts (..., 3) of the base run with every cell of `site` replaced by `source`'s value.

    base: record(model, base_ids) of the run being patched (B = 1); source: the value of every
    cell, batch axis dropped — another run's recording `rec[site][:, 0]` (patching), or zeros or
    means (ablation). Axes: layer, (head or neuron,) position; the position axis is gone with
    all_positions.
    """
    slabs, shape = cells(site, source, all_positions)
    if engine == "loop":
        out = _loop(model, base_ids, site, slabs, source, target_id, foil_id, lse, all_positions, progress)
    else:
        out = _fast(model, base, site, slabs, source, target_id, foil_id, lse, all_positions, max_rows, progress)
    return out.view(*shape, 3)


@torch.no_grad()
def _loop(model, ids, site, slabs, source, target_id, foil_id, lse, every, progress) -> torch.Tensor:
    """The oracle: one plain forward with one Patch per cell."""
    n_pos = 1 if every else ids.shape[1]
    cells = [(i, j) for i in range(len(slabs)) for j in range(n_pos)]
    return loop_cells(model, ids, site, slabs, source, cells, target_id, foil_id, lse, every, progress).view(
        len(slabs), n_pos, 3)


@torch.no_grad()
def loop_cells(model, ids, site, slabs, source, cells, target_id, foil_id, lse, every, progress=None) -> torch.Tensor:
    """Readouts (len(cells), 3) of the cells (slab index, position index) of a sweep over `slabs`
    (cells()' order), one plain forward with one Patch each."""
    src = _per_slab(source, site)
    out = torch.empty(len(cells), 3)
    for k, (i, j) in enumerate(cells):
        (l, h), p = slabs[i], None if every else j
        value = src[i] if p is None else src[i, p]
        # h is a head, or a neuron site's neuron (Patch takes it as head= too)
        logits, _ = model(ids, patch=Patch(l, p, value, site=site, head=h), last_only=True)
        out[k] = readout(logits[0, -1], target_id, foil_id, lse).cpu()
        if progress:
            progress(k + 1, len(cells))
    return out


def _per_slab(values: torch.Tensor, site: str) -> torch.Tensor:
    """(L, T, ...) or (L, H, T, ...) -> (n_slabs, T, ...), slabs in cells()' order; a neuron site's
    (L, T, N) -> (L * N, T), one number per cell."""
    if site in NEURON_SITES:
        return values.transpose(1, 2).flatten(0, 1)
    return values if SITES[site] == "btc" else values.flatten(0, 1)


def noop_cells(base: Recording, source: torch.Tensor, site: str, every: bool) -> torch.Tensor:
    """(n_slabs, T) — or (n_slabs, 1) with every — True where the patch puts back the base run's own
    value: exactly a no-op, so its readout is the base run's with no forward at all."""
    same = _per_slab(source, site) == _per_slab(base[site][:, 0], site)
    noop = same if site in NEURON_SITES else same.flatten(2).all(-1)  # (n_slabs, T)
    return noop.all(1, keepdim=True) if every else noop


def chunk_cells(noop: torch.Tensor, T: int, every: bool, max_rows: int, lse: bool) -> list[tuple[list[int], list[int]]]:
    """(slab indices, positions) chunks covering every live cell in at most max_rows suffix rows."""
    live = (~noop.all(1)).nonzero().squeeze(1).tolist()  # a neuron site has n_inner slabs per layer
    if every:
        step = max(1, max_rows // T)
        return [(live[a:a + step], [0]) for a in range(0, len(live), step)]
    positions = (~noop[live].all(0)).nonzero().squeeze(1).tolist() if live else []
    return [([live[i] for i in rows], pos) for rows, pos in
            plan_chunks(len(live), T, positions, max_rows, max_patches=512 if lse else None)]


@dataclass
class Plan:
    """What a sweep will do, known before it runs: cells, the live ones, chunks, estimated peak memory;
    method "attribution" (patching.analyses.patch.attribution): one backward estimates every cell, and with
    check the exact sweep's live cells and chunks follow."""

    site: str
    cells: int
    live: int
    chunks: int
    peak_bytes: int
    method: str = "exact"
    check: bool = False

    def describe(self) -> str:
        chunks = f"{self.chunks} chunk{'s' * (self.chunks != 1)}"
        memory = f"estimated peak memory {self.peak_bytes / 2**20:.1f} MiB"
        if self.method == "exact":
            return (f"plan: {self.cells} patches at {self.site} ({self.live} to compute, the rest are no-ops), "
                    f"{chunks}, {memory}")
        check = f", then the exact sweep to check it: {self.live} to compute in {chunks}" if self.check else ""
        return (f"plan: {self.cells} patches at {self.site} estimated by attribution patching: one forward and "
                f"one backward{check}; {memory}")


def plan(config, T: int, site: str, every: bool, max_rows: int, lse: bool, noop: torch.Tensor | None) -> Plan:
    """The sweep's plan; noop from noop_cells (None before recording: every cell counted live).
    Memory: two recordings, plus the largest chunk's activations (MLP width, attention rows,
    the full pattern of its first block for `pattern`, full-vocabulary logits when lse)."""
    n_slabs = config.n_layer * n_units(config, site)
    if noop is None:
        noop = torch.zeros(n_slabs, 1 if every else T, dtype=torch.bool)
    chunks = chunk_cells(noop, T, every, max_rows, lse)
    cells = int(noop.numel())
    return Plan(site, cells, cells - int(noop.sum()), len(chunks),
                recording_bytes(config, T, site) + chunk_bytes(config, T, site, every, lse, chunks))


def recording_bytes(config, T: int, site: str) -> int:
    """Estimated bytes of the two recordings (see plan): block inputs and outputs, keys, values, the site;
    for a neuron site also the fast engine's per-cell differences and no-op map, the site's size again."""
    L, H, C = config.n_layer, config.n_head, config.n_embd
    f = 4  # bytes of float32; half precision halves this, which the estimate leaves as a margin
    site_size = {"btc": T * C, "bhtd": T * C, "bhts": H * T * T, "btn": 2 * T * config.n_inner}[ALL_SITES[site]]
    return 2 * L * (4 * T * C + site_size + C) * f


def chunk_bytes(config, T: int, site: str, every: bool, lse: bool, chunks) -> int:
    """Estimated bytes of the largest chunk's activations (see plan)."""
    C, f = config.n_embd, 4  # bytes of float32, as in plan
    # a neuron site's chunk also holds its patched block outputs, one C-wide row per cell (counted in 8 C)
    width = config.n_inner + 8 * C + (config.n_head * T if site == "pattern" else 0)
    return max(((len(rows) * (T if every else sum(T - p for p in pos)) * width
                 + len(rows) * len(pos) * (config.vocab_size if lse else 2)) * f for rows, pos in chunks), default=0)


@torch.no_grad()
def _fast(model, base, site, slabs, source, target_id, foil_id, lse, every, max_rows, progress) -> torch.Tensor:
    """The same readouts from mingpt.resume, in chunks of at most max_rows suffix rows; no-op cells
    keep the base readout."""
    T = base.resid.shape[2]
    noop = noop_cells(base, source, site, every)
    if site in NEURON_SITES:  # each cell as a patch of its block's output (module docstring)
        values_of, run_site = _neuron_values(model, base, source, site, slabs), "resid_post"
    else:
        src, run_site = _per_slab(source, site), site
        values_of = lambda rows, pos: src[rows] if pos is None else src[rows][:, pos]  # noqa: E731
    out = readout(base.last_logits[0], target_id, foil_id, lse).cpu().repeat(len(slabs), noop.shape[1], 1)
    ids = None if lse else torch.tensor([target_id, foil_id])
    chunks = chunk_cells(noop, T, every, max_rows, lse)
    done, total = 0, sum(len(rows) * len(pos) for rows, pos in chunks)
    # weights used more than once (several chunks) are worth reordering for oneDNN once, if memory allows
    # beside the largest chunk; a run of many sweeps (batch, study) holds model.packed() around them all
    several = len(chunks) > 1
    with model.packed(reserve=chunk_bytes(model.config, T, site, every, lse, chunks)) if several else contextlib.nullcontext():
        for rows, pos in chunks:
            values = values_of(rows, None if every else pos)  # (n, T or nP, ...)
            cells_ = [(slabs[i][0], None) for i in rows] if run_site != site else [slabs[i] for i in rows]
            got = forward_cells(model, base, run_site, cells_, None if every else pos, values, ids)
            r = readout(got, 0, 1, False) if ids is not None else readout(got, target_id, foil_id, True)
            out[torch.tensor(rows)[:, None], torch.tensor(pos)[None, :]] = r.cpu()
            done += len(rows) * len(pos)
            if progress:
                progress(done, total)
    return out


def _neuron_values(model, base, source, site, slabs):
    """For a neuron site: values_of(rows, positions) -> (n, nP or T, C), the block outputs that the
    cells `rows` (slab indices) make at those positions (None: every position). Neuron n of block l
    reaches the residual stream only through column n of that block's mlp.c_proj (weight (C, n_inner)),
    so replacing it changes block l's output by (source - base) * that column there, and nothing else
    of block l. Built per chunk: all cells at once would be L * n_inner * T * C floats."""
    wide = torch.promote_types(source.dtype, torch.float32)  # a half-precision run's differences, unrounded
    delta = (source.to(wide) - base[site][:, 0].to(wide)).transpose(1, 2)  # (L, N, T): each cell's change
    resid = base.resid[:, 0]  # (L, T, C): the base run's block outputs
    blocks = model.transformer.h

    def values_of(rows: list[int], pos: list[int] | None) -> torch.Tensor:
        cells_ = torch.tensor([slabs[i] for i in rows])  # (n, 2): layer, neuron
        at = slice(None) if pos is None else torch.tensor(pos, device=resid.device)
        out = resid[cells_[:, 0].to(resid.device)][:, at].clone()  # (n, nP or T, C)
        for l in cells_[:, 0].unique().tolist():  # a chunk holds a few layers at most: one weight each
            mine = (cells_[:, 0] == l).nonzero().squeeze(1)
            neurons = cells_[mine, 1].to(resid.device)
            column = blocks[l].mlp.c_proj.weight[:, neurons].T  # (n_l, C)
            d = delta[l][neurons][:, at]  # (n_l, nP or T)
            # in float32 at least: a half-precision base gets the sum rounded once, as its own sums are
            change = d[..., None] * column.to(wide)[:, None, :]  # (n_l, nP or T, C)
            mine = mine.to(resid.device)
            out[mine] = (out[mine].to(wide) + change).to(out.dtype)
        return out

    return values_of


def loop_sweep(model: GPT, corrupt_ids: torch.Tensor, clean: Recording, target_id: int, foil_id: int,
               lse: bool, progress: Progress | None = None) -> torch.Tensor:
    """The oracle for block outputs: (n_layer, T, 3) readouts from one forward per patch."""
    return _loop(model, corrupt_ids, "resid_post", [(l, None) for l in range(clean.resid.shape[0])],
                 clean.resid[:, 0], target_id, foil_id, lse, False, progress)


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


def fast_sweep(model: GPT, corrupt: Recording, clean: Recording, target_id: int, foil_id: int, lse: bool,
               max_rows: int = MAX_ROWS, progress: Progress | None = None) -> torch.Tensor:
    """(n_layer, T, 3) readouts of block-output patches, equal to loop_sweep's."""
    return _fast(model, corrupt, "resid_post", [(l, None) for l in range(clean.resid.shape[0])], clean.resid[:, 0],
                 target_id, foil_id, lse, False, max_rows, progress)


def check_memory(plan: Plan, device: torch.device):
    """Refuse, before recording anything, a sweep (or attribution estimate) whose estimate exceeds the
    free memory."""
    free = available_memory(device)
    if free is not None and plan.peak_bytes > free:
        chunked = plan.site != "pattern" and plan.method == "exact"  # --max-rows bounds its chunks
        fix = "lower --max-rows, shorten the prompt or use a smaller model" if chunked else \
            "shorten the prompt or use a smaller model"
        size = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        what = "sweep" if plan.method == "exact" else "attribution estimate"
        raise PatchingError(f"this {plan.site} {what} needs about {size(plan.peak_bytes)} but {device.type} has "
                            f"{size(free)} free: {fix}.")

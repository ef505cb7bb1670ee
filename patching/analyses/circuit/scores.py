"""Edge scores: the exact effect of every edge, and the gradient estimates of it (EAP, EAP-IG).

An edge SENDER->READER carries the sender's output into what the reader reads (patching.analyses.
circuit.graph). With the base run (the corrupt prompt when denoising) and the source run (the clean
one), the edge's delta is the sender's source output minus its base output, (T, C).

- exact: the base run with only that reader's input shifted by the delta, everything downstream
  recomputed; score = metric(that run) - metric(base run). A reader in block l changes that block's
  output only through itself, so the block's new output is computed from the base run's recording (a
  head's q, k or v from the shifted input through ln_1 and its rows of c_attn, that head's attention
  and its slice of c_proj, then the MLP; an MLP's input through ln_2 and the MLP; the logits through
  ln_f), and the run resumes at block l+1 on the resumable engine (mingpt.resume.forward_cells). One
  slab per edge, every slab of a block in one batch (chunks of at most max_rows suffix rows).
- eap (Nanda 2023; Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit
  Discovery"): delta . d metric / d reader input at the base run, one forward and one backward. The
  gradient of a head's q/k/v input is the gradient at its q, k or v, through its c_attn rows and ln_1
  (a vector-Jacobian product per head and input, all at once).
- eap-ig-inputs (Hanna et al. 2024, "Have Faith in Faithfulness"): the gradients averaged over N runs
  whose embeddings move from the base's to the source's (alpha = k/N, k = 1..N, a right Riemann sum).
- eap-ig-activations: per sender, the gradients averaged over N runs in which that sender's output
  moves from its base value to its source value (the rest recomputed), dotted with its delta.

Positions are summed unless per_position: then the delta is split by position (T scores per edge;
for the gradient methods they sum to the summed score, for exact they need not: effects interact).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mingpt.resume import forward_cells
from mingpt.sites import Patch, Recording, Tap
from patching.analyses.circuit.graph import Graph
from patching.core.metrics import metric_values, needs_lse, readout

METRICS = ("logit-diff", "target-logit", "prob-diff")


class Metric:
    """A patch metric of last-position logits: value(logits (n, vocab), or (n, 2) holding the target's
    and the foil's columns when `ids` is not None) -> (n,)."""

    def __init__(self, metric: str, target_id: int, foil_id: int):
        self.metric, self.target_id, self.foil_id = metric, target_id, foil_id
        self.ids = None if needs_lse(metric) else torch.tensor([target_id, foil_id])

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.ids is not None and logits.shape[-1] == 2:
            r = readout(logits, 0, 1, False)
        else:
            r = readout(logits, self.target_id, self.foil_id, needs_lse(self.metric))
        return metric_values(self.metric, r, None, None)


SITES = ("resid_pre", "resid_mid", "resid_post", "q", "k", "v", "z", "mlp_out")
METHODS = ("exact", "eap", "eap-ig-inputs", "eap-ig-activations")


@torch.no_grad()
def record(model, ids: torch.Tensor) -> Recording:
    """One plain run keeping what every method reads (B = 1)."""
    rec = Recording(sites=SITES)
    model(ids, record=rec, last_only=True)
    return rec


def head_weights(block) -> torch.Tensor:
    """attn.c_proj's weight as (n_head, hs, C): head h writes z_h @ w[h] (its slice, no bias)."""
    C, H = block.attn.n_embd, block.attn.n_head
    return block.attn.c_proj.weight.T.reshape(H, C // H, C)  # (H, hs, C)


def sender_outputs(model, rec: Recording) -> torch.Tensor:
    """(n_senders, T, C) in Graph.senders order: the embeddings, then per layer each head's z through
    its slice of c_proj and the MLP's output."""
    out = [rec["resid_pre", 0][0][None]]
    for l, block in enumerate(model.transformer.h):
        out.append(torch.einsum("htd,hdc->htc", rec["z", l][0], head_weights(block)))
        out.append(rec["mlp_out", l][0][None])
    return torch.cat(out)


def _deltas(delta: torch.Tensor, per_position: bool) -> torch.Tensor:
    """(n, T, C) deltas, or with per_position (n * T, T, C): each delta at one position only."""
    if not per_position:
        return delta
    n, T, C = delta.shape
    eye = torch.eye(T, dtype=delta.dtype, device=delta.device)
    return (delta[:, None] * eye[None, :, :, None]).reshape(n * T, T, C)  # (n*T, T, C)


@torch.no_grad()
def exact(model, base: Recording, delta: torch.Tensor, graph: Graph, value: Callable, per_position: bool = False,
          max_rows: int = 4096, progress: Callable | None = None) -> torch.Tensor:
    """(n_readers, n_senders[, T]) metric of the base run with one edge's reader input shifted by its
    delta, minus the base run's metric (NaN where no edge exists). value: last-position logits
    (n, vocab or 2) -> metric (n,); token_ids of value.ids are the logits it needs (None: all).

    A reader at block l changes that block's output only through one head (its q, k or v) or the MLP,
    so each edge's block-l output is computed here from the base run's recording (the head's attention
    and its slice of c_proj, then the MLP; or the MLP's new output), and the run resumes at block l+1
    from it (mingpt.resume). Positions before the first one any sender changes keep the base run's
    values in every edge's run (causal attention) and are not recomputed; at the last block only the
    last position reaches the logits."""
    L = model.config.n_layer
    T = delta.shape[1]
    P = T if per_position else 1
    out = torch.full((len(graph.readers), len(graph.senders), P), float("nan"), dtype=torch.float64)
    base_value = float(value(base.last_logits[0][None])[0])
    ids = value.ids
    reader_of = {name: j for j, name in enumerate(graph.readers)}
    total, done = int(graph.adjacency.sum()) * P, 0

    def put(j: int, senders: np.ndarray, logits: torch.Tensor):
        nonlocal done
        out[j, senders] = (value(logits).double().cpu() - base_value).reshape(len(senders), P)
        done += len(senders) * P
        if progress:
            progress(done, total)

    changed = (delta != 0).flatten(2).any(-1).any(0)  # (T,) positions some sender changes
    first = int(changed.nonzero()[0, 0]) if bool(changed.any()) else T - 1

    def resume(l: int, start: int, n: int, outputs: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """Logits (n, K) of n runs whose block-l output at rows start.. is outputs(a, b) for runs a..b-1."""
        per = max(1, max_rows // (T - start))  # runs per chunk: each resumes T - start rows
        return torch.cat([forward_cells(model, base, "resid_post", [(l, None)] * (min(a + per, n) - a), None,
                                        outputs(a, min(a + per, n)), ids, start=start)[:, -1]
                          for a in range(0, n, per)])

    # the weights serve many chunks: reorder them for oneDNN once (if the copy fits beside a chunk)
    with model.packed(reserve=max_rows * (model.config.n_inner + 8 * model.config.n_embd) * delta.element_size()):
        for l, block in enumerate(model.transformer.h):
            start = T - 1 if l == L - 1 else first  # the last block's other rows never reach the logits
            _head_readers(block, base, l, delta, graph, per_position, reader_of, first, start, resume, put)
            # the MLP's input: every sender before it, its own layer's heads too
            j = reader_of[f"m{l}"]
            senders = np.flatnonzero(graph.adjacency[j])
            d = _deltas(delta[senders], per_position)  # (n, T, C)
            mid = base["resid_mid", l][0][start:]  # (R, C)
            put(j, senders, resume(l, start, len(d), lambda a, b: _block_output(block, mid, mid + d[a:b, start:])))
    # logits read the final residual stream: only its last position matters
    j = reader_of["logits"]
    senders = np.flatnonzero(graph.adjacency[j])
    d = _deltas(delta[senders], per_position)[:, -1]  # (n, C)
    h = model.transformer.ln_f(base["resid_post", L - 1][0, -1][None] + d)
    w = model.transformer.wte.weight
    put(j, senders, h @ (w if ids is None else w[ids.to(w.device)]).T)
    return out if per_position else out[..., 0]


def _block_output(block, mid: torch.Tensor, mlp_input: torch.Tensor) -> torch.Tensor:
    """A block's output from its residual after attention, mid, and what its MLP reads (mid itself, or
    for an MLP reader mid shifted by the delta): mid + MLP(ln_2(mlp_input)), (n, R, C)."""
    return mid + block.mlp(block.ln_2(mlp_input))


def _head_readers(block, base, l, delta, graph, per_position, reader_of, first, start, resume, put):
    """exact() for the q, k and v readers of block l's heads: every sender before block l. Inputs
    before `first` are the base run's; outputs are wanted from row `start` (>= first) on."""
    senders = np.flatnonzero(graph.adjacency[reader_of[f"a{l}.h0<q>"]])
    d = _deltas(delta[senders], per_position)  # (n, T, C)
    (n, T, C), H = d.shape, block.attn.n_head
    hs = C // H
    x = block.ln_1(base["resid_pre", l][0][None] + d)  # (n, T, C): what every head of block l reads
    q, k, v = (base[s, l][0] for s in "qkv")  # (H, T, hs) each: the base run's
    w_o = head_weights(block)  # (H, hs, C)
    z0, mid = base["z", l][0][:, start:], base["resid_mid", l][0][start:]  # (H, R, hs), (R, C)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[start:]  # (R, T)
    for i, site in enumerate("qkv"):
        def outputs(a: int, b: int) -> torch.Tensor:
            """Block-l outputs of runs a..b-1 (head-major: run r is head r // n, sender r % n)."""
            rows = []
            for h in range(a // n, (b - 1) // n + 1):
                lo, hi = max(a, h * n) - h * n, min(b, (h + 1) * n) - h * n
                cols = slice(i * C + h * hs, i * C + (h + 1) * hs)  # head h's q, k or v features of c_attn
                new = block.attn.c_attn(x[lo:hi], rows=cols)  # (m, T, hs)
                new[:, :first] = (q, k, v)[i][h, :first]  # unchanged there: the base run's own values
                qq, kk, vv = (new if j == i else t[h].expand(hi - lo, -1, -1) for j, t in enumerate((q, k, v)))
                z = F.scaled_dot_product_attention(qq[:, start:], kk, vv, attn_mask=causal)  # (m, R, hs)
                rows.append(mid + (z - z0[h]) @ w_o[h])  # (m, R, C): the head's change through c_proj
            shifted = torch.cat(rows)  # (b - a, R, C)
            return _block_output(block, shifted, shifted)
        got = resume(l, start, H * n, outputs)  # (H * n, K)
        for h in range(H):
            put(reader_of[f"a{l}.h{h}<{site}>"], senders, got[h * n:(h + 1) * n])


# ----------------------------------------------------------------------------- gradients


def reader_gradients(model, ids: torch.Tensor, value: Callable, edits=()) -> torch.Tensor:
    """(n_readers, T, C) d metric / d reader input for the run of ids with `edits`, in Graph.readers
    order: a head's q/k/v input through its rows of c_attn and ln_1, an MLP's through the MLP and
    ln_2, the logits' the final residual stream's gradient itself."""
    L, H = model.config.n_layer, model.config.n_head
    like = _recorded(model, ids, edits)  # the run's activations: where each gradient is taken
    taps = {(l, s): Tap(l, s, like[s, l]) for l in range(L) for s in ("q", "k", "v", "mlp_out")}
    final = Tap(L - 1, "resid_post", like["resid_post", L - 1])
    with torch.enable_grad():
        logits, _ = model(ids, patch=[*edits, *taps.values(), final], last_only=True)
        m = value(logits[:, -1])[0]
        leaves = [t.zero for t in taps.values()] + [final.zero]
        grads = torch.autograd.grad(m, leaves, allow_unused=True)
    g = {key: (gr if gr is not None else torch.zeros_like(t.zero))[0] for (key, t), gr in zip(taps.items(), grads)}
    out = []
    with torch.no_grad():  # the weights need no gradient here; the MLP takes its own below
        for l, block in enumerate(model.transformer.h):
            x = like["resid_pre", l][0]  # (T, C): what the heads read
            C, hs = x.shape[-1], x.shape[-1] // H
            w = block.attn.c_attn.weight.reshape(3, H, hs, C)  # rows: q, k, v; heads; head dims
            g_ln = torch.einsum("ihtd,ihdc->hitc", torch.stack([g[l, s] for s in "qkv"]), w)  # (H, 3, T, C)
            out.append(_ln_vjp(block.ln_1, x, g_ln.flatten(0, 1)))  # (3H, T, C): a<l>.h0<q>, <k>, <v>, h1<q>, ...
            mid = like["resid_mid", l][0].detach().requires_grad_()
            with torch.enable_grad():
                y = block.mlp(block.ln_2(mid))
                out.append(torch.autograd.grad(y, mid, g[l, "mlp_out"])[0][None])
        out.append(grads[-1][0][None] if grads[-1] is not None else torch.zeros_like(final.zero[0])[None])
        return torch.cat(out).detach()


def _recorded(model, ids, edits) -> Recording:
    rec = Recording(sites=SITES)
    with torch.no_grad():
        model(ids, record=rec, patch=list(edits), last_only=True)
    return rec


def _ln_vjp(ln, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d(g . ln(x))/dx for a batch of output gradients g (n, T, C) at one input x (T, C)."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = ln(x)
        if not y.requires_grad:  # a norm replaced by a constant map: nothing flows back
            return torch.zeros_like(g)
        return torch.autograd.grad(y, x, g, is_grads_batched=True)[0]


def dot(delta: torch.Tensor, grads: torch.Tensor, graph: Graph, per_position: bool) -> torch.Tensor:
    """(n_readers, n_senders[, T]) delta_s . g_r over the graph's edges (NaN elsewhere)."""
    s = torch.einsum("stc,rtc->rst", delta.double(), grads.double())
    s[~torch.from_numpy(graph.adjacency)] = float("nan")
    return s if per_position else s.sum(-1)


def eap(model, base_ids: torch.Tensor, delta: torch.Tensor, graph: Graph, value: Callable,
        per_position: bool = False) -> torch.Tensor:
    return dot(delta, reader_gradients(model, base_ids, value), graph, per_position)


def eap_ig_inputs(model, base_ids: torch.Tensor, base: Recording, source: Recording, delta: torch.Tensor,
                  graph: Graph, value: Callable, steps: int, per_position: bool = False,
                  progress: Callable | None = None) -> torch.Tensor:
    """The reader gradients averaged over runs whose embeddings move from base to source."""
    e0, e1 = base["resid_pre", 0][0], source["resid_pre", 0][0]
    g = 0
    for k in range(1, steps + 1):
        g = g + reader_gradients(model, base_ids, value, [Patch(0, None, e0 + k / steps * (e1 - e0), site="resid_pre")])
        if progress:
            progress(k, steps)
    return dot(delta, g / steps, graph, per_position)


def eap_ig_activations(model, base_ids: torch.Tensor, base: Recording, source: Recording, delta: torch.Tensor,
                       graph: Graph, value: Callable, steps: int, per_position: bool = False,
                       progress: Callable | None = None) -> torch.Tensor:
    """Per sender, the reader gradients averaged over runs in which that sender's output moves from its
    base value to its source value, dotted with its delta."""
    out = torch.full((len(graph.readers), len(graph.senders), delta.shape[1]), float("nan"), dtype=torch.float64)
    adj = torch.from_numpy(graph.adjacency)
    for i, name in enumerate(graph.senders):
        g = 0
        for k in range(1, steps + 1):
            a = k / steps
            if name == "input":
                edit = Patch(0, None, base["resid_pre", 0][0] + a * delta[0], site="resid_pre")
            elif name.startswith("m"):
                l = int(name[1:])
                edit = Patch(l, None, base["mlp_out", l][0] + a * delta[i], site="mlp_out")
            else:  # a head: its output is linear in its z
                l, h = (int(p) for p in name[1:].split(".h"))
                z0, z1 = base["z", l][0, h], source["z", l][0, h]
                edit = Patch(l, None, z0 + a * (z1 - z0), site="z", head=h)
            g = g + reader_gradients(model, base_ids, value, [edit])
        col = torch.einsum("tc,rtc->rt", delta[i].double(), (g / steps).double()).cpu()  # out is on the CPU
        out[:, i] = torch.where(adj[:, i, None], col, torch.tensor(float("nan"), dtype=torch.float64))
        if progress:
            progress(i + 1, len(graph.senders))
    return out if per_position else out.sum(-1)

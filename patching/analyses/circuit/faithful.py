"""Circuit runs and faithfulness: how much of the model's behaviour a set of edges carries.

A circuit C is a set of edges. Its run (on the clean prompt) gives every reader r the input
    abl_in(r) + sum over senders s in C feeding r of (out_s(this run) - out_s(ablated)),
where out_s(ablated) is the sender's output on the corrupt prompt (ablation "corrupt"), zero, or its
mean over every position of reference prompts ("mean", as `ablate`), and abl_in(r) is what r reads
when every sender is ablated (those outputs plus the attention output biases of earlier layers).
Every edge outside C carries the ablated value, every edge inside what its sender computes in this
run (from its own circuit inputs); nothing is linearised. The full graph is the clean run, the empty
graph the ablated run. Faithfulness (MIB, Mueller et al. 2025):
    f(C) = (m(C) - m(empty)) / (m(full) - m(empty)),
CPR is the area under f over MIB's edge fractions (edges ranked by score, oriented toward the source
run), CMD the area under |1 - f| (ranked by |score|); trapezoids over the fraction.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from patching.analyses.circuit.graph import Graph
from patching.analyses.circuit.scores import Metric, head_weights, record, sender_outputs
from patching.core.prompts import encode, prepare

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # MIB's share of all edges
ABLATIONS = ("corrupt", "mean", "zero")


@torch.no_grad()
def mean_outputs(model, ids_list: list[torch.Tensor], T: int) -> torch.Tensor:
    """(n_senders, T, C): each sender's output averaged over every position of every reference prompt."""
    total, count = 0, 0
    for ids in ids_list:
        out = sender_outputs(model, record(model, ids)).double()
        total, count = total + out.sum(1), count + out.shape[1]
    return (total / count)[:, None].expand(-1, T, -1).to(model.transformer.wte.weight.dtype)


@torch.no_grad()
def circuit_values(model, ids: torch.Tensor, ablated: torch.Tensor, graph: Graph, masks: np.ndarray,
                   value: Callable, batch: int = 32) -> np.ndarray:
    """Metric of the circuit run of each mask (n_circuits, n_edges) bool, on the prompt ids (1, T)."""
    masks = np.atleast_2d(masks)
    out = [_runs(model, ids, ablated, graph, masks[a:a + batch], value) for a in range(0, len(masks), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def _runs(model, ids, ablated, graph: Graph, masks: np.ndarray, value: Callable) -> np.ndarray:
    H = model.config.n_head
    B, T = len(masks), ids.shape[1]
    dev, dt = model.transformer.wte.weight.device, model.transformer.wte.weight.dtype
    M = np.zeros((B, len(graph.readers), len(graph.senders)), dtype=np.float32)  # 1 where the edge is in C
    M[:, graph.edges[:, 0], graph.edges[:, 1]] = masks
    M = torch.from_numpy(M).to(dev, dt)
    ablated = ablated.to(dev, dt)
    D = torch.zeros(B, len(graph.senders), T, ablated.shape[-1], device=dev, dtype=dt)  # out_s(run) - out_s(ablated)
    pos = torch.arange(T, device=dev)
    emb = model.transformer.wte(ids[0]) + model.transformer.wpe(pos)  # (T, C)
    D[:, 0] = emb - ablated[0]
    reader = {name: j for j, name in enumerate(graph.readers)}
    stream = ablated[0].clone()  # abl_in of the readers reached so far: every ablated output and bias
    s = 1  # the next sender's index
    for l, block in enumerate(model.transformer.h):
        j = reader[f"a{l}.h0<q>"]
        x = stream + torch.einsum("brs,bstc->brtc", M[:, j:j + 3 * H], D)  # (B, 3H, T, C): h0 q, k, v, h1 ...
        C, hs = x.shape[-1], x.shape[-1] // H
        w = block.attn.c_attn.weight.reshape(3, H, hs, C)
        b = block.attn.c_attn.bias.reshape(3, H, hs) if block.attn.c_attn.bias is not None else torch.zeros(3, H, hs, device=dev, dtype=dt)
        ln = block.ln_1(x).unflatten(1, (H, 3))  # (B, H, 3, T, C)
        q, k, v = (torch.einsum("bhtc,hdc->bhtd", ln[:, :, i], w[i]) + b[i][None, :, None] for i in range(3))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hs)
        heads = torch.einsum("bhtd,hdc->bhtc", z, head_weights(block))  # (B, H, T, C)
        D[:, s:s + H] = heads - ablated[s:s + H]
        bias = block.attn.c_proj.bias
        stream = stream + ablated[s:s + H].sum(0) + (bias if bias is not None else 0)
        s += H
        j = reader[f"m{l}"]
        x = stream + torch.einsum("bs,bstc->btc", M[:, j], D)  # (B, T, C)
        D[:, s] = block.mlp(block.ln_2(x)) - ablated[s]
        stream = stream + ablated[s]
        s += 1
    x = stream[-1] + torch.einsum("bs,bsc->bc", M[:, reader["logits"]], D[:, :, -1])  # (B, C): the last position
    logits = model.transformer.ln_f(x) @ model.transformer.wte.weight.T
    return value(logits).double().cpu().numpy()


def prepared(ctx, pair, metric: str):
    """The pair tokenized and checked, both prompts' ids (1, T), and the metric of last-position logits."""
    cfg = ctx.config
    prep = prepare(ctx.tok, pair, cfg.block_size, cfg.vocab_size)
    ids = [torch.tensor([i], device=ctx.device) for i in (prep.clean_ids, prep.corrupt_ids)]
    return prep, ids[0], ids[1], Metric(metric, prep.target_id, prep.foil_id)


def ablated_outputs(ctx, corrupt_ids: torch.Tensor, ablation: str, reference=None, clean_text: str | None = None):
    """(n_senders, T, C) what an edge outside a circuit carries: the corrupt run's sender outputs, zeros,
    or their means over the reference prompts (the clean prompt when none are given)."""
    model = ctx.model
    if ablation == "corrupt":
        return sender_outputs(model, record(model, corrupt_ids))
    T = corrupt_ids.shape[1]
    if ablation == "zero":
        return torch.zeros(len(Graph.of(ctx.config).senders), T, ctx.config.n_embd, device=ctx.device,
                           dtype=model.transformer.wte.weight.dtype)
    prompts = list(reference) if reference else [clean_text]
    ids = [torch.tensor([encode(ctx.tok, p, ctx.config.block_size, "reference prompt")], device=ctx.device)
           for p in prompts]
    return mean_outputs(model, ids, T)


def circuit_metric(ctx, pair, mask: np.ndarray, ablation: str = "corrupt", reference=None,
                   metric: str = "logit-diff") -> float:
    """The metric of one circuit's run (mask (n_edges,) bool over Graph.names) on a pair's clean prompt."""
    prep, clean, corrupt, value = prepared(ctx, pair, metric)
    ablated = ablated_outputs(ctx, corrupt, ablation, reference, pair.clean)
    mask = np.asarray(mask, dtype=bool)[None]
    return float(circuit_values(ctx.model, clean, ablated, Graph.of(ctx.config), mask, value)[0])


def counts(n_edges: int) -> list[int]:
    """Edges in the circuit at each of MIB's fractions (at least one)."""
    return [max(1, int(round(f * n_edges))) for f in FRACTIONS]


def masks_of(order: np.ndarray, ns: list[int], n_edges: int) -> np.ndarray:
    """(len(ns), n_edges) bool: the first n edges of `order` for each n."""
    rank = np.empty(n_edges, dtype=np.int64)
    rank[order] = np.arange(n_edges)
    return rank[None, :] < np.array(ns)[:, None]


def area(fractions, values) -> float:
    """Trapezoids over the edge fraction."""
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def faithfulness(m: np.ndarray, m_full: float, m_empty: float) -> np.ndarray:
    span = m_full - m_empty
    return (np.asarray(m) - m_empty) / span if span != 0 else np.full(np.shape(m), math.nan)


def smallest(order: np.ndarray, n_edges: int, f_of: Callable[[int], float], target: float) -> tuple[int, float]:
    """The fewest top edges of `order` whose circuit reaches faithfulness >= target: doubling, then
    bisection between the last miss and the first hit (f need not grow with n; the circuit returned
    reaches the target, a smaller one may exist between points never tried)."""
    lo, hi = 0, 1
    while hi < n_edges and f_of(hi) < target:
        lo, hi = hi, min(2 * hi, n_edges)
    if f_of(hi) < target:
        return n_edges, f_of(n_edges)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f_of(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, f_of(hi)

"""Circuits: which edges between components carry a behaviour, scored exactly or estimated, and how
much of the behaviour a set of edges carries (faithfulness), for the top edges or a stated hypothesis.

The graph (graph.py) has MIB's nodes and edges; the scores (scores.py) are exact edge patching on the
resumable engine, EAP, or EAP-IG over the inputs or the activations; the circuit runs (faithful.py)
give every reader its own input, ablating the edges outside a circuit. Methods and citations are in
those modules' docstrings. One pair is a batch of one: a study averages the scores over pairs.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from patching.analyses.base import PAIR, Analysis, Events, Grid, Shape
from patching.analyses.circuit import draw
from patching.analyses.circuit.faithful import (ABLATIONS, FRACTIONS, ablated_outputs, area, circuit_values, counts,
                                                faithfulness, masks_of, prepared, smallest)
from patching.analyses.circuit.graph import Graph
from patching.analyses.circuit.scores import (METHODS, METRICS, eap, eap_ig_activations, eap_ig_inputs, exact,
                                              record, sender_outputs)
from patching.core.context import Context
from patching.core.errors import PatchingError
from patching.core.metrics import DIRECTIONS
from patching.core.metrics import METRICS as DEFINITIONS
from patching.core.options import Options, option
from patching.core.prompts import Pair, Prompts
from patching.core.serial import csv_text, expand, json_floats, json_text, read_text, slug
from patching.io.pages import colour, data_uri, render
from patching.io.yamlfile import read_yaml

TOP = 10  # edges the terminal and the check list
REPORT_EDGES = 30  # edges report.html lists (every edge is in results.csv)


@dataclass(frozen=True)
class CircuitOptions(Options):
    method: str = option("exact", help="exact (one patched run per edge, batched), eap, eap-ig-inputs or "
                         "eap-ig-activations [exact]", choices=METHODS)
    metric: str = option("logit-diff", help="[logit-diff]", choices=METRICS)
    direction: str = option("denoise", help="denoise: an edge's clean value into the corrupt run; noise: the "
                            "reverse [denoise]", choices=tuple(DIRECTIONS))
    ig_steps: int = option(5, help="EAP-IG: gradient steps between the two runs [5]", low=1, high=1000)
    per_position: bool = option(False, help="score every edge at every position too")
    ablation: str = option("corrupt", help="faithfulness: edges outside a circuit carry the corrupt run's value, "
                           "zero, or the mean over --reference [corrupt]", choices=ABLATIONS)
    reference: Prompts | None = option(None, help="mean ablation: one prompt per line [the clean prompt]",
                                       metavar="FILE")
    target_faithfulness: float = option(0.9, help="find the fewest top edges reaching this faithfulness [0.9]",
                                        flag="--target-faithfulness")
    hypothesis: str | None = option(None, help="a circuit to test: YAML with edges: or nodes: (wildcards), or "
                                    "MIB's circuit.json", metavar="FILE")
    check: bool = option(False, help="compare the estimate with the exact scores (correlation, recall, worst "
                         "edges, scatter.png)")
    max_rows: int = option(4096, help="exact: suffix rows per resumed batch (memory) [4096]", low=1, speed=True)

    def validate(self):
        if not 0 < self.target_faithfulness <= 2:
            raise PatchingError("target_faithfulness must be in (0, 2], e.g. 0.9.")
        if self.reference is not None:
            if self.ablation != "mean":
                raise PatchingError("--reference gives the prompts of mean ablation: add --ablation mean or drop it.")
            object.__setattr__(self, "reference", Prompts.of(self.reference, "reference"))
        if self.check and self.method == "exact":
            raise PatchingError("--check compares an estimate with the exact scores: give --method eap (or an "
                                "eap-ig method) with it.")


@dataclass
class CircuitResult:
    model: str
    graph: Graph
    tokens: list[str]
    target: tuple[str, int]
    foil: tuple[str, int]
    options: CircuitOptions
    scores: np.ndarray  # (n_edges,) or (n_edges, T) with per_position
    clean_value: float
    corrupt_value: float
    ranking: np.ndarray  # edge indices, largest |score| first
    faithfulness: list[dict]  # {fraction, n_edges, value}: top edges by |score|
    faithfulness_signed: list[dict]  # the same, edges ranked by score oriented toward the source run
    cpr: float
    cmd: float
    full_value: float
    empty_value: float
    circuit: dict  # {n_edges, value, target}: the fewest top edges reaching target_faithfulness
    hypothesis: dict | None = None
    check: dict | None = None
    timing: dict = field(default_factory=dict)
    corrupt_tokens: list[str] = field(default_factory=list)

    @property
    def summed(self) -> np.ndarray:
        return self.scores.sum(-1) if self.scores.ndim == 2 else self.scores

    @property
    def matrix(self) -> np.ndarray:
        """(n_readers, n_senders) summed scores, NaN where no edge exists."""
        m = np.full(self.graph.adjacency.shape, np.nan)
        m[self.graph.edges[:, 0], self.graph.edges[:, 1]] = self.summed
        return m

    def in_circuit(self) -> np.ndarray:
        return masks_of(self.ranking, [self.circuit["n_edges"]], len(self.graph))[0]

    def to_json(self) -> dict:
        g, o = self.graph, self.options
        doc = {"model": self.model, "tokens": self.tokens,
               "target": {"text": self.target[0], "id": self.target[1]}, "foil": {"text": self.foil[0], "id": self.foil[1]},
               "method": o.method, "metric": o.metric, "metric_definition": DEFINITIONS[o.metric], "direction": o.direction,
               "options": o.shown(), "graph": {"nodes": g.nodes, "readers": g.readers, "n_edges": len(g)},
               "clean_value": self.clean_value, "corrupt_value": self.corrupt_value,
               "edges": dict(zip(g.names, json_floats(self.summed))),
               "ranking": [g.names[i] for i in self.ranking],
               "ablation": o.ablation, "full_value": self.full_value, "empty_value": self.empty_value,
               "faithfulness": self.faithfulness, "faithfulness_signed": self.faithfulness_signed,
               "cpr": self.cpr, "cmd": self.cmd, "circuit": self.circuit, "timing": self.timing}
        if self.scores.ndim == 2:
            doc["edges_per_position"] = {n: json_floats(v) for n, v in zip(g.names, self.scores)}
        if self.hypothesis is not None:
            doc["hypothesis"] = self.hypothesis
        if self.check is not None:
            doc["check"] = self.check
        return json.loads(json_text(doc))


# ----------------------------------------------------------------------------- hypotheses


def read_hypothesis(path: str, graph: Graph) -> tuple[np.ndarray, str]:
    """An edge mask from a YAML file (edges: [...] or nodes: [...], wildcards allowed) or MIB's
    circuit.json (edges whose in_graph is true); every name must exist in this model's graph."""
    where = f"hypothesis {path}"
    if str(path).endswith(".json"):
        try:
            doc = json.loads(read_text(expand(path), "--hypothesis"))
        except json.JSONDecodeError as exc:
            raise PatchingError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}): fix the file.") from None
        cfg = doc.get("cfg", {}) if isinstance(doc, dict) else {}
        if cfg and (cfg.get("n_layers"), cfg.get("n_heads")) != (graph.n_layer, graph.n_head):
            raise PatchingError(f"{where} is a circuit of a model with {cfg.get('n_layers')} layers x {cfg.get('n_heads')} "
                                f"heads, not this one's {graph.n_layer} x {graph.n_head}: use a circuit of this model.")
        edges = doc.get("edges") if isinstance(doc, dict) else None
        if not isinstance(edges, dict):
            raise PatchingError(f"{where} has no edges mapping (MIB's format: edges: {{name: {{in_graph: ...}}}}).")
        chosen = [n for n, e in edges.items() if isinstance(e, dict) and e.get("in_graph")]
        return graph.select(chosen, where) if chosen else np.zeros(len(graph), dtype=bool), where
    doc = read_yaml(expand(path), "hypothesis file")
    if not isinstance(doc, dict) or set(doc) - {"edges", "nodes"} or len(doc) != 1:
        raise PatchingError(f"{where} must hold one key, edges: or nodes:, with a list of names (wildcards allowed).")
    (kind, names), = doc.items()
    if not isinstance(names, list) or not names:
        raise PatchingError(f"{where}: {kind} must be a non-empty list of names.")
    return (graph.select(names, where) if kind == "edges" else graph.of_nodes(names, where)), where


# ----------------------------------------------------------------------------- the analysis


def scores_of(ctx: Context, method: str, base_ids, base, source, delta, graph: Graph, value, options: CircuitOptions,
              events: Events) -> torch.Tensor:
    """(n_readers, n_senders[, T]) edge scores of one method."""
    pp, progress = options.per_position, events.progress
    if method == "exact":
        return exact(ctx.model, base, delta, graph, value, pp, options.max_rows, progress)
    if method == "eap":
        return eap(ctx.model, base_ids, delta, graph, value, pp)
    if method == "eap-ig-inputs":
        return eap_ig_inputs(ctx.model, base_ids, base, source, delta, graph, value, options.ig_steps, pp, progress)
    return eap_ig_activations(ctx.model, base_ids, base, source, delta, graph, value, options.ig_steps, pp, progress)


def circuit(ctx: Context, pair: Pair, options: CircuitOptions, events: Events | None = None) -> CircuitResult:
    events = events or Events()
    model, graph = ctx.model, Graph.of(ctx.config)
    t0 = time.perf_counter()
    prep, clean_ids, corrupt_ids, value = prepared(ctx, pair, options.metric)
    hypothesis = read_hypothesis(options.hypothesis, graph) if options.hypothesis else None  # before the work
    clean, corrupt = record(model, clean_ids), record(model, corrupt_ids)
    base_ids, base, source = (corrupt_ids, corrupt, clean) if options.direction == "denoise" else (clean_ids, clean, corrupt)
    delta = sender_outputs(model, source) - sender_outputs(model, base)  # (n_senders, T, C)
    clean_value, corrupt_value = (float(value(r.last_logits[0][None])[0]) for r in (clean, corrupt))
    t1 = time.perf_counter()
    s = scores_of(ctx, options.method, base_ids, base, source, delta, graph, value, options, events)
    scores = s.detach().cpu()[graph.edges[:, 0], graph.edges[:, 1]].numpy()  # (n_edges[, T])
    t2 = time.perf_counter()
    summed = scores.sum(-1) if scores.ndim == 2 else scores
    # oriented toward the source run: positive = moves the metric the way the source run differs
    toward = np.sign((clean_value - corrupt_value) * (1 if options.direction == "denoise" else -1)) or 1.0
    ranking = np.argsort(-np.abs(summed), kind="stable")
    signed = np.argsort(-(summed * toward), kind="stable")
    E = len(graph)
    ns = counts(E)
    ablated = ablated_outputs(ctx, corrupt_ids, options.ablation, options.reference, pair.clean)
    run = lambda masks: circuit_values(model, clean_ids, ablated, graph, masks, value)  # noqa: E731
    m = run(np.concatenate([np.ones((1, E), bool), np.zeros((1, E), bool), masks_of(ranking, ns, E),
                            masks_of(signed, ns, E)]))
    full, empty = float(m[0]), float(m[1])
    f_abs, f_signed = faithfulness(m[2:2 + len(ns)], full, empty), faithfulness(m[2 + len(ns):], full, empty)
    curve = lambda f: [{"fraction": fr, "n_edges": n, "value": float(v)} for fr, n, v in zip(FRACTIONS, ns, f)]  # noqa: E731
    cache = {}

    def f_of(n: int) -> float:
        if n not in cache:
            cache[n] = float(faithfulness(run(masks_of(ranking, [n], E)), full, empty)[0])
        return cache[n]

    n_min, f_min = smallest(ranking, E, f_of, options.target_faithfulness)
    t3 = time.perf_counter()
    result = CircuitResult(ctx.name, graph, prep.tokens, (prep.target, prep.target_id), (prep.foil, prep.foil_id),
                           options, scores, clean_value, corrupt_value, ranking, curve(f_abs), curve(f_signed),
                           area(FRACTIONS, f_signed), area(FRACTIONS, np.abs(1 - f_abs)), full, empty,
                           {"n_edges": int(n_min), "value": f_min, "target": options.target_faithfulness})
    result.corrupt_tokens = prep.corrupt_tokens
    if hypothesis is not None:
        result.hypothesis = test_hypothesis(hypothesis, run, full, empty, graph)
    if options.check:
        want = exact(model, base, delta, graph, value, False, options.max_rows)[graph.edges[:, 0], graph.edges[:, 1]]
        result.check = compare(summed, want.cpu().numpy(), graph)
    result.timing = {"record_seconds": round(t1 - t0, 6), "scores_seconds": round(t2 - t1, 6),
                     "faithfulness_seconds": round(t3 - t2, 6)}
    return result


def test_hypothesis(hypothesis, run, full: float, empty: float, graph: Graph) -> dict:
    """Faithfulness of the stated circuit, and what removing each of its edges alone costs."""
    mask, where = hypothesis
    inside = np.flatnonzero(mask)
    without = np.repeat(mask[None], len(inside), axis=0)
    without[np.arange(len(inside)), inside] = False
    m = run(np.concatenate([mask[None], without]))
    f = faithfulness(m, full, empty)
    return {"file": where.removeprefix("hypothesis "), "n_edges": int(len(inside)), "faithfulness": float(f[0]),
            "value": float(m[0]),
            "removal_cost": {graph.names[i]: float(f[0] - fi) for i, fi in zip(inside, f[1:])}}


def compare(estimate: np.ndarray, exact_scores: np.ndarray, graph: Graph) -> dict:
    """How far an estimate is from the exact scores: correlations, top-n recall, the worst edges."""
    a, b = estimate.astype(np.float64), exact_scores.astype(np.float64)
    rank = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)  # noqa: E731
    pearson = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    spearman = float(np.corrcoef(rank(a), rank(b))[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    recall = {}
    for n in (10, 100, 1000):
        if n < len(a):
            top_e, top_x = set(np.argsort(-np.abs(a))[:n]), set(np.argsort(-np.abs(b))[:n])
            recall[str(n)] = len(top_e & top_x) / n
    worst = np.argsort(-np.abs(a - b))[:TOP]
    return {"pearson": pearson, "spearman": spearman, "top_n_recall": recall,
            "max_abs_error": float(np.abs(a - b).max()), "exact": json_floats(b),
            "worst": [{"edge": graph.names[i], "estimate": float(a[i]), "exact": float(b[i])} for i in worst]}


# ----------------------------------------------------------------------------- files


def circuit_json(r: CircuitResult) -> dict:
    """MIB's circuit format: cfg, nodes {in_graph}, edges {score, in_graph} (the circuit reaching the
    target faithfulness)."""
    g, inside = r.graph, r.in_circuit()
    used = {"logits"} | {g.senders[s] for (_, s), k in zip(g.edges, inside) if k} | \
        {g.readers[j].split("<")[0] for (j, _), k in zip(g.edges, inside) if k}
    cfg = r.options
    return {"cfg": {"n_layers": g.n_layer, "n_heads": g.n_head, "parallel_attn_mlp": False, "model": r.model,
                    "method": cfg.method, "metric": cfg.metric, "direction": cfg.direction},
            "nodes": {n: {"in_graph": n in used} for n in g.nodes},
            "edges": {n: {"score": float(v), "in_graph": bool(k)} for n, v, k in zip(g.names, r.summed, inside)}}


def files(r: CircuitResult, figures: bool = True) -> dict:
    g = r.graph
    rank = np.empty(len(g), dtype=np.int64)
    rank[r.ranking] = np.arange(1, len(g) + 1)
    rows = [[name, g.senders[s], g.readers[j], float(v), int(k)] for name, (j, s), v, k in zip(g.names, g.edges, r.summed, rank)]
    out = {"results.json": json_text(r.to_json()),
           "results.csv": csv_text(["edge", "sender", "reader", "score", "rank"], rows),
           "circuit.json": json_text(circuit_json(r)),
           "circuit.dot": draw.dot(r), "circuit.svg": draw.svg(r)}
    if figures:
        out["faithfulness.png"] = draw.faithfulness_png(r)
        if r.check is not None:
            out["scatter.png"] = draw.scatter_png(r)
    out["report.html"] = report(r, out["circuit.svg"], out.get("faithfulness.png"), out.get("scatter.png"))
    return out


def report(r: CircuitResult, svg: str, faithfulness_png: bytes | None, scatter_png: bytes | None) -> str:
    """report.html: the run, the circuit drawn inline, the faithfulness curve, the hypothesis and the
    check where asked, the strongest edges; self-contained (figures inline)."""
    g = r.graph
    lim = float(np.abs(r.summed).max(initial=0.0))
    top = [(k + 1, g.names[i], g.senders[g.edges[i][1]], g.readers[g.edges[i][0]], float(r.summed[i]),
            colour(float(r.summed[i]), lim)) for k, i in enumerate(r.ranking[:REPORT_EDGES])]
    removal = []
    if r.hypothesis:
        costs = r.hypothesis["removal_cost"]
        high = max((abs(v) for v in costs.values()), default=0.0)
        removal = [(n, v, colour(v, high)) for n, v in sorted(costs.items(), key=lambda kv: -abs(kv[1]))]
    return render("circuit.html", r=r, o=r.options, definition=DEFINITIONS[r.options.metric],
                  clean="".join(r.tokens), corrupt="".join(r.corrupt_tokens), svg=svg,
                  faithfulness_png=data_uri(faithfulness_png) if faithfulness_png else None,
                  scatter_png=data_uri(scatter_png) if scatter_png else None,
                  curve=list(zip(r.faithfulness, r.faithfulness_signed)), hypothesis=r.hypothesis,
                  removal=removal, check=r.check, top=top)


class Circuit(Analysis):
    name = "circuit"
    help = "circuits: every edge's exact effect (or EAP, EAP-IG), faithfulness curves, CPR/CMD and hypotheses"
    Options = CircuitOptions
    takes = PAIR
    figures = ("faithfulness.png", "scatter.png")
    timing_keys = ("scores_seconds",)

    def run(self, ctx: Context, pair: Pair, options: CircuitOptions, events: Events | None = None) -> CircuitResult:
        options.verify()
        return circuit(ctx, self.check_input(pair), options, events)

    def files(self, result: CircuitResult, figures: bool = True) -> dict:
        return files(result, figures)

    def timing(self, result: CircuitResult, seconds: float) -> dict:
        return {"scores_seconds": result.timing["scores_seconds"]}

    def lines(self, r: CircuitResult) -> list[str]:
        g, o = r.graph, r.options
        out = [f"{g.describe()}; {o.method} scores of {o.metric} ({o.direction}); clean {r.clean_value:.4f}, "
               f"corrupt {r.corrupt_value:.4f}"]
        out += [f"  {g.names[i]}: {r.summed[i]:+.4f}" for i in r.ranking[:TOP]]
        out.append(f"faithfulness ({o.ablation} ablation): CPR {r.cpr:.3f}, CMD {r.cmd:.3f}; "
                   f"{r.circuit['n_edges']} top edges reach f = {r.circuit['value']:.3f} (target {o.target_faithfulness})")
        if r.hypothesis:
            h = r.hypothesis
            out.append(f"hypothesis {h['file']}: {h['n_edges']} edges, faithfulness {h['faithfulness']:.3f}")
        if r.check:
            c = r.check
            out.append(f"check against exact: pearson {c['pearson']:.3f}, spearman {c['spearman']:.3f}, "
                       f"max |error| {c['max_abs_error']:.3g}")
        return out

    def folder_name(self, ctx: Context, pair: Pair, options: CircuitOptions) -> str:
        return f"circuit-{slug(options.method + '-' + pair.clean, 50)}"

    # ------------------------------------------------------------------ studies: the mean score of every edge

    def shape(self, options: CircuitOptions, config) -> Shape:
        g = Graph.of(config)
        return Shape(axes=["reader", "sender"], metrics=["score"], metric="score",
                     scalars=["clean_value", "corrupt_value", "faithfulness_of_circuit", "cpr", "cmd"],
                     labels={"reader": g.readers, "sender": g.senders},
                     definition=f"{options.method} score of the edge sender -> reader: the change of "
                                f"{DEFINITIONS[options.metric]} ({options.direction}); NaN/null where no edge exists",
                     row_label="reader")

    def grid(self, r: CircuitResult) -> Grid:
        f = r.hypothesis["faithfulness"] if r.hypothesis else r.circuit["value"]
        return Grid({"score": r.matrix}, r.tokens, {"clean_value": r.clean_value, "corrupt_value": r.corrupt_value,
                                                    "faithfulness_of_circuit": f, "cpr": r.cpr, "cmd": r.cmd})

    def title(self, options: CircuitOptions) -> str:
        return f"circuit {options.method} ({options.direction})"

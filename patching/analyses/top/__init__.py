"""Max-activating examples: the contexts of a corpus where one unit (a neuron, a head, a direction) is
most active, for one unit or, in one pass, for every unit of a site.

Method: tokenise every document, cut it into windows of the model's context (patching.analyses.top.corpus),
run the windows in batches once, and read the unit's value at every document token through the model's
seam (scan.py). One unit: every token's value is kept (4 bytes a token), so the top-k is a full sort
with ties broken by (document, position), and the quantile bands, the histogram and the density are
exact. `--unit all`: every unit's top-k, density, mean and histogram are folded in batch by batch into
an index folder (index.py, fold.py), with every unit's values at a fixed uniform sample of tokens for
the quantile bands; memory is bounded by the batch, k, the histogram bins and the sample. `--index DIR
--unit U` then renders one unit from it with no forward.
Each example is the window the model read, cut to --context tokens before the maximum and --after after
it. A neuron's (or residual direction's) output direction is read through the final LayerNorm's centring
and gain and the unembedding, as DLA does: the tokens it promotes and suppresses most. docs/top.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from patching.analyses.base import NOTHING, Analysis, Events
from patching.analyses.top import corpus as corpora
from patching.analyses.top import index as indexes
from patching.analyses.top import report
from patching.analyses.top.scan import (UNIT_SITES, Observe, Unit, direction_vector, make_batch, parse_unit,
                                        reduce, _paid)
from patching.core.context import Context
from patching.core.errors import PatchingError
from patching.core.options import Options, option
from patching.core.serial import expand, slug

MAX_K = 1000
BANDS = ((0.99, 0.999), (0.9, 0.99), (0.5, 0.9), (0.0, 0.5))  # quantile bands sampled below the top


@dataclass(frozen=True)
class TopOptions(Options):
    unit: str = option(help="mlp_post:L.N (a neuron), z:L.H (a head's output norm), pattern:L.H (attention a "
                       "token pays to earlier ones), SITE:L@FILE.npy (a direction), or all (every unit of --site, "
                       "into --index)")
    corpus: str | None = option(None, help="python-docs, a .txt file (paragraphs), a folder of .txt files, a "
                                ".jsonl/.csv file (--column), or a Hugging Face dataset id (online, `datasets`)")
    k: int = option(20, help=f"top examples per unit [20] (at most {MAX_K})", low=1, high=MAX_K)
    context: int = option(24, help="tokens shown before the maximum [24]", low=0)
    after: int = option(4, help="tokens shown after the maximum [4]", low=0)
    site: str = option("mlp_post", help="the site of --unit all [mlp_post]", choices=UNIT_SITES)
    index: str | None = option(None, help="an index folder: --unit all builds it (or resumes it); with one unit, "
                               "that unit is read from it with no forward")
    column: str = option("text", help="the text column of a .jsonl/.csv corpus or a dataset [text]")
    prepend_bos: bool = option(False, help="start every window with <|endoftext|> (not counted as a token)")
    window: int = option(0, help="model positions per window [0: the model's context]", low=0)
    batch_size: int = option(8, help="windows per forward [8]", low=1, speed=True)
    samples: int = option(5, help="examples drawn from each quantile band [5]; 0: none", low=0, high=MAX_K)
    threshold: float = option(0.0, help="density: the share of tokens above this value [0]")
    bins: int = option(50, help="histogram bins [50]", low=1, high=10000)
    logits: int = option(10, help="tokens the unit's output direction promotes and suppresses [10]", low=0,
                         high=1000)
    histograms: bool = option(True, negate="--no-histograms", help="--unit all: keep no histograms in the index "
                              "(a quicker pass; units read from it then have none)")

    def validate(self):
        if self.index is None and self.corpus is None:
            raise PatchingError("give --corpus SOURCE (python-docs, a file or a folder), or --index DIR to read a "
                                "unit from an index.")
        if self.unit == "all" and self.index is None:
            raise PatchingError("--unit all keeps every unit's top-k in an index folder: give --index DIR.")
        if self.unit == "all" and self.corpus is None:
            raise PatchingError("--unit all reads a corpus: give --corpus SOURCE.")
        if self.unit != "all" and not self.histograms:
            raise PatchingError("--no-histograms is for --unit all (an index); one unit always gets its histogram.")


@dataclass
class Example:
    activation: float
    document: int
    position: int
    tokens: list[str]
    index: int  # the max token in `tokens`
    activations: list | None  # every token's value (None: only the max is known, from an index)
    source: int | None = None  # pattern units: the source (in `tokens`) it attends to most

    def to_json(self) -> dict:
        d = {"activation": self.activation, "document": self.document, "position": self.position,
             "tokens": self.tokens, "index": self.index, "activations": self.activations}
        if self.source is not None:
            d["source"] = self.source
        return d


@dataclass
class TopResult:
    model: str
    unit: Unit
    options: TopOptions
    corpus: str
    n_documents: int
    n_tokens: int
    top: list[Example]
    density: float
    mean: float
    quantiles: list | None = None
    histogram: dict | None = None
    promoted: list | None = None
    suppressed: list | None = None
    from_index: str | None = None
    band_sample: int | None = None  # from an index: the tokens of the uniform sample the bands come from

    def to_json(self) -> dict:
        o = self.options
        return {"analysis": "top", "model": self.model, "unit": self.unit.name, "kind": self.unit.kind,
                "site": self.unit.site, "layer": self.unit.layer, "index": self.unit.index,
                "direction_file": self.unit.file, "corpus": self.corpus, "n_documents": self.n_documents,
                "n_tokens": self.n_tokens, "k": o.k, "context": o.context, "after": o.after,
                "prepend_bos": o.prepend_bos, "threshold": o.threshold, "from_index": self.from_index,
                "band_sample": self.band_sample, "top": [e.to_json() for e in self.top],
                "quantiles": None if self.quantiles is None else
                [{**{k: v for k, v in q.items() if k != "examples"}, "examples": [e.to_json() for e in q["examples"]]}
                 for q in self.quantiles],
                "histogram": self.histogram, "density": self.density, "mean": self.mean,
                "promoted": self.promoted, "suppressed": self.suppressed}


@dataclass
class AllResult:
    model: str
    meta: dict
    folder: str
    maxima: np.ndarray  # (L, U) each unit's largest value
    density: np.ndarray  # (L, U)
    mean: np.ndarray  # (L, U)
    strongest: list = field(default_factory=list)

    def to_json(self) -> dict:
        m = self.meta
        L, U = self.maxima.shape
        return {"analysis": "top", "model": self.model, "unit": "all", "site": m["site"], "index_folder": self.folder,
                "corpus": m["corpus"], "n_documents": m["n_documents"], "n_tokens": m["n_tokens"], "k": m["k"],
                "units": L * U, "threshold": m["threshold"],
                "layers": [{"layer": l, "density_mean": float(self.density[l].mean()),
                            "never_above": int((self.density[l] == 0).sum()), "max": float(self.maxima[l].max())}
                           for l in range(L)],
                "strongest": self.strongest}


# ----------------------------------------------------------------------------- one unit


def _example(tok, corpus, d: int, p: int, acts_doc, size: int, bos: bool, o: TopOptions, source=None) -> Example:
    """The example at (document d, position p): the window the model read, cut around p."""
    step = size - (1 if bos else 0)
    w0 = (p // step) * step  # the window holding p starts here
    n = int(corpus.offsets[d + 1] - corpus.offsets[d])
    a, b = max(w0, p - o.context), min(w0 + step, n, p + o.after + 1)
    ids = corpus.document(d)[a:b]
    acts = None if acts_doc is None else [float(v) for v in acts_doc[a:b]]
    value = float(acts_doc[p]) if acts_doc is not None else None
    src = None if source is None or source < a else int(source - a)
    return Example(value, int(d), int(p), [tok.token_str(int(i)) for i in ids], int(p - a), acts, src)


def output_direction(model, unit: Unit, vector) -> torch.Tensor | None:
    """What one unit of the unit adds to the residual stream (a neuron: its c_proj column), or None (heads)."""
    if unit.site == "mlp_post":
        w = model.transformer.h[unit.layer].mlp.c_proj.weight  # (C, n_inner)
        return w[:, unit.index] if vector is None else w @ vector.to(w)
    if vector is not None:  # a residual direction is its own output
        return vector
    return None


@torch.no_grad()
def logit_effects(model, tok, d: torch.Tensor | None, n: int) -> tuple[list | None, list | None]:
    """The tokens the direction d raises and lowers most through ln_f (centring, gain) and the unembedding."""
    if d is None or n == 0:
        return None, None
    tr = model.transformer
    d = d.double().to(tr.ln_f.weight.device)
    g = (d - d.mean()) * tr.ln_f.weight.double()
    logits = (tr.wte.weight.double() @ g).cpu()
    row = lambda i: {"token": tok.token_str(int(i)), "id": int(i), "logit": float(logits[i])}  # noqa: E731
    up, down = torch.topk(logits, n).indices, torch.topk(-logits, n).indices
    return [row(i) for i in up], [row(i) for i in down]


@torch.no_grad()
def scan_unit(ctx: Context, corpus, unit: Unit, o: TopOptions, progress=None):
    """Every document token's value of one unit, (n_tokens,) float32 in corpus order, and for pattern units
    each token's most attended source (document position, -1 where none)."""
    model, cfg = ctx.model, ctx.config
    size = o.window or cfg.block_size
    wins = corpora.windows(corpus, size, o.prepend_bos)
    groups = corpora.batches(wins, o.batch_size)
    vector = direction_vector(unit, cfg) if unit.file else None
    first = 1 if o.prepend_bos else 0
    seen = {}

    def see(layer, x):
        if unit.site == "pattern":
            v, s = _paid(x, first)
            seen["x"], seen["src"] = v[..., unit.index], s[..., unit.index]
        else:
            a = reduce(unit.site, x, first, vector)
            seen["x"] = a[..., 0 if vector is not None else unit.index]

    observe = Observe(unit.site, [unit.layer], see)
    acts = np.full(corpus.n_tokens, np.nan, dtype=np.float32)
    source = np.full(corpus.n_tokens, -1, dtype=np.int64) if unit.site == "pattern" else None
    for bi, members in enumerate(groups):
        b = make_batch(corpus, wins, members, o.prepend_bos, cfg.vocab_size - 1, ctx.device)
        model(b.ids, patch=observe, last_only=True)
        where = b.where(corpus.offsets)
        acts[where] = seen.pop("x").float().cpu().numpy()[b.valid]
        if source is not None:
            s = seen.pop("src").cpu().numpy()  # model positions
            rows = np.nonzero(b.valid)[0]
            src = s[b.valid]
            source[where] = np.where(src >= 0, b.position[rows, np.maximum(src, 0)], -1)
        if progress:
            progress(bi + 1, len(groups))
    if not np.isfinite(acts).all():
        raise PatchingError(f"the model produced non-finite values for {unit.name}: its weights may be damaged.")
    return acts, source


def bands(values: np.ndarray, order: np.ndarray, n: int, k: int, shown: np.ndarray, samples: int, ex) -> list[dict]:
    """The quantile bands: values (m,) at m tokens in corpus order (every token, or a uniform sample of
    them), `order` their ranks (largest first, ties in corpus order), n the corpus's tokens, k the top
    examples shown and `shown` those among the m tokens. Band (lo, hi) holds the tokens ranked between
    those quantiles, top examples left out; examples are drawn from it with seed 0, `ex(i)` makes the i-th."""
    m = len(values)
    rng = np.random.default_rng(0)
    out = []
    for lo, hi in BANDS:  # ranks from the top
        a, b = int(np.floor((1 - hi) * m)), int(np.floor((1 - lo) * m))
        members = order[a:b][~shown[order[a:b]]]
        pick = np.sort(rng.choice(len(members), min(samples, len(members)), replace=False)) if len(members) else []
        top, bottom = int(np.floor((1 - hi) * n)), int(np.floor((1 - lo) * n))
        out.append({"band": [lo, hi], "low": float(np.quantile(values, lo)), "high": float(np.quantile(values, hi)),
                    "tokens": bottom - max(top, min(k, bottom)),  # in the corpus, by rank alone
                    "examples": [ex(members[j]) for j in pick]})
    return out


def summarize(ctx: Context, corpus, unit: Unit, acts: np.ndarray, source, o: TopOptions) -> TopResult:
    tok, cfg = ctx.tok, ctx.config
    size = o.window or cfg.block_size
    n = corpus.n_tokens
    doc = np.repeat(np.arange(corpus.n_documents), np.diff(corpus.offsets))
    pos = np.arange(n) - corpus.offsets[doc]
    # corpus order is (document, position) order, so a stable sort of -value breaks ties by them
    order = np.argsort(-acts.astype(np.float64), kind="stable")

    def ex(i):
        d = int(doc[i])
        return _example(tok, corpus, d, int(pos[i]), acts[corpus.offsets[d]:corpus.offsets[d + 1]], size,
                        o.prepend_bos, o, None if source is None else int(source[i]))

    top = [ex(i) for i in order[:o.k]]
    shown = np.zeros(n, bool)
    shown[order[:o.k]] = True
    quantiles = bands(acts, order, n, len(top), shown, o.samples, ex)
    counts, edges = np.histogram(acts.astype(np.float64), bins=o.bins)
    up, down = logit_effects(ctx.model, tok, output_direction(ctx.model, unit, direction_vector(unit, cfg)
                                                              if unit.file else None), o.logits)
    return TopResult(ctx.name, unit, o, corpus.source, corpus.n_documents, n, top,
                     float((acts > o.threshold).mean()), float(acts.astype(np.float64).mean()), quantiles,
                     {"edges": edges.tolist(), "counts": counts.tolist()}, up, down)


def from_index(ctx: Context, o: TopOptions) -> TopResult:
    """One unit rendered from an index, with no forward: its top-k, density, mean and histogram (exact),
    and quantile bands drawn from the index's uniform token sample."""
    folder = expand(o.index)
    meta, st, corpus = indexes.read(folder)

    class Shape:  # the index's model, for checking the unit
        n_layer, n_inner, n_head = meta["n_layers"], meta["units_per_layer"], meta["units_per_layer"]
    unit = parse_unit(o.unit, Shape)
    if unit.site != meta["site"]:
        raise PatchingError(f"the index {folder} holds {meta['site']} units, not {unit.site}: ask for "
                            f"{meta['site']}:L.N, or build an index of {unit.site}.")
    l, u = unit.layer, unit.index
    size, bos = meta["window"], meta["prepend_bos"]
    top = []
    for j in range(min(o.k, meta["k"])):
        d, p = int(st["document"][l, u, j]), int(st["position"][l, u, j])
        if d < 0:
            break
        e = _example(ctx.tok, corpus, d, p, None, size, bos, o)
        e.activation = float(st["values"][l, u, j])
        top.append(e)
    n = meta["n_tokens"]
    # the sample: the same tokens for every unit, in corpus order
    sd, sp, sv = st["sample_document"], st["sample_position"], st["sample"][l, :, u]
    shown = np.isin(corpus.offsets[sd] + sp, [corpus.offsets[e.document] + e.position for e in top])

    def ex(i):
        e = _example(ctx.tok, corpus, int(sd[i]), int(sp[i]), None, size, bos, o)
        e.activation = float(sv[i])
        return e

    quantiles = bands(sv, np.argsort(-sv.astype(np.float64), kind="stable"), n, len(top), shown, o.samples, ex)
    histogram = None
    if meta["histograms"]:
        counts = st["hist"][l, u]
        full = np.nonzero(counts)[0]
        first, last = int(full[0]), int(full[-1])
        # bin j holds ((start + j - 1) w, (start + j) w], w = 2**exponent (fold.py): right-closed bins
        edges = [float(np.ldexp(float(st["start"][l, u] + j - 1), int(st["exponent"][l, u])))
                 for j in range(first, last + 2)]
        histogram = {"edges": edges, "counts": counts[first:last + 1].tolist(), "closed": "right"}
    up = down = None
    if ctx.name == meta["model"]:  # the weights the index was built from: the output direction is theirs
        up, down = logit_effects(ctx.model, ctx.tok, output_direction(ctx.model, unit, None), o.logits)
    return TopResult(meta["model"], unit, o.replace(prepend_bos=bos), meta["corpus"], meta["n_documents"], n, top,
                     float(st["above"][l, u]) / n, float(st["total"][l, u]) / n, quantiles, histogram,
                     promoted=up, suppressed=down, from_index=str(folder), band_sample=len(sv))


def summarize_all(ctx: Context, meta: dict, folder) -> AllResult:
    st = indexes.load_state(folder)
    n = meta["n_tokens"]
    maxima = st["values"][:, :, 0].astype(np.float64)
    density, mean = st["above"] / n, st["total"] / n
    flat = np.argsort(-maxima.ravel(), kind="stable")[:20]
    U = maxima.shape[1]
    strongest = [{"unit": f"{meta['site']}:{i // U}.{i % U}", "max": float(maxima.ravel()[i]),
                  "density": float(density.ravel()[i])} for i in flat]
    return AllResult(ctx.name, meta, str(folder), maxima, density, mean, strongest)


class Top(Analysis):
    name = "top"
    help = "max-activating examples of a neuron, head or direction over a corpus (or every unit at once, --unit all)"
    Options = TopOptions
    takes = NOTHING

    @torch.no_grad()
    def run(self, ctx: Context, input: None, options: TopOptions, events: Events | None = None):
        options.verify()
        self.check_input(input)
        events = events or Events()
        o = options
        if o.index is not None and o.unit != "all":
            return from_index(ctx, o)
        unit = parse_unit(o.unit, ctx.config)
        if o.window > ctx.config.block_size:
            raise PatchingError(f"--window {o.window} is longer than this model's context of {ctx.config.block_size}.")
        if isinstance(unit, Unit) and unit.file:
            direction_vector(unit, ctx.config)  # a bad file fails before the corpus is read
        corpus = corpora.tokenize(ctx.tok, o.corpus, corpora.documents(o.corpus, o.column), ctx.config.vocab_size)
        if unit == "all":
            folder = expand(o.index)
            meta = indexes.build(ctx, corpus, o.site, o, folder, events.progress)
            return summarize_all(ctx, meta, folder)
        acts, source = scan_unit(ctx, corpus, unit, o, events.progress)
        return summarize(ctx, corpus, unit, acts, source, o)

    def files(self, result, figures: bool = True) -> dict:
        return report.files(result, figures)

    def lines(self, result) -> list[str]:
        return report.lines(result)

    def folder_name(self, ctx: Context, input: None, options: TopOptions) -> str:
        return f"top-{slug(options.unit.replace('.', '-'), 40)}-{slug(ctx.name, 30)}"

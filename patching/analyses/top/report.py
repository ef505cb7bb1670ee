"""What `top` writes: results.json, examples.jsonl, histogram.png and top.html for one unit; results.json
and units.csv for an index of every unit (docs/top.md)."""
from __future__ import annotations

import json

import numpy as np

from patching.core.figures import figure, png_bytes, show
from patching.core.serial import csv_text, json_text
from patching.io.pages import data_uri, render


def _is_all(r) -> bool:
    return hasattr(r, "maxima")


def histogram_png(r) -> bytes:
    h = r.histogram
    edges, counts = np.array(h["edges"]), np.array(h["counts"])
    fig = figure(6.4, 3.2, layout="constrained")
    ax = fig.subplots()
    ax.bar(edges[:-1], np.maximum(counts, 0), width=np.diff(edges), align="edge", color="#d6604d", log=True)
    ax.set_xlabel(f"{r.unit.name} activation")
    ax.set_ylabel("tokens (log)")
    ax.set_title(f"{r.unit.name} over {r.n_tokens:,} tokens; top-{len(r.top)} shown on the page", fontsize=9)
    return png_bytes(fig, dpi=110)


def _colour(v, lim: float) -> str:
    """Red for positive values, blue for negative, white at zero; transparent where unknown."""
    if v is None or lim <= 0:
        return "transparent"
    x = max(-1.0, min(1.0, v / lim))
    fade = lambda c: int(255 - (255 - c) * abs(x) * 0.85)  # noqa: E731
    r, g, b = (214, 96, 77) if x > 0 else (67, 147, 195)
    return f"rgb({fade(r)}, {fade(g)}, {fade(b)})"


def _rows(examples, lim: float) -> list[dict]:
    """Each example's tokens as the page draws them: text, colour, hover title, the max token marked."""
    out = []
    for rank, e in enumerate(examples, 1):
        toks = []
        for i, t in enumerate(e.tokens):
            v = e.activations[i] if e.activations is not None else (e.activation if i == e.index else None)
            title = f"{v:.4g}" if v is not None else "not in the index"
            toks.append({"text": show(t), "bg": _colour(v, lim), "title": title, "max": i == e.index,
                         "source": e.source == i})
        out.append({"rank": rank, "activation": e.activation, "document": e.document, "position": e.position,
                    "tokens": toks})
    return out


def page(r, histogram: bytes | None) -> str:
    lim = max([abs(e.activation) for e in r.top] or [0.0])
    bands = [{"band": q["band"], "low": q["low"], "high": q["high"], "tokens": q["tokens"],
              "rows": _rows(q["examples"], lim)} for q in (r.quantiles or [])]
    return render("top.html", r=r, doc=r.to_json(), rows=_rows(r.top, lim), bands=bands,
                  histogram=data_uri(histogram) if histogram else None)


def examples_jsonl(r) -> str:
    lines = [json.dumps({"kind": "top", "rank": i, **e.to_json()}) for i, e in enumerate(r.top, 1)]
    for q in r.quantiles or []:
        lines += [json.dumps({"kind": "band", "band": q["band"], **e.to_json()}) for e in q["examples"]]
    return "\n".join(lines) + "\n"


def files(r, figures: bool = True) -> dict:
    if _is_all(r):
        L, U = r.maxima.shape
        site = r.meta["site"]
        rows = [[f"{site}:{l}.{u}", l, u, repr(float(r.maxima[l, u])), repr(float(r.density[l, u])),
                 repr(float(r.mean[l, u]))] for l in range(L) for u in range(U)]
        return {"results.json": json_text(r.to_json()),
                "units.csv": csv_text(["unit", "layer", "index", "max", "density", "mean"], rows)}
    hist = histogram_png(r) if figures and r.histogram is not None else None
    out = {"results.json": json_text(r.to_json()), "examples.jsonl": examples_jsonl(r), "top.html": page(r, hist)}
    if hist is not None:
        out["histogram.png"] = hist
    return out


def _snippet(e, width: int = 8) -> str:
    a = max(0, e.index - width)
    before = "".join(e.tokens[a:e.index])
    return f"{before}[[{e.tokens[e.index]}]]{''.join(e.tokens[e.index + 1:e.index + 3])}".replace("\n", "\\n")


def lines(r) -> list[str]:
    if _is_all(r):
        m = r.meta
        out = [f"{m['units_per_layer'] * m['n_layers']} {m['site']} units over {m['n_tokens']:,} tokens of "
               f"{m['n_documents']} documents; index in {r.folder}"]
        out += [f"  {s['unit']}: max {s['max']:.3f}, density {s['density']:.3f}" for s in r.strongest[:5]]
        return out
    out = [f"{r.unit.name} over {r.n_tokens:,} tokens of {r.n_documents} documents: density {r.density:.3f} "
           f"(above {r.options.threshold:g}), mean {r.mean:.3f}"]
    out += [f"  {e.activation:8.3f}  doc {e.document} pos {e.position}: {_snippet(e)}" for e in r.top[:5]]
    if r.promoted:
        out.append("  promotes: " + ", ".join(repr(p["token"]) for p in r.promoted[:5]))
        out.append("  suppresses: " + ", ".join(repr(p["token"]) for p in r.suppressed[:5]))
    return out

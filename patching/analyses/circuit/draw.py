"""The circuit's pictures: circuit.svg drawn here (no Graphviz needed), circuit.dot for those who have
Graphviz, the faithfulness curve and the estimate-vs-exact scatter.

circuit.svg: one row per layer (input at the bottom, logits at the top), a layer's heads side by side
with its MLP above them; the edges of the circuit that reaches the target faithfulness as lines whose
width follows |score|, coloured by what they feed (a head's query, key or value, an MLP, the logits),
solid when the edge pushes toward the source run, dashed otherwise.
"""
from __future__ import annotations

from html import escape

import numpy as np

from patching.core.figures import figure, png_bytes

COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#9467bd", "m": "#ff7f0e", "logits": "#d62728"}
MAX_DRAWN = 200  # edges drawn at most (the strongest of the circuit)


def _kind(reader: str) -> str:
    return reader[-2] if reader.endswith(">") else ("logits" if reader == "logits" else "m")


def _layout(graph) -> dict[str, tuple[float, float]]:
    """Node -> (x, y) in the SVG: rows bottom-up (input, per layer heads then MLP, logits)."""
    H, L = graph.n_head, graph.n_layer
    width = max(4, H) * 80 + 160
    row = 70
    height = (2 * L + 2) * row
    pos = {"input": (width / 2, height - row / 2), "logits": (width / 2, row / 2)}
    for l in range(L):
        y_heads = height - row / 2 - (2 * l + 1) * row
        for h in range(H):
            pos[f"a{l}.h{h}"] = (50 + (h + 0.5) * (width - 180) / H, y_heads)
        pos[f"m{l}"] = (width - 50, y_heads - row / 2)  # at the right, between its heads and the next layer's
    return pos


def _drawn(r) -> list[int]:
    inside = np.flatnonzero(r.in_circuit())
    return sorted(inside, key=lambda i: -abs(r.summed[i]))[:MAX_DRAWN]


def svg(r) -> str:
    g = r.graph
    pos = _layout(g)
    width = max(pos[n][0] for n in pos) + 60
    height = max(pos[n][1] for n in pos) + 56
    drawn = _drawn(r)
    top = max((abs(r.summed[i]) for i in drawn), default=1.0) or 1.0
    toward = 1.0 if r.options.direction == "denoise" else -1.0
    sign = np.sign(r.clean_value - r.corrupt_value) * toward or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11">',
             f'<title>{escape(r.model)}: circuit of {r.circuit["n_edges"]} edges, faithfulness '
             f'{r.circuit["value"]:.3f}</title>', '<rect width="100%" height="100%" fill="white"/>']
    used = {"input", "logits"}
    for i in drawn:
        j, s = g.edges[i]
        sender, reader = g.senders[s], g.readers[j]
        node = reader.split("<")[0]
        used.update((sender, node))
        (x1, y1), (x2, y2) = pos[sender], pos[node]
        kind = _kind(reader)
        dx = {"q": -8, "k": 0, "v": 8}.get(kind, 0)  # a head's three inputs side by side
        w = 0.6 + 5.4 * abs(r.summed[i]) / top
        dash = "" if r.summed[i] * sign >= 0 else ' stroke-dasharray="5,3"'
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2 + dx:.1f}" y2="{y2 + 12:.1f}" stroke="{COLOURS[kind]}" '
                     f'stroke-width="{w:.2f}" stroke-opacity="0.75"{dash}><title>{escape(g.names[i])}: '
                     f'{r.summed[i]:+.4g}</title></line>')
    for name, (x, y) in pos.items():
        on = name in used
        parts.append(f'<g opacity="{1.0 if on else 0.3}"><rect x="{x - 26:.1f}" y="{y - 11:.1f}" width="52" height="22" '
                     f'rx="5" fill="{"#fdf1d6" if name.startswith("m") else "#e8eef7"}" stroke="#555"/>'
                     f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{escape(name)}</text></g>')
    legend = " ".join(f'<tspan fill="{c}">■ {k}</tspan>' for k, c in COLOURS.items())
    parts.append(f'<text x="8" y="{height - 22:.0f}">{legend}</text>')
    parts.append(f'<text x="8" y="{height - 8:.0f}">width: |score|; dashed: against the source run</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def dot(r) -> str:
    g = r.graph
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, style=rounded, fontname="Helvetica"];']
    drawn = _drawn(r)
    top = max((abs(r.summed[i]) for i in drawn), default=1.0) or 1.0
    for i in drawn:
        j, s = g.edges[i]
        reader = g.readers[j]
        kind = _kind(reader)
        lines.append(f'  "{g.senders[s]}" -> "{reader.split("<")[0]}" [color="{COLOURS[kind]}", '
                     f'penwidth={0.5 + 4.5 * abs(r.summed[i]) / top:.2f}, label="{kind if kind in "qkv" else ""}", '
                     f'tooltip="{g.names[i]}: {r.summed[i]:+.4g}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def faithfulness_png(r) -> bytes:
    fig = figure(6.4, 4.2, layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("faithfulness", "edges by |score| (CMD)"), ("faithfulness_signed", "edges by signed score (CPR)")):
        pts = getattr(r, key)
        ax.plot([p["fraction"] * 100 for p in pts], [p["value"] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("edges in the circuit (% of all, log scale)")
    ax.set_ylabel("faithfulness f(C)")
    ax.set_title(f"{r.model}: {r.options.method} ranking, {r.options.ablation} ablation\n"
                 f"CPR {r.cpr:.3f}, CMD {r.cmd:.3f}", fontsize=10)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def scatter_png(r) -> bytes:
    fig = figure(4.8, 4.6, layout="constrained")
    ax = fig.add_subplot()
    exact = np.asarray(r.check["exact"], dtype=np.float64)
    ax.scatter(exact, r.summed, s=6, alpha=0.6)
    lim = float(np.nanmax(np.abs(np.concatenate([exact, r.summed])))) or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("exact edge score")
    ax.set_ylabel(f"{r.options.method} estimate")
    ax.set_title(f"pearson {r.check['pearson']:.3f}, spearman {r.check['spearman']:.3f}", fontsize=10)
    return png_bytes(fig)

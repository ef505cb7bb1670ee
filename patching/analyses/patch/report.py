"""What a person reads of one patching run: the terminal tables, the heatmap, results.csv, report.html,
and (with --check) the estimate against the exact sweep.

Everything here reads a PatchResult (patching.analyses.patch) and returns text, data or a writer; the
folder itself is written by patching.io.files under the output policy.
"""
from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

import numpy as np

from patching.analyses.patch.attribution import QK_SITES
from patching.core import painter
from patching.core.figures import figure, show
from patching.core.metrics import DIRECTIONS, METRICS
from patching.core.prompts import Prepared
from patching.core.serial import json_text, slug
from patching.io.pages import colour, data_uri, fmt, render

# ----------------------------------------------------------------------------- terminal tables


def token_table(prep: Prepared) -> str:
    """Position | id | clean token | corrupt token, with the differing positions marked."""
    rows = [("pos", "clean id", "clean token", "corrupt id", "corrupt token", "note")]
    for i, (a, b) in enumerate(zip(prep.clean_ids, prep.corrupt_ids)):
        rows.append((str(i), str(a), show(prep.tokens[i]), str(b), show(prep.corrupt_tokens[i]), "<- differs" if a != b else ""))
    return _columns(rows)


def topk_table(title: str, run, prep: Prepared) -> str:
    """The seed's table: Position | Token index | Token | Probability, plus the target and foil."""
    rows = [("Position", "Token index", "Token", "Probability")]
    rows += [(str(e.rank), str(e.token_id), show(e.token), f"{e.prob:.4f}") for e in run.topk]
    foot = (f"target {show(prep.target)!s} (id {prep.target_id}): logit {run.target_logit:.4f}, p {run.target_prob:.4f}; "
            f"foil {show(prep.foil)} (id {prep.foil_id}): logit {run.foil_logit:.4f}, p {run.foil_prob:.4f}")
    return f"{title}\n{_columns(rows)}\n{foot}"


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def lines(result) -> list[str]:
    """The terminal's account of a run: tokens, both runs' top-k, the metric, the strongest patches,
    and the check against the exact sweep."""
    o, p = result.options, result.prepared
    out = [f"model {result.model}: {result.n_layers} layers, {len(p.clean_ids)} tokens"
           f"{' (position 0 is the <|endoftext|> added by --prepend-bos)' if o.prepend_bos else ''}; "
           f"positions that differ: {', '.join(map(str, p.differing))}",
           token_table(p), "",
           topk_table("clean run: next token after the last position", result.clean, p), "",
           topk_table("corrupt run: next token after the last position", result.corrupt, p), "",
           f"{o.metric} = {METRICS[o.metric]}: clean {result.clean.value:.4f}, "
           f"corrupt {result.corrupt.value:.4f}; sweep of {result.timing['patches']} patches at {o.site} "
           f"({o.direction}: {DIRECTIONS[o.direction]}) took {result.timing['sweep_seconds']:.3f} s "
           f"({'attribution estimate' if o.method == 'attribution' else f'{o.engine} engine'}, "
           f"{result.timing['device']})"]
    out += [f"  strongest: {describe_cell(result, entry)}: {entry[-1]:.4f}" for entry in strongest(result)]
    return out + check_lines(result) + precision_lines(result)


def precision_lines(result) -> list[str]:
    """A half-precision sweep's error against float32 on its sampled cells (analyses.patch.precision)."""
    q = result.precision
    if not q:
        return []
    rank = "n/a" if q["spearman"] is None or q["spearman"] != q["spearman"] else f"{q['spearman']:.3f}"
    return [f"{q['dtype']} against float32 on {len(q['cells'])} cells (the {q['n_top']} strongest, the rest drawn "
            f"at random): largest error {q['max_abs_error']:.4g} (effects up to {q['largest_effect']:.4g}), rank "
            f"agreement (Spearman) {rank}, strongest cell {'the same' if q['same_strongest'] else 'DIFFERENT'}"]


def base_value(result) -> float:
    """The metric of the run being patched: corrupt when denoising, clean when noising."""
    return (result.corrupt if result.options.direction == "denoise" else result.clean).value


def strongest(result, n: int = 3) -> list[tuple]:
    """The (at most n) patches that move the metric furthest from the patched run's own value, as
    (*cell, value) with the cell's indices in result.axes order (layer, position for block outputs).
    Patches that leave it where it was (up to float noise) are no answer, so they are left out."""
    c, k, base = result.clean.value, result.corrupt.value, base_value(result)
    delta = np.abs(result.matrix - base)
    noise = 1e-5 * max(abs(c), abs(k), abs(c - k))  # float32 rounding of values this size is ~1e-7 of them
    order = [int(i) for i in np.argsort(delta, axis=None)[::-1][:n] if delta.flat[i] > noise]
    return [(*map(int, np.unravel_index(i, delta.shape)), float(result.matrix.flat[i])) for i in order]


def cell_fields(result, entry: tuple) -> dict:
    """One strongest() entry as named fields: layer, head, position, token (where they apply), value."""
    fields = dict(zip(result.axes, entry[:-1]))
    if "position" in fields:
        fields["token"] = result.prepared.tokens[fields["position"]]
    return {**fields, "value": entry[-1]}


def describe_cell(result, entry: tuple) -> str:
    """'layer 0, position 1 ( Jones)', 'layer 1, head 0, position 10 ( Michelle)', 'layer 1, head 0' or
    'layer 1, neuron 17, position 10 ( Michelle)'."""
    f = cell_fields(result, entry)
    parts = [f"{axis} {f[axis]}" for axis in result.axes]
    if "token" in f:
        parts[-1] += f" ({show(f['token'])})"
    return ", ".join(parts)


def row_labels(result) -> list[str]:
    """The matrix's rows as the CSV labels them: layers, or 'L.H' per head ('L.N' per neuron) by position."""
    L = result.n_layers
    if len(result.axes) == 3:  # layer, head or neuron, position
        return [f"{l}.{h}" for l in range(L) for h in range(result.matrix.shape[1])]
    return [str(l) for l in range(L)]


def row_axis(result) -> str:
    """The CSV's and the page's row header: layer, or layer.head / layer.neuron by position."""
    return f"layer.{result.axes[1]}" if len(result.axes) == 3 else "layer"


def as_rows(result) -> np.ndarray:
    """The matrix in two dimensions: (layer or layer.head or layer.neuron) x (position or head or neuron)."""
    m = result.matrix
    return m.reshape(-1, m.shape[-1])  # (L*H, T) for heads by position; unchanged otherwise


def column_labels(result) -> list[str]:
    if result.axes[-1] in ("head", "neuron"):
        return [f"{result.axes[-1]} {h}" for h in range(result.matrix.shape[-1])]
    return [f"{i}:{t}" for i, t in enumerate(result.prepared.tokens)]


STRONGEST_NEURONS = 40  # rows a neuron site's heatmap and page table show (of n_layer x n_inner)


def neuron_site(result) -> bool:
    return "neuron" in result.axes


def drawn(result) -> tuple[list[str], np.ndarray, list[str], int]:
    """What the heatmap and the page's table show: (row labels, rows, column labels, rows in all).
    Every row, except at a neuron site, whose n_layer x n_inner rows (36,864 for GPT-2 small) no figure
    or page can hold: there the STRONGEST_NEURONS rows 'L.N' with the largest |effect| (distance from
    the patched run's own value) at any position, in layer order, by position (one column, 'every
    position', with all_positions). The full matrix is in results.csv and results.json."""
    if not neuron_site(result):
        return row_labels(result), as_rows(result), column_labels(result), as_rows(result).shape[0]
    m = result.matrix
    L, N = m.shape[:2]
    rows = m.reshape(L * N, -1)  # (L*N, T), or (L*N, 1) with all_positions
    effect = np.nan_to_num(np.abs(rows - base_value(result)), nan=0.0).max(axis=1)  # (L*N,)
    keep = np.sort(np.argsort(-effect, kind="stable")[:STRONGEST_NEURONS])  # strongest, back in layer order
    columns = ["every position"] if result.axes[-1] == "neuron" else column_labels(result)
    return [f"{i // N}.{i % N}" for i in keep], rows[keep], columns, L * N


# ----------------------------------------------------------------------------- heatmap


def heatmap(result, path: Path):
    """matshow of the matrix: layers down, positions (labelled by token) across, diverging at zero.
    Drawn by patching.core.painter (in its helper process when the executable started one)."""
    painter.paint(heatmap_spec(result), path)


def heatmap_spec(result) -> dict:
    """Everything the heatmap shows, as plain data (numpy and strings) that the painter draws."""
    labels, m, _, total = drawn(result)
    rows, cols = m.shape
    neurons = neuron_site(result)
    by_head = result.axes == ["layer", "head", "position"]
    step = max(1, cols // 60)  # keep labels legible on long prompts
    ticks = list(range(0, cols, step))
    if result.axes[-1] == "position":
        xticks = (ticks, [f"{show(result.prepared.tokens[i])} ({i})" for i in ticks], 90)
        xlabel = "position (clean token)"
    elif neurons:
        xticks, xlabel = (ticks, ["every position"], 0), "neuron (patched at every position)"
    else:
        xticks, xlabel = (ticks, [str(h) for h in ticks], 0), "head (patched at every position)"
    rstep = max(1, rows // 80)
    p, o = result.prepared, result.options
    what = {"logit-diff": f"logit({p.foil.strip()}) − logit({p.target.strip()})",
            "prob-diff": f"p({p.foil.strip()}) − p({p.target.strip()})",
            "target-logit": f"logit({p.target.strip()})",
            "recovery": f"recovery of logit({p.foil.strip()}) − logit({p.target.strip()})"}[o.metric]
    src, dst = ("clean", "corrupt") if o.direction == "denoise" else ("corrupt", "clean")
    est = "attribution estimate of " if o.method == "attribution" else ""
    # a neuron site shows its strongest rows only (the title says which; a rule marks each new layer), and
    # their change from the patched run's own value: one neuron moves the metric by a sliver of it, which
    # a colour scale of the values themselves would not show
    picked, colorbar = "", o.metric
    if neurons:
        m = m - base_value(result)
        anywhere = " at any position" if result.axes[-1] == "position" else ""
        picked = f"\nchange from the {dst} run's value: the {rows} of {total} neurons that move it most{anywhere}"
        colorbar = f"{o.metric} − {base_value(result):.3g} (the {dst} run's)"
    layer_of = [int(label.split(".")[0]) for label in labels]
    if by_head:
        rules = [l * result.matrix.shape[1] - 0.5 for l in range(1, result.n_layers)]
    elif neurons:
        rules = [i - 0.5 for i in range(1, rows) if layer_of[i] != layer_of[i - 1]]
    else:
        rules = []
    return dict(
        matrix=m, lim=float(np.nanmax(np.abs(m))) or 1.0,
        figsize=(min(max(3.0 + 0.55 * cols, 8.0 if neurons else 0), 40),
                 min(max(3.8, 2.2 + (0.28 if by_head or neurons else 0.4) * rows), 60)),
        xticks=xticks, xlabel=xlabel, yticks=(list(range(0, rows, rstep)), labels[::rstep]),
        rules=rules,
        ylabel={"resid_post": "layer (output of block)", "resid_pre": "layer (input of block)"}.get(
            o.site, "layer.head" if by_head else "layer.neuron" if neurons else "layer"),
        title=f"{est}{what} after patching {o.site} {src} into {dst} ({o.direction})\n"
              f"{result.model}: clean {result.clean.value:.3g}, corrupt {result.corrupt.value:.3g}{picked}",
        colorbar=colorbar)


# ----------------------------------------------------------------------------- files


def default_folder(prep: Prepared, options, model: str) -> str:
    """<clean prompt>-vs-<the corrupt tokens that differ>-<model>-<metric>[-<site>][-noise]...: runs that
    differ in what they measure get different folders (numbered -2, -3, ... if it exists already)."""
    changed = " ".join(prep.corrupt_tokens[i] for i in prep.differing) or "same"
    model = Path(model.rstrip("/")).name or model
    tags = [t for t, on in ((options.site, options.site != "resid_post"), ("noise", options.direction == "noise"),
                            ("all-positions", options.all_positions), ("bos", options.prepend_bos),
                            ("attribution", options.method == "attribution")) if on]
    return f"{slug(''.join(prep.tokens), 40)}-vs-{slug(changed, 20)}-{slug(model, 24)}-{options.metric}" + \
        "".join(f"-{slug(t)}" for t in tags)


def results_csv(result) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([row_axis(result)] + column_labels(result))
    for label, row in zip(row_labels(result), as_rows(result)):
        w.writerow([label] + [repr(float(v)) for v in row])
    return buf.getvalue()


def files(result, png: bool = True) -> dict:
    """One run's folder: results.json, results.csv, heatmap.png, (--check: exact.csv, exact-heatmap.png,
    scatter.png) and report.html (self-contained: the heatmap inline), written in this order."""
    doc = result.to_json()
    out = {"results.json": json_text(doc), "results.csv": results_csv(result)}
    if png:
        out["heatmap.png"] = lambda path: heatmap(result, path)
    if result.check is not None:  # the exact sweep and the scatter beside the estimate
        exact = replace(result, matrix=result.exact_matrix, options=replace(result.options, method="exact", check=False))
        out["exact.csv"] = results_csv(exact)
        if png:
            out["exact-heatmap.png"] = lambda path: heatmap(exact, path)
            out["scatter.png"] = lambda path: scatter(result).savefig(path, dpi=120)
    out["report.html"] = lambda path: path.write_text(experiment_page(
        result, (path.parent / "heatmap.png").read_bytes() if png else None, doc))
    return out


# ----------------------------------------------------------------------------- report.html

HOW_TO_READ_SWEEP = (
    "Every cell is one patched run: denoising, the corrupt run with one activation (the site, at that layer, "
    "head and position) replaced by the clean run's; noising, the clean run with one activation replaced by "
    "the corrupt run's. The metric is measured at the last position. In the table, white is the patched run's "
    "own value (the patch changed nothing) and blue moves towards the other run's value. A cell that moves "
    "it all the way carries what the other prompt knows; follow those cells down the layers to see where the "
    "information travels. Positions before the first differing token cannot matter (both prompts agree there).")


def experiment_page(result, heatmap_png: bytes | None = None, doc: dict | None = None) -> str:
    """report.html of one run: settings, tokens, top-k tables, the sweep (figure and values),
    strongest patches, timing and versions. `doc`: result.to_json() if the caller has it already."""
    r = doc or result.to_json()
    labels, m, columns, total = drawn(result)
    base = base_value(result)
    lim = float(np.nanmax(np.abs(m - base))) if m.size else 0.0
    # colour = distance from the patched run's own value (towards the other run: blue)
    other = (result.clean if result.options.direction == "denoise" else result.corrupt).value
    sign = 1.0 if other < base else -1.0
    cells = [(label, [(fmt(v), colour(sign * (v - base), lim)) for v in row])
             for label, row in zip(labels, m.tolist())]
    settings = [("model", r["model"]), ("metric", f"{r['metric']} = {r['metric_definition']}"),
                ("site", r.get("site")), ("direction", f"{r.get('direction')}: {r.get('direction_definition')}"),
                ("axes", " × ".join(r.get("axes", []))), ("engine", r["engine"]), ("device", r["device"]),
                ("dtype", r["dtype"]), ("top_k", result.options.top_k)]
    strong = [(describe_cell(result, e), fmt(e[-1])) for e in strongest(result)]
    how = HOW_TO_READ_SWEEP
    if len(labels) < total:  # a neuron site: the page holds its strongest rows, the files hold them all
        how += (f" This site has {total} neurons (layer.neuron rows); the figure and the table show the "
                f"{len(labels)} whose patch moves the metric furthest at any position, and results.csv and "
                f"results.json hold every one.")
    return render("report.html", r=r, clean="".join(r["tokens"]), corrupt="".join(r["corrupt_tokens"]),
                  settings=settings, cells=cells, columns=columns,
                  row_axis="layer.neuron" if neuron_site(result) else row_axis(result),
                  heatmap=data_uri(heatmap_png) if heatmap_png else None, how_to_read=how,
                  strongest=strong)


# ----------------------------------------------------------------------------- the estimate against the exact sweep


def check_lines(result) -> list[str]:
    """The terminal's report of a --check run."""
    c = result.check
    if c is None:
        return []
    num = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
    w = c["max_abs_error_cell"]
    out = [f"check against the exact sweep ({c['cells']} cells that patch a different value, "
           f"{c['cells_above_noise']} with an effect above {c['noise_floor']:.2g}): "
           f"Pearson {num(c['pearson'])}, Spearman {num(c['spearman'])}, "
           f"top-{c['top_k']} recall {num(c['top_k_recall'])}"]
    if w is not None:
        where = ", ".join(f"{ax} {w[ax]}" for ax in result.axes) + (f" ({w['token']!r})" if "token" in w else "")
        out.append(f"  largest error {c['max_abs_error']:.4f} at {where}: exact {w['exact']:.4f}, "
                   f"estimate {w['estimate']:.4f} (largest exact effect {c['largest_exact_effect']:.4f})")
    return out


def cell_label(cell: dict) -> str:
    parts = [f"L{cell['layer']}"] + ([f"H{cell['head']}"] if "head" in cell else []) + \
        ([f"N{cell['neuron']}"] if "neuron" in cell else [])
    return " ".join(parts + ([f"{cell['position']}:{cell['token'].strip() or repr(cell['token'])}"]
                             if "position" in cell else []))


def scatter(result):
    """Exact value against estimate, one point per cell, the diagonal, the worst cells labelled."""
    exact, est = result.exact_matrix.ravel(), result.matrix.ravel()
    fig = figure(5.5, 5.0, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(exact, est, s=14, alpha=0.7)
    lo, hi = float(np.nanmin([exact.min(), est.min()])), float(np.nanmax([exact.max(), est.max()]))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="estimate = exact")
    for c in result.check["worst_cells"][:5]:
        if c["error"] > 1e-3 * result.check["largest_exact_effect"]:  # not the cells that agree to rounding
            ax.annotate(cell_label(c), (c["exact"], c["estimate"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    c, o = result.check, result.options
    num = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    ax.set_xlabel(f"exact {o.metric} (patched run)")
    ax.set_ylabel(f"attribution estimate{' (QK fix)' if o.qk_fix and o.site in QK_SITES else ''}")
    ax.set_title(f"{o.site}, {o.direction}: Pearson {num(c['pearson'])}, "
                 f"Spearman {num(c['spearman'])}, top-{c['top_k']} recall {num(c['top_k_recall'])}", fontsize=9)
    ax.legend(fontsize=8)
    return fig

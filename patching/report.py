"""What a person reads: the token table, top-k tables, the heatmap, and the files of one experiment.

Files of an experiment are written by patching.files.write_folder: into a hidden staging folder
beside the destination, then moved into place, so a folder under --out is either complete or
absent, even after Ctrl-C; it never replaces a folder patch-run did not write.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from patching.api import PatchingError, PatchResult, Prepared, RunSummary, Settings
from patching.files import write_folder

# ----------------------------------------------------------------------------- terminal tables


def show(token: str) -> str:
    """A token as printable text: spaces visible at the edges, newlines and tabs escaped."""
    return repr(token)[1:-1] if token.strip() != token or not token.isprintable() else token


def token_table(prep: Prepared) -> str:
    """Position | id | clean token | corrupt token, with the differing positions marked."""
    rows = [("pos", "clean id", "clean token", "corrupt id", "corrupt token", "note")]
    for i, (a, b) in enumerate(zip(prep.clean_ids, prep.corrupt_ids)):
        rows.append((str(i), str(a), show(prep.tokens[i]), str(b), show(prep.corrupt_tokens[i]), "<- differs" if a != b else ""))
    return _columns(rows)


def topk_table(title: str, run: RunSummary, prep: Prepared) -> str:
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


def base_value(result: PatchResult) -> float:
    """The metric of the run being patched: corrupt when denoising, clean when noising."""
    return (result.corrupt if result.settings.direction == "denoise" else result.clean).value


def strongest(result: PatchResult, n: int = 3) -> list[tuple]:
    """The (at most n) patches that move the metric furthest from the patched run's own value, as
    (*cell, value) with the cell's indices in result.axes order (layer, position for block outputs).
    Patches that leave it where it was (up to float noise) are no answer, so they are left out."""
    c, k, base = result.clean.value, result.corrupt.value, base_value(result)
    delta = np.abs(result.matrix - base)
    noise = 1e-5 * max(abs(c), abs(k), abs(c - k))  # float32 rounding of values this size is ~1e-7 of them
    order = [int(i) for i in np.argsort(delta, axis=None)[::-1][:n] if delta.flat[i] > noise]
    return [(*map(int, np.unravel_index(i, delta.shape)), float(result.matrix.flat[i])) for i in order]


def cell_fields(result: PatchResult, entry: tuple) -> dict:
    """One strongest() entry as named fields: layer, head, position, token (where they apply), value."""
    fields = dict(zip(result.axes, entry[:-1]))
    if "position" in fields:
        fields["token"] = result.prepared.tokens[fields["position"]]
    return {**fields, "value": entry[-1]}


def describe_cell(result: PatchResult, entry: tuple) -> str:
    """'layer 0, position 1 ( Jones)', 'layer 1, head 0, position 10 ( Michelle)' or 'layer 1, head 0'."""
    f = cell_fields(result, entry)
    parts = [f"{axis} {f[axis]}" for axis in result.axes]
    if "token" in f:
        parts[-1] += f" ({show(f['token'])})"
    return ", ".join(parts)


def row_labels(result: PatchResult) -> list[str]:
    """The matrix's rows as the CSV and the heatmap label them: layers, or 'L.H' per head by position."""
    L = result.n_layers
    if result.axes == ["layer", "head", "position"]:
        return [f"{l}.{h}" for l in range(L) for h in range(result.matrix.shape[1])]
    return [str(l) for l in range(L)]


def as_rows(result: PatchResult) -> np.ndarray:
    """The matrix in two dimensions: (layer or layer.head) x (position or head)."""
    m = result.matrix
    return m.reshape(-1, m.shape[-1])  # (L*H, T) for heads by position; unchanged otherwise


def column_labels(result: PatchResult) -> list[str]:
    if result.axes[-1] == "head":
        return [f"head {h}" for h in range(result.matrix.shape[-1])]
    return [f"{i}:{t}" for i, t in enumerate(result.prepared.tokens)]


# ----------------------------------------------------------------------------- heatmap


def heatmap(result: PatchResult, path: Path):
    """matshow of the matrix: layers down, positions (labelled by token) across, diverging at zero.
    Drawn by patching.painter (in its helper process when the patch-run executable started one)."""
    from patching import painter
    painter.paint(heatmap_spec(result), path)


def heatmap_spec(result: PatchResult) -> dict:
    """Everything the heatmap shows, as plain data (numpy and strings) that patching.painter draws."""
    m = as_rows(result)
    rows, cols = m.shape
    by_head = result.axes == ["layer", "head", "position"]
    step = max(1, cols // 60)  # keep labels legible on long prompts
    ticks = list(range(0, cols, step))
    if result.axes[-1] == "position":
        xticks = (ticks, [f"{show(result.prepared.tokens[i])} ({i})" for i in ticks], 90)
        xlabel = "position (clean token)"
    else:
        xticks, xlabel = (ticks, [str(h) for h in ticks], 0), "head (patched at every position)"
    rstep = max(1, rows // 80)
    p = result.prepared
    what = {"logit-diff": f"logit({p.foil.strip()}) − logit({p.target.strip()})",
            "prob-diff": f"p({p.foil.strip()}) − p({p.target.strip()})",
            "target-logit": f"logit({p.target.strip()})",
            "recovery": f"recovery of logit({p.foil.strip()}) − logit({p.target.strip()})"}[result.settings.metric]
    src, dst = ("clean", "corrupt") if result.settings.direction == "denoise" else ("corrupt", "clean")
    est = "attribution estimate of " if result.settings.method == "attribution" else ""
    return dict(
        matrix=m, lim=float(np.nanmax(np.abs(m))) or 1.0,
        figsize=(min(3.0 + 0.55 * cols, 40), min(max(3.8, 2.2 + (0.28 if by_head else 0.4) * rows), 60)),
        xticks=xticks, xlabel=xlabel, yticks=(list(range(0, rows, rstep)), row_labels(result)[::rstep]),
        rules=[l * result.matrix.shape[1] - 0.5 for l in range(1, result.n_layers)] if by_head else [],
        ylabel={"resid_post": "layer (output of block)", "resid_pre": "layer (input of block)"}.get(
            result.settings.site, "layer.head" if by_head else "layer"),
        title=f"{est}{what} after patching {result.settings.site} {src} into {dst} ({result.settings.direction})\n"
              f"{result.model}: clean {result.clean.value:.3g}, corrupt {result.corrupt.value:.3g}",
        colorbar=result.settings.metric)


# ----------------------------------------------------------------------------- files


def slug(text: str, limit: int = 60) -> str:
    """A safe file name: lowercase letters, digits and single dashes, never empty or a dot name."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return s or "experiment"


def default_folder(prep: Prepared, settings: Settings) -> str:
    """<clean prompt>-vs-<the corrupt tokens that differ>-<model>-<metric>[-<site>][-noise]...: runs that
    differ in what they measure get different folders (the CLI numbers it -2, -3, ... if it exists already)."""
    changed = " ".join(prep.corrupt_tokens[i] for i in prep.differing) or "same"
    model = Path(settings.model.rstrip("/")).name or settings.model
    tags = [t for t, on in ((settings.site, settings.site != "resid_post"), ("noise", settings.direction == "noise"),
                            ("all-positions", settings.all_positions), ("bos", settings.prepend_bos),
                            ("attribution", settings.method == "attribution")) if on]
    return f"{slug(''.join(prep.tokens), 40)}-vs-{slug(changed, 20)}-{slug(model, 24)}-{settings.metric}" + \
        "".join(f"-{slug(t)}" for t in tags)


def json_text(doc) -> str:
    """Strict JSON (no bare NaN or Infinity, which JSON does not have): non-finite floats become null."""
    def clean(v):
        if isinstance(v, float):
            return v if np.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(doc), indent=1, allow_nan=False) + "\n"


def results_csv(result: PatchResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer.head" if len(result.axes) == 3 else "layer"] + column_labels(result))
    for label, row in zip(row_labels(result), as_rows(result)):
        w.writerow([label] + [repr(float(v)) for v in row])
    return buf.getvalue()


def check_writable(folder: Path):
    """Fail before any computing if the output folder cannot be made or written."""
    if folder.exists() and not folder.is_dir():
        raise PatchingError(f"output folder {folder} is an existing file: pass a folder with --out.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".patch-run-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PatchingError(f"cannot write to output folder {folder} ({exc.strerror or exc}): "
                            f"pass a writable --out.") from None


def experiment_files(result: PatchResult, png: bool = True) -> dict:
    """The files of one experiment, for patching.files: results.json, results.csv, heatmap.png and
    report.html (self-contained: the heatmap inline), written in this order."""
    from patching import html
    doc = result.to_json()
    files = {"results.json": json_text(doc), "results.csv": results_csv(result)}
    if png:
        files["heatmap.png"] = lambda path: heatmap(result, path)
    if result.check is not None:  # --check: the exact sweep and the scatter beside the estimate
        from patching.attribution import check_files
        files.update(check_files(result) if png else {"exact.csv": check_files(result)["exact.csv"]})
    files["report.html"] = lambda path: path.write_text(html.experiment_page(
        result, (path.parent / "heatmap.png").read_bytes() if png else None, doc))
    return files


def write_experiment(result: PatchResult, folder: Path, png: bool = True, *, overwrite: bool = False) -> Path:
    """results.json, results.csv and heatmap.png as `folder`, all or nothing (see patching.files)."""
    return write_folder(folder, experiment_files(result, png), kind="experiment", overwrite=overwrite)

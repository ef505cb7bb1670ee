"""The toolkit's analyses (lens, dla, ablate on one prompt; path on both) as the analysis of a study.

A study's `analysis: {kind: lens | dla | ablate, ...}` runs that analysis on each pair's CLEAN prompt
with the pair's target and foil (the corrupt prompt is read but not used: these analyses explain one
run, they do not compare two). Each analysis's arrays become one 2-D grid of cells, so the study's
statistics (patching.stats), tidy table, heatmap and pages treat them like a patching sweep:

- lens: (L+1) x T, rows `layer` = embed, 0..L-1 (the residual stream after that block, as resid_post's
  layer l), columns positions; the cell is logit(foil) - logit(target) read through the final
  LayerNorm and unembedding (metric `logit-diff`; the tidy table also has `top1-prob`).
- dla: L x (H+2), rows layers, columns `component` = head 0..H-1, attn bias, mlp; the cell is that
  component's direct contribution to logit(foil) - logit(target) (`contribution`). The embedding's
  and the final LayerNorm bias's terms are per-pair numbers (`scalars`), so cells + scalars = the value.
- ablate: L x (H+2), columns head 0..H-1, attn (the whole attention output), mlp; the cell is the
  ablated run's logit(foil) - logit(target) minus the unablated one (`ablated-minus-base`).

- path: L x H, rows the sender's layer, columns its head (with `sender: all`; one sender: a 1 x 1
  grid); the cell is path patching's metric (patching.path) on the pair's clean and corrupt prompts.
  Cells no path reaches (the sender in a receiver's layer or later) are NaN in every pair: the study
  keeps them as null statistics (patching.stats). With metric logit-diff the tidy table also has
  `recovery` = (cell - base run) / (source run - base run), aggregated like a patch study's.

lens, dla and ablate have no recovery (there is no second run to normalise by), so a study
aggregates the raw value. Options are the analysis's own (LensOptions, DLAOptions, AblateOptions, PathOptions without the
prompts, target and foil); ablate's `kind` (zero|mean) is called `ablation` here, since `kind` names the analysis.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from patching import ablate, dla, lens
from patching import path as path_patching
from patching.api import PatchingError, reject_unknown
from patching.engines import METRICS

PAIR_FIELDS = ("prompt", "clean", "corrupt", "target", "foil")  # what each pair supplies; the rest are options
SOURCE = "reference_source"  # where a file of reference prompts came from (shown instead of its prompts)
SHOWN_PROMPTS = 20  # reference prompts listed in a summary; the rest are counted
RENAMED = {"ablate": {"ablation": "kind"}}  # study key -> the Options field it sets


@dataclass
class Outcome:
    """One pair's analysis, as a study needs it."""

    metrics: dict  # tidy metric -> (rows, columns) float64 array; the first is the one aggregated
    tokens: list[str]  # the clean prompt's tokens
    files: dict  # the pair's folder, for patching.files.write_folder
    values: dict  # clean_value and the kind's other per-pair numbers (summary row, aggregate scalars)


@dataclass(frozen=True)
class Kind:
    name: str
    options_class: type
    run: Callable  # (model, tok, Options, figures, cache) -> Outcome
    axes: tuple[str, str]
    metrics: Callable  # options -> the tidy metrics; the first is the one aggregated
    definition: Callable  # options -> the definition of metrics[0]
    scalars: tuple[str, ...]
    labels: Callable  # (n_layer, n_head, options) -> {axis: labels} of the non-position axes
    figures: tuple[str, ...]  # the pair folder's png files, written only with `figures`

    def option_names(self) -> list[str]:
        rename = {v: k for k, v in RENAMED.get(self.name, {}).items()}
        return [rename.get(f.name, f.name) for f in fields(self.options_class) if f.name not in PAIR_FIELDS]


def _files(files: dict, figures: bool, names: tuple[str, ...]) -> dict:
    return {k: v for k, v in files.items() if figures or k not in names}


def _components(L: int, H: int, extra: tuple[str, str]) -> dict:
    return {"layer": [str(l) for l in range(L)], "component": [f"head {h}" for h in range(H)] + list(extra)}


def _path_metrics(data: dict) -> tuple[str, ...]:
    """The path run's metric, and recovery beside logit-diff (normalised as a patch study's)."""
    m = data.get("metric", "logit-diff")
    return (m, "recovery") if m == "logit-diff" else (m,)


def _path_labels(L: int, H: int, data: dict) -> dict:
    """All senders: every layer and head (cells no path reaches are NaN); one sender: its single cell.
    Checks the sender and receivers against the model's shape (before any pair runs)."""
    o = build("path", data, "a", "a", " a", " b")
    senders, _ = o.parsed(L, H)
    if senders is None:
        return {"layer": [str(l) for l in range(L)], "head": [str(h) for h in range(H)]}
    return {"layer": [str(senders[0][0])], "head": [str(senders[0][1])]}


def _lens(model, tok, o: lens.LensOptions, figures: bool, cache: dict) -> Outcome:
    r = lens.lens(model, tok, o)
    # the last row at the last position is the model's own logit(foil) - logit(target) (lens.py)
    return Outcome({"logit-diff": r.matrix, "top1-prob": r.top_probs}, r.tokens,
                   _files(lens.files(r), figures, KINDS["lens"].figures), {"clean_value": float(r.matrix[-1, -1])})


def _dla(model, tok, o: dla.DLAOptions, figures: bool, cache: dict) -> Outcome:
    r = dla.dla(model, tok, o)
    grid = np.concatenate([r.heads, r.attn_bias[:, None], r.mlp[:, None]], axis=1)
    return Outcome({"contribution": grid}, r.tokens, _files(dla.files(r), figures, KINDS["dla"].figures),
                   {"clean_value": r.metric, "embed": r.embed, "final_ln_bias": r.final_ln_bias})


def _ablate(model, tok, o: ablate.AblateOptions, figures: bool, cache: dict) -> Outcome:
    means = None
    if o.kind == "mean" and o.reference:  # one reference for every pair: its means once per prompt length
        T = len(tok.encode(o.prompt))
        if T not in cache:
            cache[T] = ablate.mean_source(model, tok, o.reference, T)
        means = cache[T]
    r = ablate.ablate(model, tok, o, means)
    grid = np.concatenate([r.heads, r.attn[:, None], r.mlp[:, None]], axis=1)
    return Outcome({"ablated-minus-base": grid}, r.tokens, _files(ablate.files(r), figures, KINDS["ablate"].figures),
                   {"clean_value": r.base_value})


def _path(model, tok, o: path_patching.PathOptions, figures: bool, cache: dict) -> Outcome:
    r = path_patching.path(model, tok, o)
    grid = r.matrix if r.single is None else r.matrix[r.single][None, None]  # (L, H) or (1, 1)
    metrics = {o.metric: grid}
    if o.metric == "logit-diff":  # recovery of the path-patched value: 0 = the base run, 1 = the source run
        if r.source_value == r.base_value:
            raise PatchingError("clean and corrupt give the same logit difference, so recovery is undefined: "
                                "the pair does not change the answer.")
        metrics["recovery"] = (grid - r.base_value) / (r.source_value - r.base_value)
    files = path_patching.files(r)
    return Outcome(metrics, r.prepared.tokens, _files(files, figures, KINDS["path"].figures),
                   {"clean_value": r.clean_value, "corrupt_value": r.corrupt_value})


LD = "logit(foil) - logit(target)"
KINDS = {
    "lens": Kind("lens", lens.LensOptions, _lens, ("layer", "position"), lambda d: ("logit-diff", "top1-prob"),
                 lambda d: f"{LD} of the residual stream after the row's block (embed: before block 0) at the column's "
                 f"position, through the final LayerNorm and unembedding",
                 ("clean_value",), lambda L, H, d: {"layer": ["embed", *map(str, range(L))]}, ("lens.png",)),
    "dla": Kind("dla", dla.DLAOptions, _dla, ("layer", "component"), lambda d: ("contribution",),
                lambda d: f"direct contribution of the component to {LD} at the last position",
                ("clean_value", "embed", "final_ln_bias"), lambda L, H, d: _components(L, H, ("attn bias", "mlp")),
                ("heads.png", "layers.png")),
    "ablate": Kind("ablate", ablate.AblateOptions, _ablate, ("layer", "component"),
                   lambda d: ("ablated-minus-base",), lambda d: f"change of {LD} at the last position when the component is ablated",
                   ("clean_value",), lambda L, H, d: _components(L, H, ("attn", "mlp")), ("heads.png", "layers.png")),
    "path": Kind("path", path_patching.PathOptions, _path, ("layer", "head"), _path_metrics,
                 lambda d: f"{METRICS[d.get('metric', 'logit-diff')]} after path patching from the sender head "
                           f"(row layer, column head) into the receivers; NaN/null where no path exists",
                 ("clean_value", "corrupt_value"), _path_labels, ("heatmap.png", "bars.png")),
}


def options(kind: str, data: dict, where: str) -> dict:
    """The study's options of a toolkit analysis, checked by its Options class (with stand-in pair
    fields); unknown keys fail. Returns plain values (for the study hash and summary)."""
    k = KINDS[kind]
    allowed = k.option_names()
    article = "an" if kind[0] in "aeiou" else "a"
    reject_unknown(data, allowed, where, f"{article} {kind} analysis takes kind" + "".join(f", {a}" for a in allowed))
    data = dict(data)
    if kind == "ablate":
        data = _ablate_options(data, where)
    if kind == "path":
        data = _path_options(data, where)
    try:
        build(kind, data, "a", "a", " a", " b")
    except PatchingError as exc:
        raise PatchingError(f"{where}: {exc}") from None
    return data


def _ablate_options(data: dict, where: str) -> dict:
    """`reference`: a list of prompts or a text file with one per line, read now (so the study's hash
    covers the prompts); only with `ablation: mean`."""
    if data.get("ablation", "zero") not in ablate.KINDS:
        raise PatchingError(f"{where}: ablation {str(data['ablation'])[:40]!r} is not one of {', '.join(ablate.KINDS)}.")
    ref = data.get("reference")
    if ref is None:
        return data
    if data.get("ablation", "zero") != "mean":
        raise PatchingError(f"{where}: reference gives the prompts of mean ablation: add ablation: mean or drop it.")
    if isinstance(ref, str):  # the prompts run; the summary and pages name the file and its hash instead
        from patching.files import expand
        path = expand(ref)
        data["reference"] = ablate.read_reference(path)
        data[SOURCE] = {"file": str(path), "sha256": hashlib.sha256("\n".join(data["reference"]).encode()).hexdigest(),
                        "n_prompts": len(data["reference"])}
    elif not isinstance(ref, list) or not all(isinstance(p, str) for p in ref):
        raise PatchingError(f"{where}: reference must be a list of prompts or the name of a text file "
                            f"with one prompt per line.")
    return data


def _path_options(data: dict, where: str) -> dict:
    """`sender` is required and must be text (YAML reads 1.10 as the number 1.1); one receiver may be
    given as text rather than a list."""
    sender = data.get("sender")
    if not isinstance(sender, str):
        raise PatchingError(f"{where}: a path analysis needs sender: 'LAYER.HEAD' in quotes (e.g. '0.1') or all.")
    if isinstance(data.get("receivers"), str):
        data["receivers"] = [data["receivers"]]
    if "receivers" in data and not (isinstance(data["receivers"], list) and all(isinstance(r, str) for r in data["receivers"])):
        raise PatchingError(f"{where}: receivers must be a list like [logits] or ['1.0:k', '1.2:q'].")
    return data


def build(kind: str, data: dict, clean: str, corrupt: str, target: str, foil: str):
    """The analysis's Options for one pair: its prompt (clean; path takes both), study keys renamed to
    the dataclass's fields."""
    rename = RENAMED.get(kind, {})
    cls = KINDS[kind].options_class
    prompts = {"clean": clean, "corrupt": corrupt} if "clean" in {f.name for f in fields(cls)} else {"prompt": clean}
    return cls(**prompts, target=target, foil=foil, **{rename.get(k, k): v for k, v in data.items() if k != SOURCE})


def shown(data: dict) -> dict:
    """The options as the summary, aggregate.json and the pages show them: reference prompts read from a
    file by its name, hash and count (never the file itself), a long list of prompts cut short."""
    out = {k: v for k, v in data.items() if k != SOURCE}
    if SOURCE in data:
        out["reference"] = data[SOURCE]
    elif isinstance(out.get("reference"), list) and len(out["reference"]) > SHOWN_PROMPTS:
        ref = out["reference"]
        out["reference"] = [*ref[:SHOWN_PROMPTS], f"... and {len(ref) - SHOWN_PROMPTS} more"]
    return out


def run_pair(kind: str, model, tok, pair, data: dict, figures: bool, cache: dict) -> tuple[Outcome, float]:
    """(the analysis of the pair's clean prompt, its seconds); `cache`: one dict for the whole study,
    where an analysis keeps what every pair shares (mean ablation's reference means)."""
    t0 = time.perf_counter()
    out = KINDS[kind].run(model, tok, build(kind, data, pair.clean, pair.corrupt, pair.target, pair.foil), figures, cache)
    out.metrics = {m: np.asarray(v, dtype=np.float64) for m, v in out.metrics.items()}
    return out, time.perf_counter() - t0


def describe(kind: str, data: dict, n_layer: int, n_head: int) -> dict:
    """What the study's analysis is, for its summary, aggregate.json and pages."""
    k = KINDS[kind]
    metrics = list(k.metrics(data))
    return {"kind": kind, **shown(data), "axes": list(k.axes), "labels": k.labels(n_layer, n_head, data),
            "metrics": metrics, "metric": metrics[0], "metric_definition": k.definition(data),
            "scalars": list(k.scalars)}

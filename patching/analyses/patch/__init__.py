"""Activation patching: every cell of a site of one run replaced by the other run's value, measured.

Method: run the clean prompt and the corrupt prompt (same token count) once each, recording what the
sweep needs; then, for every cell of the site (layer, [head or neuron,] position), run the base prompt (the
corrupt one when denoising, the clean one when noising) with that one activation replaced by the
source run's, and measure the metric at the last position (default logit(foil) - logit(target)).
Where the source run's information matters, the patch moves the metric towards the source run's
value. The sweep is exact (patching.core.engines: the resumable fast engine, or the loop oracle);
`method: attribution` estimates every cell from one backward instead (attribution.py, with `check`
comparing the estimate with the exact sweep).

One pair is one run; a study asks for every metric of each pair (`every_metric`: the tidy table
holds them all, and recovery is aggregated), which is the same pipeline with the log-sum-exp read.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from mingpt.sites import ALL_SITES, HEAD_SITES, NEURON_SITES
from patching.analyses.base import PAIR, Analysis, Events, Grid, Shape
from patching.analyses.patch import attribution, precision, report
from patching.analyses.patch.attribution import METHODS
from patching.core import engines
from patching.core.context import Context
from patching.core.engines import ENGINES, axes_of
from patching.core.errors import PatchingError
from patching.core.metrics import (DIRECTIONS, METRICS, check_recovery, finite, metric_values, needs_lse,
                                   readout)
from patching.core.options import Options, option
from patching.core.prompts import Pair, Prepared, prepare
from patching.core.serial import json_floats, versions

MAX_TOP_K = 1000  # rows of a next-token table: more would only bloat results.json and the page


@dataclass(frozen=True)
class PatchOptions(Options):
    """How to patch: every field is a flag of `patch-run [patch]` and a key of a batch's or study's YAML."""

    metric: str = option("logit-diff", help="what to measure at the last position [logit-diff]", choices=tuple(METRICS))
    top_k: int = option(20, help="rows of the next-token tables [20]", low=1)
    engine: str = option("fast", help="fast (exact, batched) or loop (one forward per patch) [fast]", choices=ENGINES)
    max_rows: int = option(engines.MAX_ROWS, help=f"fast engine chunk size in token rows [{engines.MAX_ROWS}]", low=1,
                           speed=True)
    site: str = option("resid_post", help="the activation patched, named as in TransformerLens: "
                       "resid_pre/resid_mid/resid_post, attn_out, mlp_out by (layer, position); q, k, v, z, "
                       "pattern by (layer, head, position); mlp_post (the MLP's neurons after the GELU) by "
                       "(layer, neuron, position) [resid_post]", choices=tuple(ALL_SITES))
    direction: str = option("denoise", help="denoise: clean values into the corrupt run (sufficient?); noise: "
                            "corrupt values into the clean run (necessary?) [denoise]", choices=tuple(DIRECTIONS))
    all_positions: bool = option(False, help="head and neuron sites: patch each head (neuron) at every position at "
                                 "once (axes layer, head or layer, neuron)")
    prepend_bos: bool = option(False, help="put <|endoftext|> before both prompts as position 0 "
                               "(TransformerLens's default) [off]")
    method: str = option("exact", help="exact: patch every cell; attribution: estimate every cell from one "
                         "backward pass, (source - base) . gradient [exact]", choices=METHODS)
    qk_fix: bool = option(True, help="attribution at q/k: linearise through the softmax too (AtP*'s fix is on "
                          "by default)", negate="--no-qk-fix")
    check: bool = option(False, help="attribution: also run the exact sweep and report correlation, largest "
                         "error and top-10 recall, with a scatter plot")
    every_metric: bool = option(False, internal=True)  # a study's pairs: every metric of METRICS per cell

    def validate(self):
        if self.top_k > MAX_TOP_K:  # every table is written into results.json and report.html
            raise PatchingError(f"top_k is at most {MAX_TOP_K} (the rows of the next-token tables), got {self.top_k}.")
        if self.all_positions and self.site not in HEAD_SITES and self.site not in NEURON_SITES:
            raise PatchingError(f"all_positions patches a head or a neuron at every position: it needs a head site "
                                f"({', '.join(HEAD_SITES)}) or a neuron site ({', '.join(NEURON_SITES)}), not "
                                f"{self.site}.")
        if self.check and self.method != "attribution":
            raise PatchingError("check compares attribution patching with the exact sweep: add --method attribution "
                                "(the exact method needs no check).")


@dataclass
class TopEntry:
    rank: int
    token_id: int
    token: str
    prob: float
    logit: float


@dataclass
class RunSummary:
    """The unpatched run's last position: its top-k table and the target's and foil's standing."""

    topk: list[TopEntry]
    target_logit: float
    target_prob: float
    foil_logit: float
    foil_prob: float
    value: float  # the metric without any patch


@dataclass
class PatchResult:
    """Everything one run produced. `matrix` is numpy with axes `axes`: (layer, position) for residual
    sites (row l of resid_post = block l's output), (layer, head, position) for head sites, (layer,
    neuron, position) for neuron sites, (layer, head) or (layer, neuron) with all_positions; `metrics`
    holds every metric computed (all of them with every_metric)."""

    prepared: Prepared
    options: PatchOptions
    model: str
    dtype: str
    n_layers: int
    matrix: np.ndarray
    clean: RunSummary
    corrupt: RunSummary
    timing: dict
    versions: dict = field(default_factory=dict)
    exact_matrix: np.ndarray | None = None  # check: the exact sweep beside the attribution estimate
    check: dict | None = None  # check: attribution.compare's report
    metrics: dict = field(default_factory=dict)
    precision: dict | None = None  # half precision: a sample of cells against float32 (precision.compare)

    @property
    def axes(self) -> list[str]:
        return axes_of(self.options.site, self.options.all_positions)

    def to_json(self) -> dict:
        """The results.json document (docs/patch.md)."""
        p, o = self.prepared, self.options
        return {
            "model": self.model, "metric": o.metric, "metric_definition": METRICS[o.metric],
            "engine": o.engine, "device": self.timing.get("device"), "dtype": self.dtype,
            "site": o.site, "direction": o.direction,
            "direction_definition": DIRECTIONS[o.direction], "axes": self.axes,
            "all_positions": o.all_positions, "prepend_bos": o.prepend_bos,
            "tokens": p.tokens, "corrupt_tokens": p.corrupt_tokens, "clean_ids": p.clean_ids,
            "corrupt_ids": p.corrupt_ids, "differing_positions": p.differing,
            "target": {"text": p.target, "id": p.target_id}, "foil": {"text": p.foil, "id": p.foil_id},
            "n_layers": self.n_layers, "n_tokens": len(p.tokens),
            "matrix": json_floats(self.matrix),
            "clean_value": json_floats(self.clean.value), "corrupt_value": json_floats(self.corrupt.value),
            "runs": {name: {k: json_floats(v) for k, v in asdict(run).items() if k != "topk"}
                     for name, run in (("clean", self.clean), ("corrupt", self.corrupt))},
            "topk": {"clean": [asdict(e) for e in self.clean.topk], "corrupt": [asdict(e) for e in self.corrupt.topk]},
            "timing": self.timing, "versions": self.versions, "method": o.method,
            **({"qk_fix": o.qk_fix} if o.method == "attribution" else {}),
            **({"check": self.check, "exact_matrix": json_floats(self.exact_matrix)} if self.check else {}),
            **({"precision": {k: json_floats(v) for k, v in self.precision.items()}} if self.precision else {}),
        }


def summarize(logits: torch.Tensor, tok, prep: Prepared, k: int, value: float) -> RunSummary:
    """Top-k table and target/foil standing from one run's last-position logits (vocab,)."""
    logits = logits.float().cpu()
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, min(k, probs.numel()))
    table = [TopEntry(r + 1, int(i), tok.token_str(int(i)), float(pv), float(logits[i]))
             for r, (pv, i) in enumerate(zip(top.values, top.indices))]
    return RunSummary(table, float(logits[prep.target_id]), float(probs[prep.target_id]),
                      float(logits[prep.foil_id]), float(probs[prep.foil_id]), value)


class Patching(Analysis):
    name = "patch"
    help = "activation patching of every (layer, position) of the residual stream (the default command)"
    Options = PatchOptions
    takes = PAIR
    marker = "experiment"
    plans = True
    figures = ("heatmap.png", "exact-heatmap.png", "scatter.png")

    timing_keys = ("sweep_seconds", "record_seconds")

    def timing(self, result: "PatchResult", seconds: float) -> dict:
        return {k: result.timing[k] for k in self.timing_keys}

    @torch.no_grad()  # attribution.estimate turns gradients on for its own backward
    def run(self, ctx: Context, pair: Pair, options: PatchOptions, events: Events | None = None) -> PatchResult:
        """Tokenize, record both runs, sweep (or estimate) every cell of the site, summarize.
        events.plan is called with the sweep's engines.Plan before it runs (it may raise to stop there)."""
        events = events or Events()
        options.verify()  # also catches fields changed behind the frozen dataclass's back
        self.check_input(pair)
        model, tok, cfg = ctx.model, ctx.tok, ctx.config
        prep = prepare(tok, pair, cfg.block_size, cfg.vocab_size, options.prepend_bos)
        device, site, o = ctx.device, options.site, options
        ids = {"clean": torch.tensor([prep.clean_ids], device=device),
               "corrupt": torch.tensor([prep.corrupt_ids], device=device)}
        wanted = list(METRICS) if o.every_metric else [o.metric]
        lse = o.every_metric or needs_lse(o.metric)
        attrib = o.method == "attribution"

        def planned(noop):  # the exact sweep's plan, or an attribution estimate's
            args = (cfg, len(prep.clean_ids), site, o.all_positions, o.max_rows, lse, noop)
            return attribution.plan(*args, o.qk_fix, o.check) if attrib else engines.plan(*args)

        t0 = time.perf_counter()
        # memory first, before the recordings (a pattern recording alone can be the largest thing), with
        # every cell counted; the plan shown is made again below, when the no-op cells are known
        engines.check_memory(planned(None), device)
        sites = [site] + (attribution.needed_sites(site, o.qk_fix) if attrib else [])
        rec = {k: engines.record(model, v, sites) for k, v in ids.items()}
        for k in rec:
            finite(rec[k].last_logits, f"the {k} run's logits", model)
        r = {k: readout(rec[k].last_logits[0], prep.target_id, prep.foil_id, True).cpu() for k in rec}
        if "recovery" in wanted:
            check_recovery(r["clean"], r["corrupt"], rec["clean"].last_logits.dtype)
        base, src = ("corrupt", "clean") if o.direction == "denoise" else ("clean", "corrupt")
        source = rec[src][site][:, 0]
        # the no-op cells, for the plan shown and the check (the sweep finds its own)
        noop = engines.noop_cells(rec[base], source, site, o.all_positions) if events.plan or o.check else None
        if events.plan:
            events.plan(planned(noop))
        # each metric's value: 0 = the patched run's own and 1 = the other run's, for recovery
        value = lambda m, x: float(metric_values(m, x, r[src], r[base]))  # noqa: E731
        t1 = time.perf_counter()
        estimates = {}
        if attrib:  # one backward per metric (each linearises its own): base value + estimate
            estimates = {m: value(m, r[base]) + attribution.estimate(
                model, ids[base], rec[base], source, site, m, prep.target_id, prep.foil_id, r[src], r[base],
                o.all_positions, o.qk_fix).numpy() for m in wanted}
            finite(torch.from_numpy(estimates[o.metric]), "the attribution estimates")
        t2 = time.perf_counter()
        exact = {}
        if not attrib or o.check:
            readouts = engines.sweep(model, ids[base], rec[base], source, site, prep.target_id, prep.foil_id, lse,
                                     o.all_positions, o.engine, o.max_rows, events.progress)
            if device.type == "cuda":
                torch.cuda.synchronize()
            exact = {m: metric_values(m, readouts, r[src], r[base]).numpy().astype(np.float64) for m in wanted}
            finite(torch.from_numpy(exact[o.metric]), "the patched runs' values")
        t3 = time.perf_counter()
        metrics = estimates if attrib else exact
        timing = {"record_seconds": round(t1 - t0, 6), "sweep_seconds": round(t2 - t1 if attrib else t3 - t2, 6)}
        check = None
        if o.check:
            live = ~noop.cpu().numpy().reshape(exact[o.metric].shape)
            check = attribution.compare(exact[o.metric], metrics[o.metric], value(o.metric, r[base]), live,
                                        axes_of(site, o.all_positions), prep.tokens,
                                        source_value=value(o.metric, r[src]))
            timing["exact_sweep_seconds"] = round(t3 - t2, 6)
        matrix = metrics[o.metric]
        precise = None
        if not attrib and ctx.spec.dtype != "float32":  # bfloat16 keeps 8 bits: say what that cost here
            t4 = time.perf_counter()
            precise = precision.compare(ctx, prep, o, matrix, value(o.metric, r[base]), base, src)
            timing["precision_seconds"] = round(time.perf_counter() - t4, 6)
        return PatchResult(
            prepared=prep, options=o, model=ctx.name, dtype=ctx.spec.dtype, n_layers=cfg.n_layer, matrix=matrix,
            clean=summarize(rec["clean"].last_logits[0], tok, prep, o.top_k, value(o.metric, r["clean"])),
            corrupt=summarize(rec["corrupt"].last_logits[0], tok, prep, o.top_k, value(o.metric, r["corrupt"])),
            timing={**timing, "patches": int(np.prod(matrix.shape)), "device": str(device)},
            versions=versions(), exact_matrix=exact[o.metric] if check else None, check=check, metrics=metrics,
            precision=precise)

    def files(self, result: PatchResult, figures: bool = True) -> dict:
        return report.files(result, figures)

    def lines(self, result: PatchResult) -> list[str]:
        return report.lines(result)

    def folder_name(self, ctx: Context, pair: Pair, options: PatchOptions) -> str:
        cfg = ctx.config
        prep = prepare(ctx.tok, pair, cfg.block_size, cfg.vocab_size, options.prepend_bos)
        return report.default_folder(prep, options, ctx.spec.model)

    def summary(self, result: PatchResult) -> dict:
        return {"metric": result.options.metric, "model": result.model, "clean_value": result.clean.value,
                "corrupt_value": result.corrupt.value, "sweep_seconds": result.timing["sweep_seconds"],
                "strongest": [report.cell_fields(result, entry) for entry in report.strongest(result)]}

    columns = ("clean", "corrupt", "strongest patch (layer, [head or neuron,] [position token]: value)")

    def cells(self, result: PatchResult) -> list[str]:
        num = lambda v: "" if v is None or v != v else f"{v:.3f}"  # noqa: E731  (NaN != NaN)
        best = report.strongest(result)
        s = report.cell_fields(result, best[0]) if best else None
        cell = (", ".join(str(s[k]) for k in ("layer", "head", "neuron", "position") if k in s)
                + (f" {s['token'].strip() or repr(s['token'])}" if "token" in s else "") + f": {num(s['value'])}"
                if s else "no patch moved it")
        return [num(result.clean.value), num(result.corrupt.value), cell]

    # ------------------------------------------------------------------ studies

    def shape(self, options: PatchOptions, config) -> Shape:
        return Shape(axes=axes_of(options.site, options.all_positions), metrics=list(METRICS), metric=options.metric,
                     scalars=["clean_value", "corrupt_value"], row_label=f"{{rows}} ({options.site})")

    def grid(self, result: PatchResult) -> Grid:
        return Grid({m: result.metrics[m] for m in METRICS}, result.prepared.tokens,
                    {"clean_value": result.clean.value, "corrupt_value": result.corrupt.value})

    def for_study(self, options: PatchOptions) -> PatchOptions:
        if options.site in NEURON_SITES:  # the aggregate's heatmap and tables draw every grid row: n_layer x n_inner
            raise PatchingError(f"a study cannot aggregate {options.site}: its grid has a row per neuron of every "
                                f"layer, more than the aggregate heatmap and tables can show; run the pairs as a "
                                f"plain batch (experiments: and defaults: {{site: {options.site}}}) or study "
                                f"another site.")
        if options.check:  # check compares one pair's estimate with its sweep; a study aggregates one of them
            raise PatchingError("check applies to single experiments and batches; a study runs either method "
                                "(exact or attribution) on every pair: drop check.")
        return options.replace(every_metric=True)

    def title(self, options: PatchOptions) -> str:
        return f"patch {options.site} ({options.direction}{', attribution' if options.method == 'attribution' else ''})"

    def shown(self, options: PatchOptions) -> dict:
        return {"site": options.site, "direction": options.direction, "all_positions": options.all_positions,
                "method": options.method, **({"qk_fix": options.qk_fix} if options.method == "attribution" else {})}

"""Studies: one analysis over many prompt pairs, with statistics, shardable over machines.

A single pair is an anecdote; papers patch over a dataset of pairs built from templates (Wang et al.
2022, IOI) and report the mean effect with its spread. A study is a YAML file (or a --pairs file):

    defaults: {model: demo-names}          # what to load, and any option of the analysis
    pairs: {clean: ..., corrupt: ..., target: ..., foil: ..., slots: ..., n: 200, seed: 0}   # study/pairs.py
    experiments: [...]                     # optional: listed pairs, as in a batch (no overrides)
    analysis: {kind: patch, site: resid_post}   # any registered analysis with a grid, and its options
    study: {bootstrap: 1000, seed: 0, figures: false}

It runs on any analysis whose results lay out as a grid (Analysis.shape/grid), with no knowledge of
which one: an analysis that takes a pair gets both prompts, one that takes a prompt gets each pair's
clean prompt with the pair's target and foil. Pairs that do not fit are skipped and counted by
reason; a pair that fails while running is recorded with its reason; the others are aggregated
(study/stats.py). `--shard K/N` runs pairs K, K+N, K+2N, ... (1-based) into the same layout;
`patch-run merge` (study/merge.py) combines shards whose study hash agrees. The model loads once.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from patching import analyses
from patching.analyses.base import PAIR, Analysis
from patching.core.context import ModelSpec, load
from patching.core.errors import PatchingError, reason, reject_unknown
from patching.core.options import Options
from patching.core.serial import json_text, slug, versions
from patching.io.files import MARKER, claim, expand, marker_text, write_folder
from patching.io.yamlfile import read_yaml
from patching.study import stats
from patching.study.page import study_page
from patching.study.pairs import PairSpec, StudyPair, misfit, pair_from_row, read_pairs_file, reason_kind, whole

MAX_SHARDS = 100_000
STUDY_KEYS = ("pairs", "analysis", "study")  # a YAML with any of these is a study, not a plain batch
TOP_KEYS = ("defaults", "experiments", *STUDY_KEYS)


@dataclass
class StudyOptions:
    bootstrap: int = 1000  # resamples of the bootstrap interval
    seed: int = 0  # of the bootstrap
    figures: bool | None = None  # per-pair PNGs; default: on for listed pairs, off for generated ones
    threads: int | None = None  # torch CPU threads while the study runs; None: torch's default

    def __post_init__(self):
        whole(self.bootstrap, "study bootstrap", 1)
        if self.threads is not None:
            whole(self.threads, "study threads", 1)
        whole(self.seed, "study seed", 0)
        if self.figures not in (None, True, False):
            raise PatchingError(f"study figures must be true or false, got {str(self.figures)[:40]!r}.")


@dataclass
class Study:
    spec: ModelSpec
    analysis: Analysis
    options: Options  # the analysis's, as a study runs it (Analysis.for_study)
    study: StudyOptions = field(default_factory=StudyOptions)
    pairs: list = field(default_factory=list)
    generated: bool = False

    @property
    def figures(self) -> bool:
        return (not self.generated) if self.study.figures is None else self.study.figures

    def settings(self) -> dict:
        """What ran, as the summary and the page show it: what was loaded and the analysis's options."""
        return {**self.spec.shown(), **self.options.shown()}

    def hash(self) -> str:
        """What makes two shards parts of one study: its pairs, what was loaded (not where: the device),
        the options that change numbers (not max_rows, threads or figures), the analysis, statistics."""
        settings = {"model": self.spec.model, "dtype": self.spec.dtype, **self.options.hashed()}
        doc = {"pairs": [[p.clean, p.corrupt, p.target, p.foil, p.name, p.error] for p in self.pairs],
               "settings": settings, "analysis": self.analysis.name,
               "bootstrap": self.study.bootstrap, "seed": self.study.seed}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def read_study_yaml(path: Path) -> dict:
    """A study file: a mapping (patching.io.yamlfile's strict reading)."""
    doc = read_yaml(expand(path))
    if not isinstance(doc, dict):
        raise PatchingError(f"{path} must be a mapping with pairs, experiments, defaults, analysis, study.")
    return doc


def wanted(args) -> bool:
    """Whether a command runs a study: --pairs, --shard, --bootstrap or --slurm, or a YAML file with a
    pairs, analysis or study key (any other YAML is a plain batch)."""
    if (getattr(args, "pairs", None) or getattr(args, "shard", None) or getattr(args, "bootstrap", None) is not None
            or getattr(args, "slurm", None) is not None):
        return True
    if not getattr(args, "batch", None):
        return False
    try:
        return any(k in read_study_yaml(Path(args.batch)) for k in STUDY_KEYS)
    except PatchingError:
        return False  # the batch reader reports the problem


def read_study(path: Path | None, given: dict, pairs_file: Path | None = None, bootstrap: int | None = None,
               command: str | None = None) -> Study:
    """The study of a YAML file and/or a pairs file. `given`: the flags typed on the command line (what to
    load and the analysis's options), which win over the file's analysis section, which wins over its
    defaults; `command`: the subcommand it was run with (patch-run lens --pairs ...), if any."""
    doc = read_study_yaml(path) if path else {}
    where = str(path) if path else "--pairs"
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise PatchingError(f"{where}: unknown top-level key {str(unknown[0])[:40]!r}; allowed keys are {', '.join(TOP_KEYS)}.")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PatchingError(f"{where}: defaults must be a mapping of settings.")
    section = doc.get("analysis") or {}
    if not isinstance(section, dict):
        raise PatchingError(f"{where} analysis must be a mapping like {{kind: patch, site: resid_post}}.")
    section = dict(section)
    kind = section.pop("kind", command or analyses.DEFAULT)
    if command is not None and kind != command:
        raise PatchingError(f"{where} is a study of {str(kind)[:40]!r} but the command is {command}: run "
                            f"patch-run {str(kind)[:40]} (or drop the file's kind).")
    studyable = analyses.studyable()
    if kind not in studyable:
        raise PatchingError(f"{where} analysis: kind {str(kind)[:40]!r} is not one of {', '.join(studyable)}"
                            f"{_hint(kind, studyable)}.")
    analysis = analyses.get(kind)
    keys = analysis.Options.keys()  # the analysis section holds its options; what to load goes in defaults
    article = "an" if kind[:1] in "aeiou" else "a"
    reject_unknown(section, keys, f"{where} analysis", f"{article} {kind} analysis takes kind" + "".join(f", {k}" for k in keys))
    spec, options = analysis.settings({**defaults, **section, **given}, f"{where} defaults and analysis")
    try:
        options = analysis.for_study(options)
    except PatchingError as exc:
        raise PatchingError(f"{where}: {exc}") from None
    opts = dict(doc.get("study") or {}) if isinstance(doc.get("study") or {}, dict) else doc.get("study")
    if bootstrap is not None and isinstance(opts, dict):
        opts["bootstrap"] = bootstrap
    study = _options(StudyOptions, opts, f"{where} study")
    items = doc.get("experiments") or []
    if not isinstance(items, list):
        raise PatchingError(f"{where}: experiments must be a list of pairs.")
    pairs = [pair_from_row(item, f"experiment {i}") for i, item in enumerate(items, 1)]
    generated = False
    if doc.get("pairs") is not None:
        pairs += _options(PairSpec, doc["pairs"], f"{where} pairs").generate()
        generated = True
    if pairs_file:
        pairs += read_pairs_file(pairs_file)
    if not pairs:
        raise PatchingError(f"{where} has no pairs: add a pairs generator, experiments, or --pairs FILE.")
    return Study(spec, analysis, options, study, pairs, generated)


def _hint(kind, names: list[str]) -> str:
    """Where a kind that is no analysis is the value of one's option (attribution: patch's method)."""
    for name in names:
        for f in fields(analyses.get(name).Options):
            if kind in (f.metadata.get("choices") or ()):
                return f"; {kind} is a {f.name} of {name}: write {{kind: {name}, {f.name}: {kind}}}"
    return ""


def _options(cls, data, where: str):
    """A plain dataclass from a YAML mapping; unknown keys fail with the allowed ones listed."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PatchingError(f"{where} must be a mapping, got {type(data).__name__}.")
    reject_unknown(data, [f.name for f in fields(cls)], where)
    return cls(**data)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N."""
    if text is None:
        return 1, 1
    m = re.fullmatch(r"\s*(\d{1,7})\s*/\s*(\d{1,7})\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) <= MAX_SHARDS:
        raise PatchingError(f"--shard {str(text)[:20]!r} must be K/N with 1 <= K <= N <= {MAX_SHARDS:,}, "
                            f"e.g. --shard 2/8.")
    return int(m.group(1)), int(m.group(2))


def shard_pairs(study: Study, shard: tuple[int, int]) -> list[tuple[int, StudyPair]]:
    """(1-based index, pair) of the K-th of N round-robin slices: indices K, K+N, K+2N, ..."""
    k, n = shard
    return [(i, p) for i, p in enumerate(study.pairs, 1) if (i - 1) % n == k - 1]


def folder_names(study: Study) -> list[str]:
    """Distinct folder names under pairs/: 0001-<name or clean prompt>, slugged (lowercase letters, digits
    and dashes) as a batch's are, so a name never leads outside pairs/."""
    width = max(4, len(str(len(study.pairs))))
    return [f"{i:0{width}d}-{slug(p.name or p.clean or 'invalid', 40)}" for i, p in enumerate(study.pairs, 1)]


# ----------------------------------------------------------------------------- running a study


def run_study(study: Study, out: Path, *, shard: tuple[int, int] = (1, 1), say: Callable[[str], None] = print,
              overwrite: bool = False, fresh: bool = False) -> tuple[dict, Path]:
    """Run the shard's pairs with the model loaded once, then write the study's files (see finish).
    `out` is claimed (checked, locked; `fresh`: a default name, the first free one) before the model
    loads; the pairs' folders are staged and the whole study moves into place at the end, so it is
    complete or absent. Ctrl-C or SIGTERM, while pairs run or during the statistics, keeps the finished
    pairs in a study whose summary says 'complete': false. Returns the summary and the folder."""
    with claim(out, kind="study", overwrite=overwrite, fresh=fresh) as dest:
        t_start = time.perf_counter()
        ctx = load(study.spec)
        meta = {"kind": "study", "study": study.hash(), "shard": f"{shard[0]}/{shard[1]}",
                "n_study_pairs": len(study.pairs), "settings": study.settings(),
                "analysis": study.analysis.describe(study.options, ctx.config), "options": asdict(study.study),
                "title": study.analysis.title(study.options),
                "row_label": study.analysis.shape(study.options, ctx.config).row_label,
                "model": ctx.name, "versions": versions()}
        load_seconds = time.perf_counter() - t_start
        stage = dest.staging("pairs")
        stage.mkdir()
        try:
            try:
                _run_pairs(study, shard, ctx, meta, stage, say)
            finally:  # also on Ctrl-C: the finished pairs and a summary that says what is missing
                meta["timing"] = {"load_seconds": round(load_seconds, 6),
                                  "pairs_seconds": round(time.perf_counter() - t_start - load_seconds, 6)}
                summary = _keep(dest, meta, stage, say)
        except KeyboardInterrupt as exc:  # say truthfully what is on disk
            exc.kept = (f"{meta.get('_ok', 0)} finished pairs are kept in {dest.folder}, whose summary says "
                        f"\"complete\": false" if dest.written else "nothing was written")
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # moved into the study, or abandoned
    return summary, dest.folder


def _keep(dest, meta: dict, stage: Path, say) -> dict:
    """Write the study (finish's files and the staged pairs) into the claimed folder. An interrupt during
    the statistics still writes the pairs and the summary, without aggregate, marked incomplete."""
    rows, tidy = meta.pop("_rows", []), meta.pop("_tidy", [])
    stopped = None
    try:
        summary, files = finish(meta, rows, tidy, say=say)
    except KeyboardInterrupt as exc:
        meta["complete"], stopped = False, exc
        meta["interrupted"] = "during the statistics: no aggregate was written; run the study again"
        summary, files = finish(meta, rows, tidy, say=say, statistics=False)
    meta["_ok"] = summary["counts"]["ok"]
    # pairs/ lists what it holds, so that --overwrite can tell our folders from a user's files
    (stage / MARKER).write_text(marker_text("pairs", [r["name"] for r in rows if r.get("folder")]))
    files["pairs"] = lambda p: os.replace(stage, p)  # moved in with the rest, all at once
    dest.write(files)
    if stopped is not None:
        raise stopped
    return summary


def _run_pairs(study: Study, shard, ctx, meta: dict, stage: Path, say):
    """Each pair of the shard: skip with a reason, fail with its sentence, or run it and write its folder
    under stage. The rows and the tidy list land in meta (_rows, _tidy) even on an interrupt."""
    names, analysis = folder_names(study), study.analysis
    chosen = shard_pairs(study, shard)
    rows = [{"index": i, "name": names[i - 1], "origin": p.origin, "clean": p.clean, "corrupt": p.corrupt,
             "target": p.target, "foil": p.foil, "status": "pending"} for i, p in chosen]
    tidy: list[dict] = []
    meta["complete"] = False
    threads = torch.get_num_threads()
    if study.study.threads:  # small models on a busy CPU run faster single-threaded; shards add processes
        torch.set_num_threads(study.study.threads)
    two = analysis.takes == PAIR
    try:
        with ctx.model.packed():  # the weights reordered for oneDNN once for every pair
            for n_done, ((i, pair), row) in enumerate(zip(chosen, rows), 1):
                t0 = time.perf_counter()
                why = misfit(ctx.tok, pair, ctx.config.block_size, clean_only=not two)
                if why:
                    row.update(status="skipped", reason=why)
                    continue
                try:
                    result = analysis.run(ctx, pair.input(two), study.options)
                    run_seconds = time.perf_counter() - t0
                    grid = analysis.grid(result)
                    files = analysis.files(result, study.figures)
                    write_folder(stage / row["name"], files, kind=analysis.kind)
                except Exception as exc:  # one pair's failure (or a bug of ours) is one failed row
                    row.update(status="failed", reason=reason(exc))
                    say(f"[{n_done}/{len(rows)}] {row['name']}: failed: {row['reason']}")
                    continue
                tidy.append({"index": i, "name": row["name"], "tokens": grid.tokens,
                             "metrics": {m: np.asarray(v, dtype=np.float64) for m, v in grid.metrics.items()}})
                row.update(status="ok", folder=f"pairs/{row['name']}", **grid.values, n_tokens=len(grid.tokens),
                           page="report.html" if "report.html" in files else "results.json",
                           seconds=round(time.perf_counter() - t0, 6), **analysis.timing(result, run_seconds))
        meta["complete"] = True
    finally:
        torch.set_num_threads(threads)
        for row in rows:
            if row["status"] == "pending":
                row.update(status="interrupted", reason="not run: the study was interrupted")
        meta["_rows"], meta["_tidy"] = rows, tidy  # for run_study's finally, whatever happened


def counts(rows: list[dict]) -> dict:
    c = {s: 0 for s in ("ok", "skipped", "failed", "interrupted")}
    reasons: dict[str, int] = {}
    for r in rows:
        c[r["status"]] = c.get(r["status"], 0) + 1
        if r["status"] in ("skipped", "failed"):  # skips by kind; failures each have their own sentence
            k = f"skipped: {reason_kind(r['reason'])}" if r["status"] == "skipped" else "failed"
            reasons[k] = reasons.get(k, 0) + 1
    return {**c, "reasons": reasons}


def finish(meta: dict, rows: list[dict], tidy: list[dict], say: Callable[[str], None] = print,
           statistics: bool = True) -> tuple[dict, dict]:
    """The summary and the study-level files {name: text or bytes}: summary.json/.md, results.csv (tidy),
    aggregate.json/.csv/.png (one figure per token count), index.html. Shared by run_study and merge.
    statistics=False leaves the aggregate out (a study interrupted while computing it)."""
    t0 = time.perf_counter()
    rows = sorted(rows, key=lambda r: r["index"])
    tidy = sorted(tidy, key=lambda r: r["index"])
    opts, a = meta["options"], meta["analysis"]
    metric, labels = a["metric"], a.get("labels")
    recovery = "recovery" in a["metrics"]  # a normalised effect; analyses without one aggregate the raw value
    values = {r["index"]: r for r in rows}
    groups: dict[int, list[dict]] = {}
    for r in tidy:  # pairs of one token count align cell by cell (every pair, where positions are no axis)
        groups.setdefault(len(r["tokens"]) if "position" in a["axes"] else 0, []).append(r)
    aggs = [stats.aggregate(np.stack([r["metrics"]["recovery"] for r in g]) if recovery else None,
                            np.stack([r["metrics"][metric] for r in g]), a["axes"], [r["tokens"] for r in g],
                            opts["bootstrap"], opts["seed"], labels,
                            {k: [values[r["index"]][k] for r in g] for k in a["scalars"]})
            for g in sorted(groups.values(), key=len, reverse=True)] if statistics else []
    c = counts(rows)
    ok_rows = [r for r in rows if r["status"] == "ok"]
    secs = lambda k: float(np.mean([r[k] for r in ok_rows])) if ok_rows and k in ok_rows[0] else None  # noqa: E731
    own = [k for k in (ok_rows[0] if ok_rows else {}) if k.endswith("_seconds")]  # the analysis's timing fields
    timing = {**meta.get("timing", {}), "pair_seconds_mean": secs("seconds"), **{f"{k}_mean": secs(k) for k in own}}
    if ok_rows and all(timing[f"{k}_mean"] is not None for k in own):  # a pair's cost beyond its run: checks, files
        timing["overhead_seconds_mean"] = timing["pair_seconds_mean"] - sum(timing[f"{k}_mean"] for k in own)
    files: dict[str, str | bytes] = {"results.csv": stats.tidy_csv(tidy, a["metrics"], a["axes"], labels)}
    pngs = []
    if aggs:
        doc = {"study": meta["study"], "metric": metric, "analysis": a, "bootstrap": opts["bootstrap"],
               "seed": opts["seed"], "level": stats.LEVEL, **aggs[0].to_json(),
               "other_groups": [g.to_json() for g in aggs[1:]], "counts": c}
        files["aggregate.json"] = json_text(doc)
        files["aggregate.csv"] = stats.aggregate_csv(aggs)
        what = "mean recovery" if recovery else f"mean {metric}"
        for k, g in enumerate(aggs):
            n_tokens = len(g.columns) if g.column_axis == "position" else len(tidy[0]["tokens"])
            head = (f"{what} over {g.n_pairs} pairs, {meta['model']}, {meta.get('title', a['kind'])}"
                    f"\nhatched: the 95% bootstrap interval contains 0")
            ylabel = (meta.get("row_label") or "{rows}").format(rows=g.row_axis)
            pngs.append(stats.heatmap_png(g, head, ylabel, what))
            files["aggregate.png" if k == 0 else f"aggregate-{n_tokens}-tokens.png"] = pngs[-1]
    timing["finish_seconds"] = round(time.perf_counter() - t0, 6)
    summary = {**{k: v for k, v in meta.items() if not k.startswith("_")}, "counts": c, "timing": timing, "pairs": rows}
    files["summary.json"] = json_text(summary)
    files["summary.md"] = summary_md(summary)
    files["index.html"] = study_page(summary, aggs, pngs, tidy)
    say(f"{c['ok']} pairs ok, {c['skipped']} skipped, {c['failed']} failed"
        + (f", {c['interrupted']} interrupted" if c["interrupted"] else "")
        + "".join(f"; {k}: {v}" for k, v in c["reasons"].items()))
    return summary, files


def summary_md(summary: dict) -> str:
    c = summary["counts"]
    lines = [f"# Study {summary['study']} (shard {summary['shard']})", "",
             f"{c['ok']} ok, {c['skipped']} skipped, {c['failed']} failed, {c['interrupted']} interrupted "
             f"of {len(summary['pairs'])} pairs here ({summary['n_study_pairs']} in the study).", ""]
    lines += [f"- {k}: {v}" for k, v in c["reasons"].items()]
    lines += ["", "| pair | status | clean | corrupt | reason |", "|---|---|---|---|---|"]
    for r in summary["pairs"]:
        num = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731  (one-prompt analyses have no corrupt value)
        vals = f"{num(r.get('clean_value'))} | {num(r.get('corrupt_value'))}"
        lines.append(f"| {r['name']} | {r['status']} | {vals} | {r.get('reason', '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command line


def command(args, given: dict, say: Callable[[str], None] = print, analysis: str | None = None) -> int:
    """`patch-run [COMMAND] --batch STUDY.yaml | --pairs FILE [--shard K/N] [--bootstrap N] [--out DIR]`;
    `analysis`: the subcommand, when one was named."""
    shard = parse_shard(getattr(args, "shard", None))
    path = expand(args.batch) if getattr(args, "batch", None) else None
    pairs_file = expand(args.pairs) if getattr(args, "pairs", None) else None
    bootstrap = getattr(args, "bootstrap", None)
    study = read_study(path, given, pairs_file, None if bootstrap is None else whole(bootstrap, "--bootstrap", 1),
                       analysis)
    if shard[1] > len(study.pairs):  # some shards would hold no pair: say so before any work
        raise PatchingError(f"--shard {shard[0]}/{shard[1]} splits a study of {len(study.pairs)} pairs into more "
                            f"shards than pairs: use at most {len(study.pairs)} shards.")
    stem = slug((path or pairs_file).stem) + (f"-shard-{shard[0]}-of-{shard[1]}" if shard[1] > 1 else "")
    out = expand(args.out) if args.out else expand("outputs") / stem
    n_here = len(shard_pairs(study, shard))
    say(f"study {study.hash()}: {len(study.pairs)} pairs, shard {shard[0]}/{shard[1]} runs {n_here}; "
        f"{study.analysis.title(study.options)}, model {study.spec.model}")
    summary, out = run_study(study, out, shard=shard, say=say, overwrite=bool(getattr(args, "overwrite", False)),
                             fresh=not args.out)
    t = summary["timing"]
    if t.get("pair_seconds_mean") is not None:
        ms = lambda k: f"{t[k] * 1e3:.1f} ms"  # noqa: E731
        label = {"analysis": study.analysis.name, "record": "recorded runs"}  # timing key -> its words
        own = ", ".join(f"{label.get(k.removesuffix('_seconds'), k.removesuffix('_seconds'))} {ms(k + '_mean')}"
                        for k in study.analysis.timing_keys)
        say(f"model load {t['load_seconds']:.2f} s; per pair {ms('pair_seconds_mean')} "
            f"({own}, overhead {ms('overhead_seconds_mean')}); statistics and pages {t['finish_seconds']:.2f} s")
    c = summary["counts"]
    result = getattr(say, "result", print)
    result(f"wrote {out}/index.html, {'aggregate.json, aggregate.csv, ' if c['ok'] else ''}results.csv, summary.json: "
           f"{c['ok']} pairs ok, {c['skipped']} skipped, {c['failed']} failed")
    if not c["ok"]:  # an error, even under --quiet: one line on stderr
        reasons = "; ".join(f"{k}: {v}" for k, v in c["reasons"].items())
        raise PatchingError(f"no pair of the study ran ({reasons or 'no pairs'}): see {out}/summary.md.")
    return 1 if c["failed"] else 0

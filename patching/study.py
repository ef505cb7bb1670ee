"""Studies: one analysis over many prompt pairs, with statistics, shardable over machines.

A single pair is an anecdote; papers patch over a dataset of pairs built from templates (Wang et al.
2022, IOI) and report the mean effect with its spread. A study is a YAML file (or a --pairs file):

    defaults: {model: demo-names}          # any Settings field, as in a batch
    pairs:                                 # a generator: n pairs drawn from slot values with a seed
      clean: "{first} {last} was a top-notch student. {first}"
      corrupt: "{first} {other} was a top-notch student. {first}"
      target: "{last}"
      foil: "{other}"
      slots: {first: [Michelle, Jessica, ...], last: first, other: first}   # a name reuses that list
      n: 200
      seed: 0
      distinct: true                       # the slots of one pair take different values
    experiments: [...]                     # optional: listed pairs, as in a batch (no overrides)
    analysis: {kind: patch, site: resid_post}   # method: attribution estimates the sweep (AtP, qk_fix);
                                           # or lens, dla, ablate, path with their options (patching.kinds)
    study: {bootstrap: 1000, seed: 0, figures: false}

Pairs that do not fit (token counts differ, a target/foil that is not one token, ...) are skipped
and counted by reason; a pair that fails while running is recorded with its reason; the others are
aggregated (patching.stats). `--shard K/N` runs pairs K, K+N, K+2N, ... (1-based) of the study into
the same layout; `patch-run merge` (patching.merge) combines shards whose study hash agrees.

The model loads once; per pair the work is the two recorded runs, the sweep (or, with method
attribution, one forward and backward per metric: api.run's estimate) and the pair's files
(results.json, results.csv, report.html, and heatmap.png when `figures` is on).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from patching import attribution, engines, kinds, stats
from patching.api import (USER_ERRORS, PatchingError, PatchResult, Settings, axes_of, finite, indistinct, load,
                          prepare, read_text, reject_unknown, single_token, summarize, versions)
from patching.engines import METRICS
from patching.files import MARKER, claim, expand, marker_text, write_folder
from patching.report import experiment_files, json_text, slug

ANALYSES = ("patch", *kinds.KINDS)  # the patching sweep (api.run's, exact or attribution) and the toolkit's analyses
# Settings that only the patching sweep reads: a study of another kind refuses them.
PATCH_ONLY = ("site", "direction", "all_positions", "metric", "prepend_bos")
# What `analysis:` may set for a patch study: the Settings fields that choose the sweep.
PATCH_OPTIONS = ("site", "direction", "all_positions", "prepend_bos", "metric", "engine", "max_rows", "method", "qk_fix")
SLOT = re.compile(r"\{(\w+)\}")
MAX_PAIRS = 100_000  # pairs a generator may draw: more is minutes of drawing before anything runs
MAX_SHARDS = 100_000


def _options(cls, data, where: str):
    """A dataclass from a YAML mapping; unknown keys fail with the allowed ones listed."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PatchingError(f"{where} must be a mapping, got {type(data).__name__}.")
    reject_unknown(data, [f.name for f in fields(cls)], where)
    return cls(**data)


def _int(value, name: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PatchingError(f"{name} must be an integer >= {low}, got {str(value)[:40]!r}.")
    return value


@dataclass
class Analysis:
    """What runs on every pair: `kind`, and its options (for patch: Settings fields, PATCH_OPTIONS;
    for lens, dla, ablate: the analysis's options, patching.kinds)."""

    kind: str = "patch"
    options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data, where: str) -> "Analysis":
        data = dict(data or {}) if isinstance(data or {}, dict) else data
        if not isinstance(data, dict):
            raise PatchingError(f"{where} must be a mapping like {{kind: patch, site: resid_post}}.")
        kind = data.pop("kind", "patch")
        if kind == "attribution":  # a method of the patch sweep, as in single experiments
            raise PatchingError(f"{where}: attribution patching is a method of the patch analysis: write "
                                f"{{kind: patch, method: attribution}}.")
        if kind not in ANALYSES:
            raise PatchingError(f"{where}: kind {str(kind)[:40]!r} is not one of {', '.join(ANALYSES)}.")
        if kind != "patch":
            return cls(kind, kinds.options(kind, data, where))
        reject_unknown(data, PATCH_OPTIONS, where, f"a patch analysis takes kind, {', '.join(PATCH_OPTIONS)}")
        return cls(kind, data)


@dataclass
class StudyOptions:
    bootstrap: int = 1000  # resamples of the bootstrap interval
    seed: int = 0  # of the bootstrap
    figures: bool | None = None  # per-pair heatmap.png; default: on for listed pairs, off for generated ones
    threads: int | None = None  # torch CPU threads while the study runs; None: torch's default

    def __post_init__(self):
        _int(self.bootstrap, "study bootstrap", 1)
        if self.threads is not None:
            _int(self.threads, "study threads", 1)
        _int(self.seed, "study seed", 0)
        if self.figures not in (None, True, False):
            raise PatchingError(f"study figures must be true or false, got {str(self.figures)[:40]!r}.")


@dataclass
class PairSpec:
    """The `pairs:` generator: templates with {slot}s, value lists per slot, n pairs from a seed."""

    clean: str
    corrupt: str
    target: str
    foil: str
    slots: dict
    n: int
    seed: int = 0
    distinct: bool = True

    def __post_init__(self):
        for k in ("clean", "corrupt", "target", "foil"):
            if not isinstance(getattr(self, k), str):
                raise PatchingError(f"pairs: {k} must be a text template, e.g. '{{first}} {{last}} was ...'.")
        if not isinstance(self.slots, dict) or not self.slots:
            raise PatchingError("pairs: slots must map each slot name to a list of values.")
        # a slot may name another slot to draw from the same list (batch files allow no YAML aliases)
        self.slots = {name: self.slots.get(v, v) if isinstance(v, str) else v for name, v in self.slots.items()}
        for name, values in self.slots.items():
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise PatchingError(f"pairs: slot {str(name)[:40]!r} must be a non-empty list of texts "
                                    f"or the name of another slot.")
        used = {m for k in ("clean", "corrupt", "target", "foil") for m in SLOT.findall(getattr(self, k))}
        missing, unused = sorted(used - set(self.slots)), sorted(set(self.slots) - used)
        if missing:
            raise PatchingError(f"pairs: the templates use slot {{{missing[0]}}} but slots has no list for it.")
        if unused:
            raise PatchingError(f"pairs: slot {unused[0]!r} is not used by any template: remove it or use it.")
        _int(self.n, "pairs n", 1)
        if self.n > MAX_PAIRS:
            raise PatchingError(f"pairs: n is at most {MAX_PAIRS:,} ({self.n:,} asked for): split a larger study "
                                f"into several files or list its pairs in a --pairs file.")
        _int(self.seed, "pairs seed", 0)
        if not isinstance(self.distinct, bool):
            raise PatchingError("pairs: distinct must be true or false.")

    def generate(self) -> list["Pair"]:
        """n pairs; each slot drawn uniformly from its list with one seeded generator, in slot order."""
        rng, names, out = random.Random(self.seed), sorted(self.slots), []
        for i in range(self.n):
            for _ in range(1000):
                values = {s: rng.choice(self.slots[s]) for s in names}
                if not self.distinct or len(set(values.values())) == len(values):
                    break
            else:
                raise PatchingError("pairs: distinct is on but the slot lists do not have enough different values.")
            fill = lambda t: SLOT.sub(lambda m: values[m.group(1)], t)  # noqa: E731
            out.append(Pair(fill(self.clean), fill(self.corrupt), fill(self.target), fill(self.foil),
                            name=slug("-".join(values[s] for s in names), 40), origin=f"pairs draw {i + 1}"))
        return out


@dataclass
class Pair:
    clean: str
    corrupt: str
    target: str
    foil: str
    name: str | None = None
    origin: str = ""
    error: str | None = None  # the row could not be read: recorded as skipped with this reason


PAIR_KEYS = ("clean", "corrupt", "target", "foil")


def pair_from_row(data, where: str) -> Pair:
    """A listed pair (YAML experiment, JSONL line, CSV row); a bad row becomes a Pair with its error."""
    try:
        if not isinstance(data, dict):
            raise PatchingError(f"{where} must be a mapping with clean, corrupt, target and foil.")
        reject_unknown(data, (*PAIR_KEYS, "name"), where, "a study pair has clean, corrupt, target, foil and an "
                       "optional name (overrides are for plain batches)")
        missing = [k for k in PAIR_KEYS if not isinstance(data.get(k), str) or not data[k]]
        if missing:
            raise PatchingError(f"{where} lacks {', '.join(missing)} (each must be text).")
        name = data.get("name") or None
        return Pair(*(data[k] for k in PAIR_KEYS), name=None if name is None else str(name), origin=where)
    except PatchingError as exc:
        return Pair("", "", "", "", origin=where, error=str(exc))


def read_pairs_file(path: Path) -> list[Pair]:
    """--pairs FILE.jsonl (one JSON object per line) or FILE.csv (a header row), one pair per row.
    A leading byte-order mark is accepted. JSONL lines end at '\\n' only (a raw U+2028 inside a JSON
    string is text, not a line break); CSV fields may hold quoted newlines; a JSON object with a key
    given twice is an invalid row (JSON parsers would keep the last silently)."""
    path = Path(path)
    if path.suffix not in (".csv", ".jsonl"):
        raise PatchingError(f"--pairs {path}: give a .jsonl or .csv file.")
    text = read_text(path, "pairs file")
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # csv's own parser sees quoted newlines
        try:
            head = reader.fieldnames or []
            rows = list(reader)
        except csv.Error as exc:
            raise PatchingError(f"{path} is not a valid CSV file ({exc}): fix the file.") from None
        if not set(PAIR_KEYS) <= set(head):
            raise PatchingError(f"{path}: the header must name clean, corrupt, target, foil (and optionally name); "
                                f"it has {', '.join(map(repr, head)) or 'nothing'}.")
        return [pair_from_row(row, f"{path.name} row {i}") for i, row in enumerate(rows, 2)]
    pairs = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {i}"
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys)
        except (json.JSONDecodeError, _DuplicateKey) as exc:
            why = f"gives key {exc} twice" if isinstance(exc, _DuplicateKey) else f"is not JSON ({exc.msg})"
            pairs.append(Pair("", "", "", "", origin=where, error=f"{where} {why}."))
            continue
        pairs.append(pair_from_row(row, where))
    return pairs


class _DuplicateKey(ValueError):
    pass


def _unique_keys(items: list) -> dict:
    """json.loads' object hook: a mapping, refusing a key given twice."""
    out = {}
    for k, v in items:
        if k in out:
            raise _DuplicateKey(repr(k)[:40])
        out[k] = v
    return out


@dataclass
class Study:
    settings: Settings
    analysis: Analysis = field(default_factory=Analysis)
    options: StudyOptions = field(default_factory=StudyOptions)
    pairs: list = field(default_factory=list)
    generated: bool = False

    @property
    def figures(self) -> bool:
        return (not self.generated) if self.options.figures is None else self.options.figures

    def hash(self) -> str:
        """What makes two shards parts of one study: its pairs, settings that change numbers, analysis,
        statistics. (device, max_rows and threads change speed only; figures only the files.)"""
        settings = {k: v for k, v in asdict(self.settings).items() if k not in ("device", "max_rows")}
        a = self.analysis  # a patch sweep's options are settings; the others' are its own
        doc = {"pairs": [[p.clean, p.corrupt, p.target, p.foil, p.name, p.error] for p in self.pairs],
               "settings": settings, "analysis": a.kind if a.kind == "patch" else
               {"kind": a.kind, **{k: v for k, v in a.options.items() if k != kinds.SOURCE}},  # prompts, not paths
               "bootstrap": self.options.bootstrap, "seed": self.options.seed}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


STUDY_KEYS = ("pairs", "analysis", "study")  # a YAML with any of these is a study, not a plain batch
TOP_KEYS = ("defaults", "experiments", *STUDY_KEYS)


def read_yaml(path: Path) -> dict:
    """batch.read_yaml (strict, bounded, one-line errors), which must give a mapping."""
    from patching.batch import read_yaml as read
    doc = read(expand(path))
    if not isinstance(doc, dict):
        raise PatchingError(f"{path} must be a mapping with pairs, experiments, defaults, analysis, study.")
    return doc


def wanted(args) -> bool:
    """Whether the patch command runs a study: --pairs, --shard or --bootstrap, or a YAML file with a
    pairs, analysis or study key (any other YAML is a plain batch)."""
    if getattr(args, "pairs", None) or getattr(args, "shard", None) or getattr(args, "bootstrap", None) is not None:
        return True
    if not getattr(args, "batch", None):
        return False
    try:
        return any(k in read_yaml(Path(args.batch)) for k in STUDY_KEYS)
    except PatchingError:
        return False  # the batch reader reports the problem


def read_study(path: Path | None, cli_settings: dict, pairs_file: Path | None = None,
               bootstrap: int | None = None) -> Study:
    """The study of a YAML file and/or a pairs file; CLI settings override the file's defaults."""
    doc = read_yaml(path) if path else {}
    where = str(path) if path else "--pairs"
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise PatchingError(f"{where}: unknown top-level key {str(unknown[0])[:40]!r}; allowed keys are {', '.join(TOP_KEYS)}.")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PatchingError(f"{where}: defaults must be a mapping of settings.")
    analysis = Analysis.from_dict(doc.get("analysis"), f"{where} analysis")
    if analysis.kind == "patch":
        # the command line wins over the file's analysis, which wins over its defaults
        settings = Settings.from_dict({**defaults, **analysis.options, **cli_settings}, f"{where} defaults and analysis")
    else:
        settings = Settings.from_dict({**defaults, **cli_settings}, f"{where} defaults")
        given = [k for k in PATCH_ONLY if k in defaults or k in cli_settings]
        if given:
            raise PatchingError(f"{where}: a {analysis.kind} study runs on each pair's clean prompt, so "
                                f"{given[0]} does not apply: drop it.")
        if analysis.kind == "ablate" and ("engine" in cli_settings or "engine" not in analysis.options):
            analysis.options["engine"] = settings.engine  # --engine, then the analysis's, then defaults'
    if settings.check:  # check compares one pair's estimate with its sweep; a study aggregates one of them
        raise PatchingError(f"{where}: check applies to single experiments and batches; a study runs either "
                            f"method (exact or attribution) on every pair: drop check.")
    if settings.method != "exact" and analysis.kind != "patch":
        raise PatchingError(f"{where}: method {settings.method} is a patch analysis's option; a "
                            f"{analysis.kind} study does not take it: drop it.")
    opts = dict(doc.get("study") or {}) if isinstance(doc.get("study") or {}, dict) else doc.get("study")
    if bootstrap is not None and isinstance(opts, dict):
        opts["bootstrap"] = bootstrap
    options = _options(StudyOptions, opts, f"{where} study")
    pairs: list[Pair] = []
    items = doc.get("experiments") or []
    if not isinstance(items, list):
        raise PatchingError(f"{where}: experiments must be a list of pairs.")
    pairs += [pair_from_row(item, f"experiment {i}") for i, item in enumerate(items, 1)]
    generated = False
    if doc.get("pairs") is not None:
        pairs += _options(PairSpec, doc["pairs"], f"{where} pairs").generate()
        generated = True
    if pairs_file:
        pairs += read_pairs_file(pairs_file)
    if not pairs:
        raise PatchingError(f"{where} has no pairs: add a pairs generator, experiments, or --pairs FILE.")
    return Study(settings, analysis, options, pairs, generated)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N."""
    if text is None:
        return 1, 1
    m = re.fullmatch(r"\s*(\d{1,7})\s*/\s*(\d{1,7})\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) <= MAX_SHARDS:
        raise PatchingError(f"--shard {str(text)[:20]!r} must be K/N with 1 <= K <= N <= {MAX_SHARDS:,}, "
                            f"e.g. --shard 2/8.")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- one pair


def misfit(tok, pair: Pair, block_size: int, clean_only: bool = False) -> str | None:
    """Why a pair cannot be patched (a skip reason), or None. The reason's first words are its kind.
    `clean_only`: the analysis reads the clean prompt alone, so the corrupt one is not checked."""
    if pair.error:
        return f"invalid row: {pair.error}"
    a, b = tok.encode(pair.clean), (None if clean_only else tok.encode(pair.corrupt))
    if not a or b == []:
        return "empty prompt"
    if b is not None and len(a) != len(b):
        return f"token counts differ: clean {len(a)}, corrupt {len(b)}"
    if len(a) > block_size:
        return f"too long: {len(a)} tokens, the context holds {block_size}"
    for role, word in (("target", pair.target), ("foil", pair.foil)):
        try:
            single_token(tok, word, role)
        except PatchingError as exc:
            return f"{role} not one token: {exc}"
    return None


def reason_kind(reason: str) -> str:
    return reason.split(":")[0]


@torch.no_grad()  # attribution.estimate turns gradients on for its own backward
def patch_pair(model, tok, pair: Pair, settings: Settings, meta: dict) -> tuple[PatchResult, dict]:
    """api.run's sweep of one pair (settings.site, .direction, .all_positions) with every metric of
    engines.METRICS per cell: api.run returns one metric, a study's tidy table wants all, so the
    log-sum-exp is always read. Recovery is api.run's: 0 = the patched run's own value, 1 = the other's.
    With method attribution each metric's cells are api.run's attribution estimate of that metric
    (one backward per metric), so recovery is defined the same way from the estimated values."""
    prep = prepare(tok, pair.clean, pair.corrupt, pair.target, pair.foil, model.config.block_size,
                   model.config.vocab_size, settings.prepend_bos)
    device = next(model.parameters()).device
    site = settings.site
    t0 = time.perf_counter()
    ids = {k: torch.tensor([v], device=device) for k, v in (("clean", prep.clean_ids), ("corrupt", prep.corrupt_ids))}
    attrib = settings.method == "attribution"
    sites = [site] + (attribution.needed_sites(site, settings.qk_fix) if attrib else [])
    rec = {k: engines.record(model, v, sites) for k, v in ids.items()}
    for k in rec:
        finite(rec[k].last_logits, f"the {k} run's logits")
    r = {k: engines.readout(rec[k].last_logits[0], prep.target_id, prep.foil_id, True).cpu() for k in rec}
    if indistinct(r["clean"], r["corrupt"], rec["clean"].last_logits.dtype):
        raise PatchingError(f"clean and corrupt give the same logit difference up to float rounding "
                            f"({float(r['clean'][1] - r['clean'][0]):.6g}), so recovery is undefined: "
                            f"the pair does not change the answer.")
    t1 = time.perf_counter()
    base, src = ("corrupt", "clean") if settings.direction == "denoise" else ("clean", "corrupt")
    if attrib:  # api.run's estimate, once per metric (each linearises its own metric): base value + estimate
        metrics = {m: float(engines.metric_values(m, r[base], r[src], r[base])) + attribution.estimate(
            model, ids[base], rec[base], rec[src][site][:, 0], site, m, prep.target_id, prep.foil_id, r[src], r[base],
            settings.all_positions, settings.qk_fix).numpy() for m in METRICS}
    else:
        readouts = engines.sweep(model, ids[base], rec[base], rec[src][site][:, 0], site, prep.target_id,
                                 prep.foil_id, True, settings.all_positions, settings.engine, settings.max_rows)
        metrics = {m: engines.metric_values(m, readouts, r[src], r[base]).numpy().astype(np.float64) for m in METRICS}
    t2 = time.perf_counter()
    finite(torch.from_numpy(metrics["logit-diff"]), "the attribution estimates" if attrib else "the patched runs' values")
    value = lambda x: float(engines.metric_values(settings.metric, x, r[src], r[base]))  # noqa: E731
    result = PatchResult(
        prepared=prep, settings=settings, model=getattr(model, "name", settings.model),
        n_layers=model.config.n_layer, matrix=metrics[settings.metric],
        clean=summarize(rec["clean"].last_logits[0], tok, prep, settings.top_k, value(r["clean"])),
        corrupt=summarize(rec["corrupt"].last_logits[0], tok, prep, settings.top_k, value(r["corrupt"])),
        timing={"record_seconds": round(t1 - t0, 6), "sweep_seconds": round(t2 - t1, 6),
                "patches": int(metrics["logit-diff"].size), "device": str(device)},
        versions=meta["versions"])
    return result, metrics


def pair_files(result: PatchResult, figures: bool) -> dict:
    """One pair's folder: what a single experiment writes (report.experiment_files)."""
    return experiment_files(result, png=figures)


# ----------------------------------------------------------------------------- the study


def shard_pairs(study: Study, shard: tuple[int, int]) -> list[tuple[int, Pair]]:
    """(1-based index, pair) of the K-th of N round-robin slices: indices K, K+N, K+2N, ..."""
    k, n = shard
    return [(i, p) for i, p in enumerate(study.pairs, 1) if (i - 1) % n == k - 1]


def folder_names(study: Study) -> list[str]:
    """Distinct folder names under pairs/: 0001-<name or clean prompt>, slugged (lowercase letters, digits
    and dashes) as a batch's are, so a name never leads outside pairs/."""
    width = max(4, len(str(len(study.pairs))))
    return [f"{i:0{width}d}-{slug(p.name or p.clean or 'invalid', 40)}" for i, p in enumerate(study.pairs, 1)]


def describe(study: Study, config) -> dict:
    """What the study's analysis is, for its summary, aggregate.json and pages: its options, the axes
    of its grid (and their labels, for the toolkit's analyses), its metrics and per-pair scalars."""
    s, a = study.settings, study.analysis
    if a.kind != "patch":
        return kinds.describe(a.kind, a.options, config.n_layer, config.n_head)
    return {"kind": "patch", "site": s.site, "direction": s.direction,
            "all_positions": s.all_positions, "method": s.method,
            **({"qk_fix": s.qk_fix} if s.method == "attribution" else {}), "axes": axes_of(s.site, s.all_positions),
            "metrics": list(METRICS), "metric": s.metric, "scalars": ["clean_value", "corrupt_value"]}


def title(a: dict) -> str:
    """'patch resid_post (denoise)', 'lens (ln recompute)', 'ablate (ablation mean)'."""
    if a["kind"] == "patch":
        return f"patch {a['site']} ({a['direction']}{', attribution' if a.get('method') == 'attribution' else ''})"
    opts = [f"{k} {v}" for k, v in a.items() if k in ("ln", "ablation")]
    return a["kind"] + (f" ({', '.join(opts)})" if opts else "")


def run_study(study: Study, out: Path, *, shard: tuple[int, int] = (1, 1), say: Callable[[str], None] = print,
              overwrite: bool = False, fresh: bool = False) -> tuple[dict, Path]:
    """Run the shard's pairs with the model loaded once, then write the study's files (see finish).
    `out` is claimed (checked, locked; `fresh`: a default name, the first free one) before the model
    loads; the pairs' folders are staged and the whole study moves into place at the end, so it is
    complete or absent. Ctrl-C or SIGTERM, while pairs run or during the statistics, keeps the finished
    pairs in a study whose summary says 'complete': false. Returns the summary and the folder."""
    with claim(out, kind="study", overwrite=overwrite, fresh=fresh) as dest:
        t_start = time.perf_counter()
        model, tok = load(study.settings)
        meta = {"kind": "study", "study": study.hash(), "shard": f"{shard[0]}/{shard[1]}",
                "n_study_pairs": len(study.pairs), "settings": asdict(study.settings),
                "analysis": describe(study, model.config), "options": asdict(study.options),
                "model": getattr(model, "name", study.settings.model), "versions": versions()}
        load_seconds = time.perf_counter() - t_start
        stage = dest.staging("pairs")
        stage.mkdir()
        try:
            try:
                _run_pairs(study, shard, model, tok, meta, stage, say)
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


def _run_pairs(study: Study, shard, model, tok, meta: dict, stage: Path, say):
    """Each pair of the shard: skip with a reason, fail with its sentence, or sweep it and write its
    folder under stage. The rows and the tidy list land in meta (_rows, _tidy) even on an interrupt."""
    names = folder_names(study)
    chosen = shard_pairs(study, shard)
    rows = [{"index": i, "name": names[i - 1], "origin": p.origin, "clean": p.clean, "corrupt": p.corrupt,
             "target": p.target, "foil": p.foil, "status": "pending"} for i, p in chosen]
    tidy: list[dict] = []
    meta["complete"] = False
    threads = torch.get_num_threads()
    if study.options.threads:  # small models on a busy CPU run faster single-threaded; shards add processes
        torch.set_num_threads(study.options.threads)
    try:
        kind, cache = study.analysis.kind, {}
        with model.packed():  # the weights reordered for oneDNN once for every pair
            for n_done, ((i, pair), row) in enumerate(zip(chosen, rows), 1):
                t0 = time.perf_counter()
                reason = misfit(tok, pair, model.config.block_size, clean_only=kind not in ("patch", "path"))
                if reason:
                    row.update(status="skipped", reason=reason)
                    continue
                try:
                    if kind == "patch":
                        result, metrics = patch_pair(model, tok, pair, study.settings, meta)
                        files, tokens = pair_files(result, study.figures), result.prepared.tokens
                        values = {"clean_value": result.clean.value, "corrupt_value": result.corrupt.value}
                        timing = {k: result.timing[k] for k in ("sweep_seconds", "record_seconds")}
                    else:
                        out, seconds = kinds.run_pair(kind, model, tok, pair, study.analysis.options, study.figures, cache)
                        files, tokens, metrics, values = out.files, out.tokens, out.metrics, out.values
                        timing = {"analysis_seconds": round(seconds, 6)}
                    write_folder(stage / row["name"], files, kind="experiment")
                except Exception as exc:  # one pair's failure (or a bug of ours) is one failed row
                    row.update(status="failed", reason=reason_text(exc))
                    say(f"[{n_done}/{len(rows)}] {row['name']}: failed: {row['reason']}")
                    continue
                tidy.append({"index": i, "name": row["name"], "tokens": tokens, "metrics": metrics})
                row.update(status="ok", folder=f"pairs/{row['name']}", **values, n_tokens=len(tokens),
                           page="report.html" if "report.html" in files else "results.json",
                           seconds=round(time.perf_counter() - t0, 6), **timing)
        meta["complete"] = True
    finally:
        torch.set_num_threads(threads)
        for row in rows:
            if row["status"] == "pending":
                row.update(status="interrupted", reason="not run: the study was interrupted")
        meta["_rows"], meta["_tidy"] = rows, tidy  # for run_study's finally, whatever happened


def reason_text(exc: BaseException) -> str:
    """A failed pair's reason: our own message, or what an unexpected error was (batch.reason's rule)."""
    from patching.batch import reason
    return reason(exc)


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
    from patching import html
    t0 = time.perf_counter()
    rows = sorted(rows, key=lambda r: r["index"])
    tidy = sorted(tidy, key=lambda r: r["index"])
    opts, a = meta["options"], meta["analysis"]
    metric, labels = a["metric"], a.get("labels")
    recovery = "recovery" in a["metrics"]  # the patching sweep's; the toolkit's analyses aggregate the raw value
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
    own = ("sweep_seconds", "record_seconds") if a["kind"] == "patch" else ("analysis_seconds",)
    timing = {**meta.get("timing", {}), "pair_seconds_mean": secs("seconds"), **{f"{k}_mean": secs(k) for k in own}}
    if ok_rows:  # what a pair costs beyond its own runs (recorded runs and sweep, or the analysis): checks, metrics, files
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
            head = (f"{what} over {g.n_pairs} pairs, {meta['model']}, {title(a)}"
                    f"\nhatched: the 95% bootstrap interval contains 0")
            ylabel = f"{g.row_axis} ({a['site']})" if a["kind"] == "patch" else (
                "residual stream after block" if a["kind"] == "lens" else g.row_axis)
            pngs.append(stats.heatmap_png(g, head, ylabel, what))
            files["aggregate.png" if k == 0 else f"aggregate-{n_tokens}-tokens.png"] = pngs[-1]
    timing["finish_seconds"] = round(time.perf_counter() - t0, 6)
    summary = {**{k: v for k, v in meta.items() if not k.startswith("_")}, "counts": c, "timing": timing, "pairs": rows}
    files["summary.json"] = json_text(summary)
    files["summary.md"] = summary_md(summary)
    files["index.html"] = html.study_page(summary, aggs, pngs, tidy)
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


def command(args, given: dict, say: Callable[[str], None] = print) -> int:
    """`patch-run --batch STUDY.yaml | --pairs FILE [--shard K/N] [--bootstrap N] [--out DIR]`."""
    clash = [f"--{k}" for k in PAIR_KEYS if getattr(args, k, None) is not None]
    if clash:
        raise PatchingError(f"a study runs the pairs of its files: drop {', '.join(clash)}.")
    shard = parse_shard(getattr(args, "shard", None))
    path = expand(args.batch) if getattr(args, "batch", None) else None
    pairs_file = expand(args.pairs) if getattr(args, "pairs", None) else None
    bootstrap = getattr(args, "bootstrap", None)
    study = read_study(path, given, pairs_file, None if bootstrap is None else _int(bootstrap, "--bootstrap", 1))
    if shard[1] > len(study.pairs):  # some shards would hold no pair: say so before any work
        raise PatchingError(f"--shard {shard[0]}/{shard[1]} splits a study of {len(study.pairs)} pairs into more "
                            f"shards than pairs: use at most {len(study.pairs)} shards.")
    stem = slug((path or pairs_file).stem) + (f"-shard-{shard[0]}-of-{shard[1]}" if shard[1] > 1 else "")
    out = expand(args.out) if args.out else expand("outputs") / stem
    n_here = len(shard_pairs(study, shard))
    s, a = study.settings, study.analysis
    what = f"patch {s.site} ({s.direction}, {s.method})" if a.kind == "patch" else f"{a.kind} of each clean prompt"
    say(f"study {study.hash()}: {len(study.pairs)} pairs, shard {shard[0]}/{shard[1]} runs {n_here}; "
        f"{what}, model {s.model}")
    summary, out = run_study(study, out, shard=shard, say=say, overwrite=bool(getattr(args, "overwrite", False)),
                             fresh=not args.out)
    t = summary["timing"]
    if t.get("pair_seconds_mean") is not None:
        ms = lambda k: f"{t[k] * 1e3:.1f} ms"  # noqa: E731
        own = (f"sweep {ms('sweep_seconds_mean')}, recorded runs {ms('record_seconds_mean')}" if a.kind == "patch"
               else f"{a.kind} {ms('analysis_seconds_mean')}")
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

"""YAML batches: many runs of one analysis, each model loaded once, one folder per experiment.

    defaults:            # optional; what to load and any option of the analysis (patch: metric, top_k, ...)
      model: demo-names
    experiments:
      - name: michelle   # optional; sanitised to a safe folder name, kept as given when unique
        clean: Michelle Jones was a top-notch student. Michelle     # the analysis's input: clean, corrupt,
        corrupt: Michelle Smith was a top-notch student. Michelle   # target, foil for one that compares two
        target: Jones                                               # runs; prompt, target, foil for one that
        foil: Smith                                                 # explains one
        overrides: {metric: prob-diff}   # optional; settings for this experiment only

`patch-run --batch FILE` runs the default analysis (patching); `patch-run COMMAND --batch FILE` runs
that one. A bad experiment is recorded in the summary with its reason and the others still run,
whatever it raised. The file is read strictly (patching.io.yamlfile). summary.json is strict JSON,
written at the start, every few seconds, at the end and on Ctrl-C/SIGTERM, so its cost grows
linearly with the number of experiments.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mingpt.errors import quote
from patching.analyses.base import PAIR, Analysis, Events
from patching.core.context import load
from patching.core.errors import PatchingError, reason, reject_unknown
from patching.core.prompts import Pair, Prompt
from patching.core.serial import json_text, slug
from patching.io.files import Claim, claim, expand
from patching.io.yamlfile import read_yaml

SUMMARY_EVERY = 2.0  # seconds between summary rewrites while a batch runs


@dataclass
class Experiment:
    input: Pair | Prompt | None
    name: str | None = None
    overrides: dict = field(default_factory=dict)
    label: str = ""  # what names it when it has no name: its first prompt

    @classmethod
    def from_dict(cls, data, where: str, analysis: Analysis) -> "Experiment":
        keys = analysis.input_keys()
        required = [k for k in keys if not (analysis.takes != PAIR and k in ("target", "foil") and not analysis.answer)]
        if not isinstance(data, dict):
            raise PatchingError(f"{where} must be a mapping with {', '.join(required) or 'overrides'}, "
                                f"got {type(data).__name__}.")
        reject_unknown(data, [*keys, "name", "overrides"], where)
        missing = [k for k in required if k not in data]
        if missing:
            raise PatchingError(f"{where} lacks {', '.join(missing)}: every experiment needs {', '.join(required)}.")
        for k in keys:
            if k in data and not isinstance(data[k], str):
                raise PatchingError(f"{where}: {k} must be text, got {quote(data[k])} (quote it in the YAML).")
        if data.get("name") is not None and not isinstance(data["name"], str):
            raise PatchingError(f"{where}: name must be text, got {quote(data['name'])} (quote it in the YAML).")
        if not isinstance(data.get("overrides", {}), dict):
            raise PatchingError(f"{where}: overrides must be a mapping of settings.")
        values = [data.get(k) for k in keys]
        input = Pair(*values) if analysis.takes == PAIR else Prompt(*values) if keys else None
        return cls(input, data.get("name"), data.get("overrides", {}), values[0] if values else "")


@dataclass
class Batch:
    analysis: Analysis
    defaults: dict  # the file's defaults with the command line's flags over them, checked
    experiments: list  # Experiment, or the PatchingError that its entry raised


def read_batch(path: Path, given: dict, analysis: Analysis) -> Batch:
    """Parse the YAML into dataclasses; flags given on the command line override `defaults`."""
    path = expand(path)
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise PatchingError(f"{path} must be a mapping with an 'experiments' list (and optional 'defaults').")
    unknown = [k for k in doc if k not in ("defaults", "experiments")]
    if unknown:
        raise PatchingError(f"{path}: unknown top-level key {quote(unknown[0])}; allowed keys are defaults, experiments.")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PatchingError(f"{path}: defaults must be a mapping of settings.")
    defaults = {**defaults, **given}
    analysis.settings(defaults, f"{path} defaults")  # checked now: a bad default fails the whole batch
    items = doc.get("experiments")
    if not isinstance(items, list) or not items:
        raise PatchingError(f"{path} has no experiments: add a non-empty 'experiments' list.")
    experiments = []
    for i, item in enumerate(items, 1):
        try:
            experiments.append(Experiment.from_dict(item, f"experiment {i}", analysis))
        except PatchingError as exc:
            experiments.append(exc)
    return Batch(analysis, defaults, experiments)


def unique_names(batch: Batch) -> list[str]:
    """Safe, distinct folder names: a given name (slugged) is kept as it is the first time it is used;
    prompt names and repeated names are numbered, never onto a name given elsewhere."""
    exps = batch.experiments
    given = [slug(e.name) if isinstance(e, Experiment) and e.name else None for e in exps]
    reserved = {g for g in given if g}
    names, seen = [], set()
    for i, (exp, mine) in enumerate(zip(exps, given), 1):
        base = mine or (f"{i:02d}-{slug(exp.label or batch.analysis.name, 40)}" if isinstance(exp, Experiment)
                        else f"{i:02d}-invalid")
        name, n = base, 2
        while name in seen or (name != mine and name in reserved):
            name, n = f"{base}-{n}", n + 1
        seen.add(name)
        names.append(name)
    return names


def run_batch(batch: Batch, out: Path, say: Callable[[str], None] = print, progress_for=None,
              overwrite: bool = False, fresh: bool = False) -> tuple[list[dict], Path]:
    """Run every experiment, writing each folder under `out` and the summary. Returns the summary rows
    and the folder (`fresh`: `out` is a default name; the first free one is taken).

    `out` is checked and locked before anything runs (patching.io.files). KeyboardInterrupt (Ctrl-C, and
    SIGTERM in the CLI) marks the rest as interrupted, writes the summary, and is re-raised."""
    with claim(out, kind="batch", overwrite=overwrite, fresh=fresh) as dest:
        return _run(batch, dest, say, progress_for, overwrite), dest.folder


def _run(batch: Batch, dest: Claim, say, progress_for, overwrite: bool) -> list[dict]:
    out, analysis = dest.open(), batch.analysis
    names = unique_names(batch)
    for name in ("summary.json", "summary.md"):
        if not dest.owns(name):
            raise PatchingError(f"{out / name} was not written by patch-run: move it away or pass another --out.")
    dest.claim_entries(["summary.json", "summary.md", *names])  # one marker write for the whole batch
    models: dict = {}
    packed = contextlib.ExitStack()  # each loaded model keeps its weights reordered for oneDNN for the batch
    rows = [{"name": n, "status": "pending"} for n in names]
    cells: dict[str, list[str]] = {}  # name -> its summary.md cells, once it finished
    write_summary(rows, dest, analysis.columns, cells)
    last = time.monotonic()
    try:
        for i, (exp, row) in enumerate(zip(batch.experiments, rows), 1):
            try:
                if isinstance(exp, PatchingError):
                    raise exp
                spec, options = analysis.settings({**batch.defaults, **exp.overrides}, f"experiment {i} overrides")
                if spec not in models:  # each model loads once per batch, and fails once
                    try:
                        models[spec] = load(spec)
                        packed.enter_context(models[spec].model.packed())
                    except Exception as exc:
                        models[spec] = exc
                if isinstance(models[spec], Exception):
                    raise models[spec]
                events = Events(progress=progress_for(row["name"]) if progress_for else None)
                with claim(out / row["name"], kind=analysis.kind, overwrite=overwrite) as folder:
                    result = analysis.run(models[spec], exp.input, options, events)
                    folder.write(analysis.files(result))
                row.update(status="ok", folder=str(folder.folder), **analysis.summary(result))
                cells[row["name"]] = analysis.cells(result)
                say(f"[{i}/{len(rows)}] {row['name']}: ok ({folder.folder})")
            except Exception as exc:  # one failure is one failed row, whatever raised
                row.update(status="failed", reason=reason(exc))
                say(f"[{i}/{len(rows)}] {row['name']}: failed: {row['reason']}")
            if time.monotonic() - last >= SUMMARY_EVERY:
                write_summary(rows, dest, analysis.columns, cells)
                last = time.monotonic()
    except KeyboardInterrupt as exc:
        why = getattr(exc, "signame", None) or "Ctrl-C"
        for row in rows:
            if row["status"] == "pending":
                row.update(status="interrupted", reason=f"not run: the batch was interrupted ({why})")
        write_summary(rows, dest, analysis.columns, cells)
        done = sum(r["status"] == "ok" for r in rows)
        exc.kept = f"the {done} finished experiments and summary.json are kept in {out}"
        raise
    finally:
        packed.close()
    write_summary(rows, dest, analysis.columns, cells)
    return rows


def write_summary(rows: list[dict], dest: Claim, columns: tuple[str, ...], cells: dict):
    """summary.json (everything, strict JSON) and summary.md (a short table: the analysis's columns per
    finished experiment, the reason in the last one otherwise), each replaced atomically."""
    dest.put("summary.json", json_text({"experiments": rows}))
    lines = [f"| experiment | status | {' | '.join(columns)} |", "|---" * (2 + len(columns)) + "|"]
    for r in rows:
        row = cells[r["name"]] if r["status"] == "ok" else [""] * (len(columns) - 1) + [r.get("reason", "")]
        lines.append(f"| {r['name']} | {r['status']} | " + " | ".join(c.replace("|", chr(92) + "|") for c in row) + " |")
    dest.put("summary.md", "\n".join(lines) + "\n")

"""YAML batches: many clean/corrupt pairs, each model loaded once, one folder per experiment.

    defaults:            # optional; any Settings field (model, metric, top_k, engine, device, ...)
      model: demo-names
    experiments:
      - name: michelle   # optional; sanitised to a safe folder name
        clean: Michelle Jones was a top-notch student. Michelle
        corrupt: Michelle Smith was a top-notch student. Michelle
        target: Jones
        foil: Smith
        overrides: {metric: prob-diff}   # optional; Settings fields for this experiment only

A bad experiment is recorded in the summary with its reason and the others still run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import yaml

from patching.api import USER_ERRORS, PatchingError, Settings, load, run
from patching.report import slug, strongest, write_atomic, write_experiment


@dataclass
class Experiment:
    clean: str
    corrupt: str
    target: str
    foil: str
    name: str | None = None
    overrides: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data, where: str) -> "Experiment":
        if not isinstance(data, dict):
            raise PatchingError(f"{where} must be a mapping with clean, corrupt, target and foil, got {type(data).__name__}.")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise PatchingError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(known)}.")
        missing = [k for k in ("clean", "corrupt", "target", "foil") if k not in data]
        if missing:
            raise PatchingError(f"{where} lacks {', '.join(missing)}: every experiment needs clean, corrupt, target and foil.")
        for k in ("clean", "corrupt", "target", "foil"):
            if not isinstance(data[k], str):
                raise PatchingError(f"{where}: {k} must be text, got {data[k]!r} (quote it in the YAML).")
        if data.get("name") is not None and not isinstance(data["name"], str):
            raise PatchingError(f"{where}: name must be text, got {data['name']!r} (quote it in the YAML).")
        if not isinstance(data.get("overrides", {}), dict):
            raise PatchingError(f"{where}: overrides must be a mapping of settings.")
        return cls(**data)


@dataclass
class Batch:
    defaults: Settings
    experiments: list  # Experiment, or the PatchingError that its entry raised


def read_batch(path: Path, cli_settings: dict) -> Batch:
    """Parse the YAML (safe_load) into dataclasses; CLI flags given explicitly override `defaults`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PatchingError(f"cannot read batch file {path} ({exc.strerror or exc}).") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PatchingError(f"{path} is not valid YAML{at} ({getattr(exc, 'problem', None) or exc}): fix the file.") from None
    if not isinstance(doc, dict):
        raise PatchingError(f"{path} must be a mapping with an 'experiments' list (and optional 'defaults').")
    unknown = [k for k in doc if k not in ("defaults", "experiments")]
    if unknown:
        raise PatchingError(f"{path}: unknown top-level key {unknown[0]!r}; allowed keys are defaults, experiments.")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PatchingError(f"{path}: defaults must be a mapping of settings.")
    settings = Settings.from_dict({**defaults, **cli_settings}, f"{path} defaults")
    items = doc.get("experiments")
    if not isinstance(items, list) or not items:
        raise PatchingError(f"{path} has no experiments: add a non-empty 'experiments' list.")
    experiments = []
    for i, item in enumerate(items, 1):
        try:
            experiments.append(Experiment.from_dict(item, f"experiment {i}"))
        except PatchingError as exc:
            experiments.append(exc)
    return Batch(settings, experiments)


def unique_names(batch: Batch) -> list[str]:
    """Safe, distinct folder names: the given name or the clean prompt, slugged, numbered on clashes."""
    names, seen = [], set()
    for i, exp in enumerate(batch.experiments, 1):
        base = slug(exp.name) if isinstance(exp, Experiment) and exp.name else \
            f"{i:02d}-{slug(exp.clean, 40)}" if isinstance(exp, Experiment) else f"{i:02d}-invalid"
        name, n = base, 2
        while name in seen:
            name, n = f"{base}-{n}", n + 1
        seen.add(name)
        names.append(name)
    return names


def run_batch(batch: Batch, out: Path, say: Callable[[str], None] = print, progress_for=None) -> list[dict]:
    """Run every experiment, writing each folder and, after each, the summary. Returns the summary rows.

    KeyboardInterrupt marks the rest as interrupted, rewrites the summary, and is re-raised."""
    models: dict = {}
    rows = [{"name": n, "status": "pending"} for n in unique_names(batch)]
    try:
        for i, (exp, row) in enumerate(zip(batch.experiments, rows), 1):
            try:
                if isinstance(exp, PatchingError):
                    raise exp
                settings = batch.defaults.merged(exp.overrides, f"experiment {i} overrides")
                key = (settings.model, settings.device, settings.dtype)
                if key not in models:  # each model loads once per batch
                    try:
                        models[key] = load(settings)
                    except USER_ERRORS as exc:
                        models[key] = exc
                if isinstance(models[key], Exception):
                    raise models[key]
                model, tok = models[key]
                progress = progress_for(row["name"]) if progress_for else None
                result = run(model, tok, exp.clean, exp.corrupt, exp.target, exp.foil, settings, progress)
                folder = write_experiment(result, out / row["name"])
                toks = result.prepared.tokens
                row.update(status="ok", folder=str(folder), metric=settings.metric, model=result.model,
                           clean_value=result.clean.value, corrupt_value=result.corrupt.value,
                           sweep_seconds=result.timing["sweep_seconds"],
                           strongest=[{"layer": l, "position": p, "token": toks[p], "value": v}
                                      for l, p, v in strongest(result)])
                say(f"[{i}/{len(rows)}] {row['name']}: ok ({folder})")
            except USER_ERRORS as exc:
                row.update(status="failed", reason=str(exc))
                say(f"[{i}/{len(rows)}] {row['name']}: failed: {exc}")
            write_summary(rows, out)
    except KeyboardInterrupt:
        for row in rows:
            if row["status"] == "pending":
                row.update(status="interrupted", reason="not run: the batch was interrupted (Ctrl-C)")
        write_summary(rows, out)
        raise
    return rows


def write_summary(rows: list[dict], out: Path):
    """summary.json (everything) and summary.md (a short table), each replaced atomically."""
    write_atomic(out / "summary.json", json.dumps({"experiments": rows}, indent=1) + "\n")
    lines = ["| experiment | status | clean | corrupt | strongest patch (layer, position token: value) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            s = r["strongest"][0] if r["strongest"] else None
            best = (f"{s['layer']}, {s['position']} {s['token'].strip() or repr(s['token'])}: {s['value']:.3f}"
                    if s else "no patch moved it")
            lines.append(f"| {r['name']} | ok | {r['clean_value']:.3f} | {r['corrupt_value']:.3f} | {best} |")
        else:
            reason = r.get("reason", "").replace("|", "\\|")
            lines.append(f"| {r['name']} | {r['status']} | | | {reason} |")
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")

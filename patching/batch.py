"""YAML batches: many clean/corrupt pairs, each model loaded once, one folder per experiment.

    defaults:            # optional; any Settings field (model, metric, top_k, engine, device, ...)
      model: demo-names
    experiments:
      - name: michelle   # optional; sanitised to a safe folder name, kept as given when unique
        clean: Michelle Jones was a top-notch student. Michelle
        corrupt: Michelle Smith was a top-notch student. Michelle
        target: Jones
        foil: Smith
        overrides: {metric: prob-diff}   # optional; Settings fields for this experiment only

A bad experiment is recorded in the summary with its reason and the others still run, whatever it
raised. The file is read with a safe loader that also refuses duplicate keys (YAML would keep the
last silently) and aliases (`*name`: a few hundred bytes of them expand to gigabytes), and at most
1 MiB of it is read. summary.json is strict JSON, written at the start, every few seconds, at the
end and on Ctrl-C/SIGTERM, so its cost grows linearly with the number of experiments.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import yaml

from mingpt.errors import quote
from patching.api import MAX_FILE_BYTES, USER_ERRORS, PatchingError, Settings, load, read_text, reject_unknown, run
from patching.files import Claim, claim, expand
from patching.report import cell_fields, experiment_files, json_text, slug, strongest

MAX_BYTES = MAX_FILE_BYTES  # a batch file is a list of experiments; more than this is a mistake (or /dev/zero)
SUMMARY_EVERY = 2.0  # seconds between summary rewrites while a batch runs


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
        reject_unknown(data, [f.name for f in fields(cls)], where)
        missing = [k for k in ("clean", "corrupt", "target", "foil") if k not in data]
        if missing:
            raise PatchingError(f"{where} lacks {', '.join(missing)}: every experiment needs clean, corrupt, target and foil.")
        for k in ("clean", "corrupt", "target", "foil"):
            if not isinstance(data[k], str):
                raise PatchingError(f"{where}: {k} must be text, got {quote(data[k])} (quote it in the YAML).")
        if data.get("name") is not None and not isinstance(data["name"], str):
            raise PatchingError(f"{where}: name must be text, got {quote(data['name'])} (quote it in the YAML).")
        if not isinstance(data.get("overrides", {}), dict):
            raise PatchingError(f"{where}: overrides must be a mapping of settings.")
        return cls(**data)


@dataclass
class Batch:
    defaults: Settings
    experiments: list  # Experiment, or the PatchingError that its entry raised


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases and duplicate keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a batch file; "
                                              "write each value out", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader says so itself below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {quote(key, 40)}; YAML would "
                                                        f"keep only the last one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path):
    """At most MAX_BYTES of UTF-8 YAML through StrictLoader; every failure is one PatchingError line."""
    text = read_text(path, "batch file", MAX_BYTES)
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc)[:160]
        raise PatchingError(f"{path} is not valid YAML{at} ({problem}): fix the file.") from None
    except RecursionError:
        raise PatchingError(f"{path} nests its values too deeply to be a batch file: fix the file.") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date like 2024-13-45
        raise PatchingError(f"{path} holds a value YAML cannot read ({exc.__class__.__name__}: "
                            f"{str(exc)[:80]}): quote it.") from None


def read_batch(path: Path, cli_settings: dict) -> Batch:
    """Parse the YAML (StrictLoader) into dataclasses; CLI flags given explicitly override `defaults`."""
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
    """Safe, distinct folder names: a given name (slugged) is kept as it is the first time it is used;
    clean-prompt names and repeated names are numbered, never onto a name given elsewhere."""
    exps = batch.experiments
    given = [slug(e.name) if isinstance(e, Experiment) and e.name else None for e in exps]
    reserved = {g for g in given if g}
    names, seen = [], set()
    for i, (exp, mine) in enumerate(zip(exps, given), 1):
        base = mine or (f"{i:02d}-{slug(exp.clean, 40)}" if isinstance(exp, Experiment) else f"{i:02d}-invalid")
        name, n = base, 2
        while name in seen or (name != mine and name in reserved):
            name, n = f"{base}-{n}", n + 1
        seen.add(name)
        names.append(name)
    return names


def reason(exc: BaseException) -> str:
    """One line for the summary: our own message, or what an unexpected error was."""
    if isinstance(exc, USER_ERRORS):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = "ran out of memory: use a smaller model, shorter prompts or a smaller --max-rows."
    else:
        text = f"unexpected {exc.__class__.__name__} ({str(exc)[:80]}): this is a bug in patch-run; please report it."
    return " ".join(text.split())[:400]


def run_batch(batch: Batch, out: Path, say: Callable[[str], None] = print, progress_for=None,
              overwrite: bool = False, fresh: bool = False) -> tuple[list[dict], Path]:
    """Run every experiment, writing each folder under `out` and the summary. Returns the summary rows
    and the folder (`fresh`: `out` is a default name; the first free one is taken).

    `out` is checked and locked before anything runs (patching.files). KeyboardInterrupt (Ctrl-C, and
    SIGTERM in the CLI) marks the rest as interrupted, writes the summary, and is re-raised."""
    with claim(out, kind="batch", overwrite=overwrite, fresh=fresh) as dest:
        return _run(batch, dest, say, progress_for, overwrite), dest.folder


def _run(batch: Batch, dest: Claim, say, progress_for, overwrite: bool) -> list[dict]:
    out = dest.open()
    names = unique_names(batch)
    for name in ("summary.json", "summary.md"):
        if not dest.owns(name):
            raise PatchingError(f"{out / name} was not written by patch-run: move it away or pass another --out.")
    dest.claim_entries(["summary.json", "summary.md", *names])  # one marker write for the whole batch
    models: dict = {}
    packed = contextlib.ExitStack()  # each loaded model keeps its weights reordered for oneDNN for the batch
    rows = [{"name": n, "status": "pending"} for n in names]
    write_summary(rows, dest)
    last = time.monotonic()
    try:
        for i, (exp, row) in enumerate(zip(batch.experiments, rows), 1):
            try:
                if isinstance(exp, PatchingError):
                    raise exp
                settings = batch.defaults.merged(exp.overrides, f"experiment {i} overrides")
                key = (settings.model, settings.device, settings.dtype)
                if key not in models:  # each model loads once per batch, and fails once
                    try:
                        models[key] = load(settings)
                        packed.enter_context(models[key][0].packed())
                    except Exception as exc:
                        models[key] = exc
                if isinstance(models[key], Exception):
                    raise models[key]
                model, tok = models[key]
                progress = progress_for(row["name"]) if progress_for else None
                with claim(out / row["name"], kind="experiment", overwrite=overwrite) as folder:
                    result = run(model, tok, exp.clean, exp.corrupt, exp.target, exp.foil, settings, progress)
                    folder.write(experiment_files(result))
                row.update(status="ok", folder=str(folder.folder), metric=settings.metric, model=result.model,
                           clean_value=result.clean.value, corrupt_value=result.corrupt.value,
                           sweep_seconds=result.timing["sweep_seconds"],
                           strongest=[cell_fields(result, entry) for entry in strongest(result)])
                say(f"[{i}/{len(rows)}] {row['name']}: ok ({folder.folder})")
            except Exception as exc:  # one failure is one failed row, whatever raised
                row.update(status="failed", reason=reason(exc))
                say(f"[{i}/{len(rows)}] {row['name']}: failed: {row['reason']}")
            if time.monotonic() - last >= SUMMARY_EVERY:
                write_summary(rows, dest)
                last = time.monotonic()
    except KeyboardInterrupt as exc:
        why = getattr(exc, "signame", None) or "Ctrl-C"
        for row in rows:
            if row["status"] == "pending":
                row.update(status="interrupted", reason=f"not run: the batch was interrupted ({why})")
        write_summary(rows, dest)
        done = sum(r["status"] == "ok" for r in rows)
        exc.kept = f"the {done} finished experiments and summary.json are kept in {out}"
        raise
    finally:
        packed.close()
    write_summary(rows, dest)
    return rows


def write_summary(rows: list[dict], dest: Claim):
    """summary.json (everything, strict JSON) and summary.md (a short table), each replaced atomically."""
    dest.put("summary.json", json_text({"experiments": rows}))
    lines = ["| experiment | status | clean | corrupt | strongest patch (layer, [head,] [position token]: value) |",
             "|---|---|---|---|---|"]
    num = lambda v: "" if v is None or v != v else f"{v:.3f}"  # noqa: E731  (NaN != NaN)
    for r in rows:
        if r["status"] == "ok":
            s = r["strongest"][0] if r["strongest"] else None
            best = (", ".join(str(s[k]) for k in ("layer", "head", "position") if k in s)
                    + (f" {s['token'].strip() or repr(s['token'])}" if "token" in s else "") + f": {num(s['value'])}"
                    if s else "no patch moved it")
            lines.append(f"| {r['name']} | ok | {num(r['clean_value'])} | {num(r['corrupt_value'])} | "
                         f"{best.replace('|', chr(92) + '|')} |")
        else:
            reason = r.get("reason", "").replace("|", "\\|")
            lines.append(f"| {r['name']} | {r['status']} | | | {reason} |")
    dest.put("summary.md", "\n".join(lines) + "\n")

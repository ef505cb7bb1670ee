"""The analyses, one module each, and the registry every generic part of patch-run reads.

One line per analysis: its name (the subcommand, a study's kind) and where its Analysis lives,
imported only when it is used (a run of one analysis never imports the others). `register` adds one
at run time (a plugin, or a test's toy analysis).
"""
from __future__ import annotations

import importlib

from patching.analyses.base import Analysis
from patching.core.errors import PatchingError

REGISTRY: dict[str, str | Analysis] = {
    "patch": "patching.analyses.patch:Patching",
    "lens": "patching.analyses.lens:Lens",
    "dla": "patching.analyses.dla:DLA",
    "attention": "patching.analyses.attention:Attention",
    "heads": "patching.analyses.heads:Heads",
    "ablate": "patching.analyses.ablate:Ablate",
    "path": "patching.analyses.path:Path",
    "circuit": "patching.analyses.circuit:Circuit",
    "weights": "patching.analyses.weights:Weights",
    "top": "patching.analyses.top:Top",
}
DEFAULT = "patch"  # what `patch-run --clean ...` runs


def get(name: str) -> Analysis:
    """The registered analysis `name` (imported on first use)."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise PatchingError(f"there is no analysis {name!r}: use one of {', '.join(REGISTRY)}.")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = REGISTRY[name] = getattr(importlib.import_module(module), attr)()
    return entry


def register(analysis: Analysis):
    """Add (or replace) an analysis under its name."""
    REGISTRY[analysis.name] = analysis


def names() -> list[str]:
    return list(REGISTRY)


def studyable() -> list[str]:
    """The analyses a study can run (those with a grid)."""
    return [n for n in REGISTRY if type(get(n)).shape is not Analysis.shape]

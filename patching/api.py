"""The Python API: every analysis as one call on a loaded model, returning numpy arrays.

    from patching.api import Pair, Prompt, load, run
    ctx = load("demo-names")                                   # or load(ModelSpec(model=..., device=..., dtype=...))
    res = run("patch", ctx, Pair("Michelle Jones was a top-notch student. Michelle",
                                 "Michelle Smith was a top-notch student. Michelle", "Jones", "Smith"), site="z")
    res.matrix                                                 # (n_layer, n_head, n_tokens) numpy
    lens = run("lens", ctx, Prompt("Michelle Jones was a top-notch student. Michelle", "Jones", "Smith"))

`run(name, ctx, input, **options)` runs any registered analysis (patching.analyses.REGISTRY) with its
options given as keywords (or as its Options object); the result is the analysis's own (its arrays,
`to_json()`, and what `files()` writes). A user mistake raises PatchingError (or a mingpt error), one
sentence each. This module is the top of the package for Python callers; nothing inside imports it.
"""
from __future__ import annotations

from patching import analyses
from patching.analyses.base import Events
from patching.core.context import Context, ModelSpec, load
from patching.core.errors import USER_ERRORS, PatchingError
from patching.core.options import Options
from patching.core.prompts import Pair, Prompt

__all__ = ["Context", "Events", "ModelSpec", "Pair", "PatchingError", "Prompt", "USER_ERRORS", "load", "options",
           "run"]


def options(analysis: str, **fields) -> Options:
    """An analysis's options from keywords, checked (unknown names fail)."""
    return analyses.get(analysis).options(**fields)


def run(analysis: str, ctx: Context, input: Pair | Prompt | None = None, options: Options | None = None, *,
        events: Events | None = None, **fields):
    """Run the analysis `analysis` on `input` (a Pair, a Prompt or nothing, as it takes) with its options:
    an Options object, or keywords."""
    a = analyses.get(analysis)
    if not isinstance(ctx, Context):
        raise PatchingError(f"run() needs the Context that load() returns, got {type(ctx).__name__}: "
                            f"ctx = load(\"demo-names\").")
    if options is not None and fields:
        raise PatchingError("give the options as an Options object or as keywords, not both.")
    if options is None:
        options = a.options(**fields)
    elif not isinstance(options, a.Options):
        raise PatchingError(f"{analysis} takes {a.Options.__name__}, got {type(options).__name__}: "
                            f"pass its fields as keywords.")
    return a.run(ctx, input, options, events)

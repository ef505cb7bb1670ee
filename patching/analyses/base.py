"""The protocol every analysis implements: all that the generic layers know of an analysis.

An analysis is a subclass of `Analysis` registered in patching.analyses.REGISTRY. The command line,
YAML batches, studies, merge and the pages use only what is declared here, so adding an analysis is
one module and one registry line (docs/adding-an-analysis.md):

- `Options`: its typed settings (patching.core.options): the CLI flags, YAML keys and Python
  keywords all come from it. The input of a run is not an option.
- `takes`: its input, `PAIR` (a Pair: clean, corrupt, target, foil), `PROMPT` (a Prompt: text and
  optionally target and foil) or `NOTHING`.
- `run(ctx, input, options, events) -> result`: the work, on a loaded model (core.context.Context).
- `files(result, figures)`: its output folder, {name: text | bytes | writer}; `lines(result)`: what
  the terminal shows; `written(result, names)`: the one line always printed.
- for a study over many inputs, `shape(options, config)` (the grid's axes, metrics, per-input
  numbers; None: not studyable) and `grid(result)` (one input's cells).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable

from patching.core.context import Context, ModelSpec
from patching.core.errors import PatchingError, reject_unknown
from patching.core.options import Options
from patching.core.prompts import Pair, Prompt, check_answer, check_text
from patching.core.serial import slug

PAIR, PROMPT, NOTHING = "pair", "prompt", "nothing"


@dataclass
class Events:
    """What a run reports while it works; the CLI shows them, a Python caller may pass its own.
    progress(done, total): the main loop's progress; plan(plan): what will run, before it runs (a plan
    callback may raise to stop there: --dry-run)."""

    progress: Callable[[int, int], None] | None = None
    plan: Callable[[Any], None] | None = None


@dataclass
class Shape:
    """How a study lays out one analysis's results: a grid of cells with named metrics.

    axes: the grid's axes (e.g. layer, position); metrics: the tidy table's metrics, `metric` the
    one aggregated (recovery where `recovery` is in metrics: a normalised effect); scalars: per-input
    numbers aggregated beside the grid (clean_value, ...); labels: axis -> labels of the rows and
    non-position columns (None: layers and heads by number); definition: what `metric` means;
    row_label: the aggregate figure's y axis."""

    axes: list[str]
    metrics: list[str]
    metric: str
    scalars: list[str]
    labels: dict | None = None
    definition: str | None = None
    row_label: str | None = None


@dataclass
class Grid:
    """One input's result as a study aggregates it: metrics over the shape's axes, the clean prompt's
    tokens, the per-input numbers."""

    metrics: dict[str, Any]  # metric -> numpy array over the shape's axes
    tokens: list[str]
    values: dict[str, float] = field(default_factory=dict)


class Analysis(abc.ABC):
    """One analysis (see the module docstring)."""

    name: str  # the subcommand, a study's kind, a batch's command
    help: str
    Options: type[Options]
    takes: str = PROMPT
    answer: bool = False  # PROMPT input: target and foil are required
    words: bool = True  # PROMPT input: it takes a target and a foil at all (optional unless `answer`)
    marker: str | None = None  # the kind written in its folders' marker [name]
    plans: bool = False  # it can print its plan and stop (--dry-run)
    figures: tuple[str, ...] = ()  # its PNG files, left out of a study's pair folders unless figures is on

    @property
    def kind(self) -> str:
        """The kind in its output folders' marker."""
        return self.marker or self.name

    def options(self, **fields) -> Options:
        """Its options from keywords (Python), checked."""
        return self.Options.from_mapping(fields, f"{self.name} options")

    @property
    def studyable(self) -> bool:
        """Whether a study can run it (it lays its results out as a grid)."""
        return type(self).grid is not Analysis.grid

    def settings(self, data: dict, where: str) -> tuple[ModelSpec, Options]:
        """A flat mapping of settings (a batch's or study's defaults, an analysis section, the flags given)
        as what to load and how to run; a key that is neither fails, naming what is allowed."""
        if not isinstance(data, dict):
            raise PatchingError(f"{where} must be a mapping of settings.")
        model_keys, keys = ModelSpec.keys(), self.Options.keys()
        article = "an" if self.name[:1] in "aeiou" else "a"
        reject_unknown(data, [*model_keys, *keys], where,
                       f"{article} {self.name} run takes {', '.join([*model_keys, *keys])}")
        spec = ModelSpec.from_mapping({k: v for k, v in data.items() if k in model_keys}, where)
        return spec, self.Options.from_mapping({k: v for k, v in data.items() if k in keys}, where)

    timing_keys: tuple[str, ...] = ("analysis_seconds",)  # a study pair's timing fields (timing())

    def timing(self, result, seconds: float) -> dict:
        """A study pair's timing fields (timing_keys) from its result and the seconds its run took."""
        return {"analysis_seconds": round(seconds, 6)}

    def input_keys(self) -> tuple[str, ...]:
        """The fields of its input, as flags and as YAML keys."""
        if self.takes == PAIR:
            return ("clean", "corrupt", "target", "foil")
        if self.takes == PROMPT:
            return ("prompt", "target", "foil") if self.words else ("prompt",)
        return ()

    def check_input(self, input) -> Any:
        """The input this analysis takes, checked before any model is loaded: its type, a prompt's text,
        and its target and foil (both or neither; both where the analysis needs them)."""
        want = {PAIR: Pair, PROMPT: Prompt, NOTHING: type(None)}[self.takes]
        if not isinstance(input, want):
            raise PatchingError(f"{self.name} runs on {'no input' if want is type(None) else want.__name__}, got "
                                f"{type(input).__name__}: pass patching.core.prompts.{want.__name__}(...).")
        if isinstance(input, Prompt):
            check_text(input.text, "prompt")
            if not input.text.strip():
                raise PatchingError("the prompt is empty: give the text to analyse with --prompt.")
            if not self.words and (input.target is not None or input.foil is not None):
                raise PatchingError(f"{self.name} takes no target or foil (it reads no logits): drop them.")
            check_answer(input, needed=self.answer, command=self.name)
        return input

    @abc.abstractmethod
    def run(self, ctx: Context, input, options, events: Events | None = None) -> Any:
        """The analysis of one input on a loaded model."""

    @abc.abstractmethod
    def files(self, result, figures: bool = True) -> dict:
        """Its output folder: {file name: text | bytes | writer(path)}; PNGs only with figures."""

    def lines(self, result) -> list[str]:
        """What the terminal shows after the files are written (unless --quiet)."""
        return []

    def written(self, result, names: list[str]) -> str:
        """The files written, as the line printed even under --quiet lists them."""
        return ", ".join(n for n in names)

    def folder_name(self, ctx: Context, input, options) -> str:
        """The default output folder's name under outputs/ (numbered -2, -3, ... if taken)."""
        text = input.text if isinstance(input, Prompt) else input.clean if isinstance(input, Pair) else ctx.name
        return f"{self.name}-{slug(text, 50)}"

    def summary(self, result) -> dict:
        """Fields of a batch's summary row for this result (beside name, status and folder)."""
        return {}

    columns: tuple[str, ...] = ("result",)  # a batch's summary.md columns beside experiment and status

    def cells(self, result) -> list[str]:
        """Its cells of a batch's summary.md row, one per `columns` (by default its first terminal line)."""
        lines = self.lines(result)
        return [lines[0].strip() if lines else ""]

    # ------------------------------------------------------------------ studies

    def shape(self, options, config) -> Shape | None:
        """How a study lays out this analysis's results; None: it cannot run as a study."""
        return None

    def grid(self, result) -> Grid:
        """One input's cells for a study (only for analyses with a shape)."""
        raise NotImplementedError(f"{self.name} has no study grid")

    def for_study(self, options):
        """The options a study runs with (an analysis may refuse some, or ask for more metrics)."""
        return options

    def title(self, options) -> str:
        """A short title of what ran, for the study's figures and page."""
        return self.name

    def describe(self, options, config) -> dict:
        """The analysis as a study's summary, aggregate.json and page record it."""
        shape = self.shape(options, config)
        doc = {"kind": self.name, **self.shown(options), "axes": list(shape.axes)}
        if shape.labels is not None:
            doc["labels"] = shape.labels
        doc.update(metrics=list(shape.metrics), metric=shape.metric)
        if shape.definition is not None:
            doc["metric_definition"] = shape.definition
        doc["scalars"] = list(shape.scalars)
        return doc

    def shown(self, options) -> dict:
        """The options worth recording beside a study's grid [all of them]."""
        return options.shown()

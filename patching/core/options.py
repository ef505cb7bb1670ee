"""Typed options: each analysis's settings are one frozen dataclass of this kind.

Every field says in its metadata how it is given (its flag, help, choices, range), so the command
line, a YAML mapping and Python build the same object by field name, and unknown keys fail here, in
one place. Values are checked when the object is made (and again by `verify()`, which catches fields
changed behind the frozen dataclass's back); a subclass adds its cross-field rules in `validate()`.

    @dataclass(frozen=True)
    class LensOptions(Options):
        ln: str = option("recompute", help="...", choices=("recompute", "frozen"))
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Sequence

from mingpt.errors import quote
from patching.core.errors import PatchingError, reject_unknown


def option(default: Any = MISSING, *, help: str = "", flag: str | None = None, choices: Sequence[str] | None = None,
           low: int | None = None, high: int | None = None, nargs: str | None = None, item: Callable | None = None,
           parse: Callable[[str], Any] | None = None, load: Callable[[Any, str], Any] | None = None,
           negate: str | None = None, metavar: str | None = None, cli: bool = True, internal: bool = False,
           speed: bool = False) -> Any:
    """A field of an Options dataclass with what the CLI and YAML need to know about it.

    flag: the CLI flag ([--name-with-dashes]); negate: a flag that sets a True-by-default bool to False
    (then the field has no flag of its own); choices / low, high: checked for every value; nargs, item:
    a list flag and its items' type; parse: text of the CLI flag -> value (e.g. a file of prompts);
    load: a YAML value -> value (with where, for messages); cli=False: no flag; internal: set by
    patch-run itself, never by a user (no flag, no YAML key, not shown); speed: changes only how fast
    it runs (left out of a study's hash)."""
    meta = dict(help=help, flag=flag, choices=tuple(choices) if choices else None, low=low, high=high, nargs=nargs,
                item=item, parse=parse, load=load, negate=negate, metavar=metavar,
                cli=cli and not internal, internal=internal, speed=speed)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Options:
    """Base of every analysis's options (see the module docstring)."""

    def __post_init__(self):
        self.verify()

    def verify(self):
        """Raise PatchingError (one line) unless every field has a usable type and value."""
        for f in fields(self):
            _check_value(f, getattr(self, f.name))
        self.validate()

    def validate(self):
        """Rules between fields; subclasses override (the value checks of the metadata ran already)."""

    # ------------------------------------------------------------------ from mappings (YAML, Python)

    @classmethod
    def keys(cls) -> list[str]:
        """The fields a user may set (YAML keys, CLI dests)."""
        return [f.name for f in fields(cls) if not f.metadata.get("internal")]

    @classmethod
    def from_mapping(cls, data, where: str = "options", takes: str | None = None):
        """Build from a mapping (YAML, Python); unknown keys fail, naming what is allowed."""
        if not isinstance(data, dict):
            raise PatchingError(f"{where} must be a mapping of settings, got {quote(data)}.")
        reject_unknown(data, cls.keys(), where, takes)
        loaded = {}
        for f in fields(cls):
            if f.name in data:
                load = f.metadata.get("load")
                loaded[f.name] = load(data[f.name], where) if load and data[f.name] is not None else data[f.name]
        missing = [f.name for f in fields(cls) if f.name not in loaded and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise PatchingError(f"{where}: {missing[0]} is required ({_describe(cls, missing[0])}).")
        try:
            return cls(**loaded)
        except PatchingError as exc:
            raise PatchingError(f"{where}: {exc}") from None

    def replace(self, **changes):
        """A checked copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def shown(self) -> dict:
        """The options as a summary, aggregate.json and the pages show them (internal fields left out)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if not f.metadata.get("internal")}

    def hashed(self) -> dict:
        """What a study's hash covers: every option that can change a number (not the speed-only ones)."""
        return {f.name: _plain(getattr(self, f.name), hashing=True) for f in fields(self)
                if not f.metadata.get("internal") and not f.metadata.get("speed")}

    # ------------------------------------------------------------------ from the command line

    @classmethod
    def add_arguments(cls, ap: argparse._ActionsContainer):
        """One flag per field, derived from its metadata; every default is None, so that `given` sees
        only what was typed (a batch's or study's file fills the rest)."""
        for f in fields(cls):
            m = f.metadata
            if not m.get("cli", True):
                continue
            if m.get("negate"):  # --no-qk-fix sets a True-by-default bool to False
                ap.add_argument(m["negate"], dest=f.name, action="store_const", const=False, help=m["help"])
                continue
            flag = m.get("flag") or "--" + f.name.replace("_", "-")
            kw: dict = dict(dest=f.name, help=m["help"] or None, default=None)
            if isinstance(f.default, bool):
                kw.update(action="store_const", const=True)
            else:
                if m.get("choices"):
                    kw["choices"] = list(m["choices"])
                elif m.get("nargs"):
                    kw.update(nargs=m["nargs"], type=m.get("item") or str)
                elif m.get("low") is not None or isinstance(f.default, int):
                    kw["type"] = int
                elif isinstance(f.default, float):
                    kw["type"] = float
                if m.get("metavar"):
                    kw["metavar"] = m["metavar"]
            ap.add_argument(flag, **kw)

    @classmethod
    def given(cls, args: argparse.Namespace) -> dict:
        """The fields given on the command line (parsed: a file of prompts read, a range split)."""
        out = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is None or not f.metadata.get("cli", True):
                continue
            parse = f.metadata.get("parse")
            out[f.name] = parse(value) if parse else value
        return out


def _check_value(f: dataclasses.Field, value):
    m, name = f.metadata, f.name
    if m.get("choices") is not None:
        if not isinstance(value, str) or value not in m["choices"]:
            raise PatchingError(f"{name} {quote(value)} is not one of {', '.join(m['choices'])}.")
    elif isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise PatchingError(f"{name} must be true or false, got {quote(value)}.")
    elif isinstance(f.default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise PatchingError(f"{name} must be a number, got {quote(value)}.")
    elif m.get("low") is not None:
        low, high = m["low"], m.get("high")
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            span = ("a positive integer" if low == 1 and high is None else f"an integer at least {low}"
                    if high is None else f"an integer between {low} and {high}")
            raise PatchingError(f"{name} must be {span}, got {quote(value)}.")


def _describe(cls, name: str) -> str:
    f = next(f for f in fields(cls) if f.name == name)
    flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
    return f.metadata.get("help") or f"give {flag}"


def _plain(value, hashing: bool = False):
    """A value as JSON holds it (tuples as lists; objects that know how to show themselves, shown, or
    as a hash should cover them)."""
    if hashing and hasattr(value, "hashed"):
        return value.hashed()
    if hasattr(value, "shown"):
        return value.shown()
    if isinstance(value, tuple):
        return [_plain(v, hashing) for v in value]
    return value

"""A study's pairs: drawn from templates with a seed, listed in its YAML, or read from a --pairs file.

    pairs:                                 # a generator: n pairs drawn from slot values with a seed
      clean: "{first} {last} was a top-notch student. {first}"
      corrupt: "{first} {other} was a top-notch student. {first}"
      target: "{last}"
      foil: "{other}"
      slots: {first: [Michelle, Jessica, ...], last: first, other: first}   # a name reuses that list
      n: 200
      seed: 0
      distinct: true                       # the slots of one pair take different values

A row that cannot be read is kept as a pair with its error (a skip, counted by reason); a pair that
does not fit the model (token counts differ, a word that is not one token, ...) is skipped too.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from patching.core.errors import PatchingError, reject_unknown
from patching.core.prompts import Pair, Prompt, single_token
from patching.core.serial import read_text, slug

SLOT = re.compile(r"\{(\w+)\}")
MAX_PAIRS = 100_000  # pairs a generator may draw: more is minutes of drawing before anything runs


def whole(value, name: str, low: int) -> int:
    """An integer option of a study file, at least `low`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PatchingError(f"{name} must be an integer >= {low}, got {str(value)[:40]!r}.")
    return value


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
        whole(self.n, "pairs n", 1)
        if self.n > MAX_PAIRS:
            raise PatchingError(f"pairs: n is at most {MAX_PAIRS:,} ({self.n:,} asked for): split a larger study "
                                f"into several files or list its pairs in a --pairs file.")
        whole(self.seed, "pairs seed", 0)
        if not isinstance(self.distinct, bool):
            raise PatchingError("pairs: distinct must be true or false.")

    def generate(self) -> list["StudyPair"]:
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
            out.append(StudyPair(fill(self.clean), fill(self.corrupt), fill(self.target), fill(self.foil),
                            name=slug("-".join(values[s] for s in names), 40), origin=f"pairs draw {i + 1}"))
        return out


@dataclass
class StudyPair:
    clean: str
    corrupt: str
    target: str
    foil: str
    name: str | None = None
    origin: str = ""
    error: str | None = None  # the row could not be read: recorded as skipped with this reason

    def input(self, takes_pair: bool):
        """What the analysis runs on: both prompts, or the clean prompt with the pair's two words."""
        return Pair(self.clean, self.corrupt, self.target, self.foil) if takes_pair else \
            Prompt(self.clean, self.target, self.foil)


PAIR_KEYS = ("clean", "corrupt", "target", "foil")


def pair_from_row(data, where: str) -> StudyPair:
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
        return StudyPair(*(data[k] for k in PAIR_KEYS), name=None if name is None else str(name), origin=where)
    except PatchingError as exc:
        return StudyPair("", "", "", "", origin=where, error=str(exc))


def read_pairs_file(path: Path) -> list[StudyPair]:
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
            pairs.append(StudyPair("", "", "", "", origin=where, error=f"{where} {why}."))
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


def misfit(tok, pair: StudyPair, block_size: int, clean_only: bool = False) -> str | None:
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

"""Numbers and text in and out: strict JSON, CSV text, file-name slugs, versions, bounded input files.

JSON has no NaN or Infinity, so every document patch-run writes goes through `json_text` (non-finite
floats become null); CSV floats are written with repr (they read back exactly).
"""
from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from patching.core.errors import PatchingError

MAX_FILE_BYTES = 1 << 20  # an input file (batch, pairs, reference prompts) larger than this is a mistake (or /dev/zero)


def expand(path: str | os.PathLike) -> Path:
    """What the user typed, with ~ expanded and made absolute ('.' and '..' become real names)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def json_floats(x):
    """x (a float, nested lists or tuples, or a numpy array) with non-finite floats as None."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [json_floats(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def json_text(doc) -> str:
    """Strict JSON of a document (dicts, lists, numbers, text): non-finite floats become null."""
    def clean(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(doc), indent=1, allow_nan=False) + "\n"


def csv_text(header: Sequence, rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def slug(text: str, limit: int = 60) -> str:
    """A safe file name: lowercase letters, digits and single dashes, never empty or a dot name."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return s or "experiment"


def versions() -> dict:
    """The versions a result was made with (looked up once per process: a study asks for every pair)."""
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> dict:
    try:
        ours = version("patch-run")
    except PackageNotFoundError:
        ours = "unknown"
    return {"patch-run": ours, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def read_text(path, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """A user's input file as text: at most `limit` bytes, UTF-8 with or without a byte-order mark
    (editors on Windows write one); every failure is one PatchingError line naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise PatchingError(f"cannot read {what} {path} ({exc.strerror or exc}).") from None
    if len(data) > limit:
        raise PatchingError(f"{what} {path} is larger than {limit >> 20} MiB: split it into smaller files.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PatchingError(f"{what} {path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}): "
                            f"save it as UTF-8.") from None

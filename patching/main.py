"""The `patch-run` executable (and `python -m patching`): the heatmap helper started beside torch's
import, then the command line.

A single run draws one heatmap; forking the helper process (patching.core.painter) before torch is
imported lets matplotlib's import run on the other core meanwhile. Everything else is patching.cli.
This module imports nothing heavy itself: the fork must happen before torch is loaded.
"""
from __future__ import annotations

import sys

from patching.core import painter


def draws_one_heatmap(argv: list[str]) -> bool:
    """Whether these arguments run the default command once (a helper would be wasted on --help,
    other commands, batches and dry runs; a wrong guess costs only the helper's idle import)."""
    if not argv or not (argv[0] == "patch" or argv[0].startswith("-")):
        return False
    return not any(a in ("-h", "--help") or a.startswith(("--batch", "--dry", "--pairs")) for a in argv)


def program() -> int:
    """Start the helper when one heatmap will be drawn, then run the CLI."""
    if draws_one_heatmap(sys.argv[1:]):
        painter.start()
    try:
        from patching import cli  # after the fork: torch is imported here
        return cli.program()
    finally:
        painter.stop()

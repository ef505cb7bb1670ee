"""Errors a user can act on, for everything in patching/: one sentence, what was wrong and what to do.

The CLI prints str(error) after "patch-run: error:" and exits non-zero; a batch or study records it as
the failed row's reason. `assert` is kept for internal invariants.
"""
from __future__ import annotations

from mingpt.errors import MinGPTError, quote


class PatchingError(Exception):
    """A user mistake in what was asked of patch-run; the message is one sentence saying what to do."""


USER_ERRORS = (PatchingError, MinGPTError)  # what the CLI turns into one line


def reject_unknown(data: dict, allowed, where: str, takes: str | None = None):
    """Unknown keys fail (YAML, JSONL, option mappings): name the first, then what is allowed."""
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise PatchingError(f"{where}: unknown key {quote(unknown[0], 40)}; "
                            f"{takes or 'allowed keys are ' + ', '.join(allowed)}.")


def reason(exc: BaseException) -> str:
    """One line for a failed row of a batch or study: our own message, or what an unexpected error was."""
    if isinstance(exc, USER_ERRORS):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = "ran out of memory: use a smaller model, shorter prompts or a smaller --max-rows."
    else:
        text = f"unexpected {exc.__class__.__name__} ({str(exc)[:80]}): this is a bug in patch-run; please report it."
    return " ".join(text.split())[:400]

"""Errors a user can act on. Each message is one sentence that says what was wrong and what to do.

Code that catches these (the patch-run CLI) prints str(error) and exits non-zero; nothing else in
mingpt raises for user mistakes, and `assert` is kept for internal invariants only.
"""


class MinGPTError(Exception):
    """Base class of every user-facing error raised by mingpt."""


class ModelNotFoundError(MinGPTError):
    """The model name is unknown, the folder does not exist, or the Hub has no such repository."""


class OfflineError(MinGPTError):
    """Files must come from the Hub but we are offline (or it is unreachable) and they are not cached."""


class WeightsError(MinGPTError):
    """The weight file is missing, truncated, corrupt, unsafe, or its tensors do not fit the config."""


class ConfigError(MinGPTError):
    """A model configuration value is invalid or unsupported."""


class VocabularyError(MinGPTError):
    """The BPE vocabulary files are missing or malformed."""


class InputError(MinGPTError):
    """The token ids given to the model do not fit it (too long, out of the vocabulary, wrong shape)."""


def quote(value, limit: int = 80) -> str:
    """repr() of a value for an error message, at most about `limit` characters whatever its size
    (reprlib stops early, so a huge or deeply nested value costs no time or memory to quote)."""
    import reprlib
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 4
    r.maxlevel = 2
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""What an analysis reads: a pair of prompts or one prompt, and the two answer words, tokenized and checked.

The input of a run is not an option: `Pair(clean, corrupt, target, foil)` for analyses that compare
two runs, `Prompt(text, target, foil)` for those that explain one. A target or foil word follows the
prompt, so it is looked up with a leading space (' Jones'); '=TEXT' takes TEXT exactly.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mingpt.bpe import BOS  # noqa: F401  (re-exported: --prepend-bos puts it at position 0)
from mingpt.errors import quote
from patching.core.errors import PatchingError
from patching.core.serial import expand, read_text

SHOWN_PROMPTS = 20  # reference prompts listed in a study's summary; the rest are counted


@dataclass(frozen=True)
class Pair:
    """Two prompts of the same token count and the words each predicts: the input of patching."""

    clean: str
    corrupt: str
    target: str
    foil: str


@dataclass(frozen=True)
class Prompt:
    """One prompt and, where the analysis measures logit(foil) - logit(target), the two words."""

    text: str
    target: str | None = None
    foil: str | None = None


def check_text(text, what: str) -> str:
    """A prompt or word must be a str that UTF-8 can encode (a Latin-1 terminal's bytes arrive as lone
    surrogates, which cannot be tokenized)."""
    if not isinstance(text, str):
        raise PatchingError(f"the {what} must be text (a str), got {type(text).__name__} {quote(text)}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PatchingError(f"the {what} holds bytes that are not UTF-8 (at character {exc.start}, "
                            f"{quote(text[max(0, exc.start - 10):exc.start + 10])}): set your terminal or file to "
                            f"UTF-8 and type it again.") from None
    return text


def single_token(tok, word: str, role: str) -> tuple[str, int]:
    """A target/foil word follows the prompt, so it is looked up with a leading space (' Jones');
    a word written '=TEXT' is taken exactly as TEXT, with no space added ('=.' is the token '.')."""
    check_text(word, role)
    exact = word.startswith("=")
    text = word[1:] if exact else word if word.startswith(" ") else " " + word
    if not word.strip() or not text:
        raise PatchingError(f"the {role} is empty: give the word the model should predict next, e.g. Jones "
                            f"(or =TEXT for a token without the leading space).")
    ids = tok.encode(text)
    if len(ids) != 1:
        pieces = " + ".join(quote(tok.token_str(i), 20) for i in ids[:6]) + (" + ..." if len(ids) > 6 else "")
        raise PatchingError(f"the {role} {quote(text)} is {len(ids)} tokens ({pieces}), not one: pick a word that is a "
                            f"single GPT-2 token, e.g. its first piece {tok.token_str(ids[0])!r}.")
    return text, ids[0]


def answer_ids(tok, target: str, foil: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """((target text, id), (foil text, id)), two different single tokens."""
    t, f = single_token(tok, target, "target"), single_token(tok, foil, "foil")
    if t[1] == f[1]:
        raise PatchingError(f"target and foil are the same token {t[0]!r}: the metric compares two different tokens.")
    return t, f


def check_answer(prompt: Prompt, needed: bool, command: str):
    """target and foil come together; `needed` analyses cannot run without them."""
    given = [w is not None for w in (prompt.target, prompt.foil)]
    if needed and not all(given):
        raise PatchingError(f"{command} needs both --target and --foil: the words whose logit difference "
                            f"logit(foil) - logit(target) it explains.")
    if any(given) and not all(given):
        raise PatchingError(f"give both --target and --foil, or neither ({command} got only one).")


def encode(tok, prompt: str, block_size: int, role: str = "prompt") -> list[int]:
    """Token ids of one prompt, refused when empty or longer than the context."""
    check_text(prompt, role)
    ids = tok.encode(prompt) if prompt.strip() else []
    if not ids:
        raise PatchingError(f"the {role} is empty: give the text to analyse with --prompt.")
    if len(ids) > block_size:
        raise PatchingError(f"the {role} is {len(ids)} tokens but the model's context holds {block_size}: shorten it.")
    return ids


@dataclass
class Prepared:
    """Both prompts tokenized and checked, ready to run."""

    clean_ids: list[int]
    corrupt_ids: list[int]
    tokens: list[str]
    corrupt_tokens: list[str]
    target: str
    target_id: int
    foil: str
    foil_id: int

    @property
    def differing(self) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.clean_ids, self.corrupt_ids)) if a != b]


def prepare(tok, pair: Pair, block_size: int, vocab_size: int | None = None, prepend_bos: bool = False) -> Prepared:
    """Tokenize and check both prompts and both answer words; raise PatchingError on any misfit.
    With vocab_size, every id must be one the model has (a damaged vocabulary can map outside it)."""
    for role, text in (("clean", pair.clean), ("corrupt", pair.corrupt)):
        check_text(text, f"{role} prompt")
        if not text.strip():
            raise PatchingError(f"the {role} prompt is empty: give the text whose next token is predicted.")
    bos = [BOS] if prepend_bos else []  # labelled position 0 in every table and figure
    a, b = bos + tok.encode(pair.clean), bos + tok.encode(pair.corrupt)
    show_ids = lambda ids: "|".join(tok.token_str(i) for i in ids)  # noqa: E731
    if len(a) != len(b):
        raise PatchingError(f"the clean prompt is {len(a)} tokens [{show_ids(a)}] but the corrupt prompt is {len(b)} "
                            f"[{show_ids(b)}]: edit them until both have the same number of tokens.")
    if len(a) > block_size:
        raise PatchingError(f"the prompts are {len(a)} tokens but the model's context holds {block_size}: shorten them.")
    if a == b:
        raise PatchingError("the clean and corrupt prompts are the same tokens, so there is nothing to patch: "
                            "change the corrupt prompt where the clean one carries the information.")
    (t_text, t_id), (f_text, f_id) = answer_ids(tok, pair.target, pair.foil)
    if vocab_size is not None:
        for what, i in (("target", t_id), ("foil", f_id), *(("prompt token", i) for i in a + b)):
            if not 0 <= i < vocab_size:
                raise PatchingError(f"the vocabulary maps the {what} to id {i}, outside the model's 0..{vocab_size - 1}: "
                                    f"use the vocabulary files that belong to this model.")
    return Prepared(a, b, [tok.token_str(i) for i in a], [tok.token_str(i) for i in b], t_text, t_id, f_text, f_id)


class Prompts(tuple):
    """Reference prompts (for mean ablation), and where they came from: a file (shown by its name and
    the SHA-256 of its prompts, never its content) or the options themselves."""

    file: str | None = None

    @classmethod
    def of(cls, value, what: str) -> "Prompts":
        """A list of prompts, or the name of a UTF-8 text file with one prompt per non-blank line."""
        if isinstance(value, Prompts):
            return value
        if isinstance(value, str):
            prompts = cls(line for line in read_text(expand(value), f"--{what}").splitlines() if line.strip())
            if not prompts:
                raise PatchingError(f"--{what} {value} has no prompts: write one prompt per line.")
            prompts.file = str(expand(value))
        elif isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
            prompts = cls(value)
        else:
            raise PatchingError(f"{what} must be a list of prompts or the name of a text file with one prompt per line.")
        if not prompts:
            raise PatchingError(f"the {what} prompts are empty: give one prompt per line.")
        for i, p in enumerate(prompts, 1):
            check_text(p, f"{what} prompt {i}")
            if not p.strip():
                raise PatchingError(f"{what} prompt {i} is empty: give one prompt per line.")
        return prompts

    def shown(self):
        if self.file is not None:
            return {"file": self.file, "sha256": hashlib.sha256("\n".join(self).encode()).hexdigest(),
                    "n_prompts": len(self)}
        extra = [f"... and {len(self) - SHOWN_PROMPTS} more"] if len(self) > SHOWN_PROMPTS else []
        return [*self[:SHOWN_PROMPTS], *extra]

    def hashed(self) -> list[str]:
        """What a study's hash covers: the prompts themselves, wherever they came from."""
        return list(self)

"""Corpora for `top`: where documents come from, their tokens, and the windows the model reads.

A SOURCE is `python-docs` (the standard library's pydoc_data.topics: one document per help topic,
~465,000 characters shipped with every CPython, so it works offline), a .txt file (documents are its
paragraphs, split at blank lines), a folder (every .txt file under it, by sorted path, one document
each), a .jsonl or .csv file (one document per row, its text in `column`), or, when none of these
exists, a Hugging Face dataset id (its train split's `column`; needs the optional `datasets` package and
the network).

Every document is tokenised on its own (no BOS); a document's tokens are cut into windows of at most
the model's context (one less with --prepend-bos, whose <|endoftext|> opens every window); windows
never span two documents. A token's (document, position) is its document's index in the corpus and
its index in that document's token ids.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass

import numpy as np

from mingpt.errors import quote
from patching.core.errors import PatchingError
from patching.core.serial import expand

PYTHON_DOCS = "python-docs"
MAX_CORPUS_BYTES = 1 << 30  # a corpus file larger than this is a mistake (or /dev/zero)


@dataclass
class Corpus:
    """A tokenised corpus: every document's token ids, end to end (`tokens`, int32), and where each
    document starts in them (`offsets`, n_documents + 1)."""

    source: str
    tokens: np.ndarray  # (n_tokens,) int32
    offsets: np.ndarray  # (n_documents + 1,) int64

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d]:self.offsets[d + 1]]

    def fingerprint(self) -> str:
        """A hash of the token ids and document bounds: an index belongs to exactly this corpus."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.offsets, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.tokens, dtype=np.int32).tobytes())
        return h.hexdigest()[:32]


def _text_of(path, what: str) -> str:
    """A file's text: refused when binary (a NUL byte) or not UTF-8."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CORPUS_BYTES:
            raise PatchingError(f"{what} {path} is {size / 2**30:.1f} GiB: a corpus file holds at most 1 GiB; split it "
                                f"into a folder of .txt files.")
        data = open(path, "rb").read()
    except OSError as exc:
        raise PatchingError(f"cannot read {what} {path} ({exc.strerror or exc.__class__.__name__}): give a readable "
                            f"file.") from None
    if b"\x00" in data:
        raise PatchingError(f"{what} {path} is a binary file (it holds NUL bytes): give UTF-8 text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PatchingError(f"{what} {path} is not UTF-8 text (byte {exc.start}): give UTF-8 text.") from None


def paragraphs(text: str) -> list[str]:
    """A text file's documents: its paragraphs (split at lines that are blank), stripped, none empty."""
    docs, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def _rows(path, text: str, column: str) -> list[str]:
    """The `column` of every row of a JSONL or CSV file."""
    out = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise PatchingError(f"line {n} of {path} is not JSON: give one JSON object per line.") from None
            if not isinstance(row, dict) or column not in row:
                raise PatchingError(f"line {n} of {path} has no {quote(column, 40)} field: name the text field "
                                    f"with --column.")
            if not isinstance(row[column], str):
                raise PatchingError(f"line {n} of {path}: {quote(column, 40)} is not text.")
            out.append(row[column])
        return out
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise PatchingError(f"{path} has no {quote(column, 40)} column (its columns: "
                            f"{', '.join(reader.fieldnames or []) or 'none'}): name the text column with --column.")
    return [row[column] or "" for row in reader]


def _hub_dataset(source: str, column: str) -> list[str]:
    try:
        import datasets  # optional: only for a Hugging Face dataset id
    except ImportError:
        raise PatchingError(f"there is no file or folder {quote(source, 80)} (a Hugging Face dataset id needs the "
                            f"optional `datasets` package: pip install datasets).") from None
    try:
        ds = datasets.load_dataset(source, split="train")
    except Exception as exc:  # the hub's own errors: offline, no such dataset, ...
        raise PatchingError(f"cannot load the dataset {quote(source, 80)} ({exc.__class__.__name__}): give a file, "
                            f"a folder, python-docs, or a dataset id reachable online.") from None
    if column not in ds.column_names:
        raise PatchingError(f"the dataset {quote(source, 80)} has no {quote(column, 40)} column (its columns: "
                            f"{', '.join(ds.column_names)}): name the text column with --column.")
    return [t if isinstance(t, str) else "" for t in ds[column]]


def documents(source: str, column: str = "text") -> list[str]:
    """The texts of a SOURCE (see the module docstring), in corpus order."""
    if not isinstance(source, str) or not source.strip():
        raise PatchingError("the corpus is empty: give --corpus FILE, FOLDER or python-docs.")
    if source == PYTHON_DOCS:
        from pydoc_data.topics import topics
        return [topics[k] for k in sorted(topics)]
    path = expand(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise PatchingError(f"the folder {path} holds no .txt files: give a folder of .txt files.")
        return [_text_of(p, "corpus file") for p in files]
    if path.is_file():
        text = _text_of(path, "corpus")
        if path.suffix.lower() in (".jsonl", ".csv"):
            return _rows(path, text, column)
        return paragraphs(text)
    if os.path.lexists(path) or os.sep in source or source.endswith((".txt", ".jsonl", ".csv")):
        raise PatchingError(f"there is no corpus file or folder {path}: give a .txt/.jsonl/.csv file, a folder, or "
                            f"python-docs.")
    return _hub_dataset(source, column)


def tokenize(tok, source: str, texts: list[str], vocab_size: int) -> Corpus:
    """Every document's token ids, end to end; refused when there is no text to rank (fewer than 2 tokens)."""
    pieces = [np.asarray(tok.encode(t), dtype=np.int32) for t in texts]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    if len(tokens) == 0:
        raise PatchingError(f"the corpus {quote(source, 80)} has no text: give documents with words in them.")
    if len(tokens) < 2:
        raise PatchingError(f"the corpus {quote(source, 80)} is a single token: give at least two tokens of text.")
    if int(tokens.max()) >= vocab_size:
        raise PatchingError(f"the corpus has token id {int(tokens.max())}, outside this model's vocabulary of "
                            f"{vocab_size}: use a model with GPT-2's vocabulary.")
    return Corpus(source, tokens, offsets)


@dataclass
class Window:
    document: int
    start: int  # the position (in the document's token ids) of its first token
    length: int  # document tokens in it (the BOS not counted)


def windows(corpus: Corpus, size: int, bos: bool) -> list[Window]:
    """Every document cut into windows of at most `size` model positions (the BOS takes one)."""
    step = size - (1 if bos else 0)
    if step < 1:
        raise PatchingError("the window must hold at least one token after the BOS: raise --window.")
    out = []
    for d in range(corpus.n_documents):
        n = int(corpus.offsets[d + 1] - corpus.offsets[d])
        out += [Window(d, s, min(step, n - s)) for s in range(0, n, step)]
    return out


def batches(wins: list[Window], size: int) -> list[list[int]]:
    """Windows grouped into batches of at most `size`, longest first (little padding), deterministically:
    the same corpus and settings always give the same batches (a resumed index sees the same numbers)."""
    order = sorted(range(len(wins)), key=lambda i: (-wins[i].length, i))
    return [order[a:a + size] for a in range(0, len(order), size)]

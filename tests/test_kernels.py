"""Tests of the inference fast paths, each against the plain computation it replaces.

- `dense` (oneDNN's matmul with the bias and activation fused, without gradients) against F.linear
  and the activation, and the model under no_grad against the model with gradients on (F.linear);
- the MLP's row slices of long batches against one slice;
- mingpt.resume's attention buckets (any bucket size) and its first-block saving (the base run's
  q, k, v reused) against the loop oracle, and against the resumed forward without the saving;
- patching.painter: the helper process draws the same PNG bytes as this process, the fallback when
  the helper is gone, and which arguments start one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from mingpt import model as model_module
from mingpt import resume
from mingpt.model import ACTIVATIONS, GPT, GPTConfig, Recording, dense
from patching import engines, painter

ROOT = Path(__file__).resolve().parent.parent


def random_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=3, n_head=2, n_embd=16, vocab_size=53, block_size=96)
    model = GPT(GPTConfig(**{**cfg, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("act", [None, *ACTIVATIONS])
def test_dense_equals_linear_and_activation(act):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 37, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    want = F.linear(x, w, b)
    want = ACTIVATIONS[act](want) if act else want
    with torch.no_grad():
        got = dense(x, w, b, act)
        strided = dense(x.transpose(0, 1), w, b, act)  # a non-contiguous input
    assert_close(got, want, scale=want.abs().max())
    assert_close(strided, want.transpose(0, 1), scale=want.abs().max())
    assert got.shape == want.shape


def test_model_without_gradients_equals_model_with_them():
    """no_grad takes dense's oneDNN path (where torch has it); with gradients, F.linear: the same logits."""
    model = random_model(activation="gelu_new")
    idx = torch.randint(0, 53, (2, 40), generator=torch.Generator().manual_seed(2))
    with_grad, _ = model(idx)
    assert with_grad.requires_grad
    with torch.no_grad():
        without, _ = model(idx)
    assert_close(without, with_grad.detach(), scale=with_grad.detach().abs().max())


def test_mlp_row_slices_equal_one_slice(monkeypatch):
    model = random_model()
    x = torch.randn(5, 70, 16, generator=torch.Generator().manual_seed(3))
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        whole = mlp(x)
        monkeypatch.setattr(model_module, "MLP_ROWS", 33)  # 350 rows: 11 slices, the last one short
        sliced = mlp(x)
    assert sliced.shape == whole.shape
    assert_close(sliced, whole, scale=whole.abs().max())


def test_replaced_activation_is_used():
    """Swapping mlp.act (e.g. for an identity, as analyses of a linearised model do) must take effect:
    the fused path is only for the configured activation."""
    model = random_model()
    mlp = model.transformer.h[0].mlp
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    mlp.act = lambda h: h
    with torch.no_grad():
        got = mlp(x)
    want = mlp.c_proj.weight @ (mlp.c_fc.weight @ x.T + mlp.c_fc.bias[:, None]) + mlp.c_proj.bias[:, None]
    assert_close(got, want.T, scale=want.abs().max())


def _pair(T, differ, seed=5, vocab=53):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (1, T), generator=g)
    corrupt = clean.clone()
    for p in differ:
        corrupt[0, p] = (clean[0, p] + 3) % vocab
    return clean, corrupt


@pytest.mark.parametrize("short_keys", [0, 128])
@pytest.mark.parametrize("bucket_rows", [1, 7, 64, 10**6])
@pytest.mark.parametrize("site", ["resid_post", "resid_pre", "z", "pattern"])
def test_attention_buckets_of_any_size_equal_the_loop(monkeypatch, bucket_rows, site, short_keys):
    """Every bucket size (one group per call, some groups together, all groups in one call), with
    the fused or the written-out attention, gives the loop oracle's numbers; T=30 with several
    differing positions makes groups of many lengths."""
    monkeypatch.setattr(resume, "BUCKET_ROWS", bucket_rows)
    monkeypatch.setattr(resume, "SHORT_KEYS", short_keys)
    model = random_model(seed=6)
    clean, corrupt = _pair(30, [1, 9, 20])
    rc, rk = engines.record(model, clean, [site]), engines.record(model, corrupt, [site])
    fast = engines.sweep(model, corrupt, rk, rc[site][:, 0], site, 3, 4, True, engine="fast")
    loop = engines.sweep(model, corrupt, rk, rc[site][:, 0], site, 3, 4, True, engine="loop")
    assert_close(fast[..., :2], loop[..., :2], scale=loop[..., :2].abs().max())


def test_first_block_saving_equals_recomputing_every_row():
    """With q recorded, a block-input patch reuses the base run's q, k, v for the rows after the
    patch where it joins; without q (a Recording of k and v only) every row is computed. Both are the
    plain forward's numbers, and the saving path is really taken."""
    model = random_model(seed=7)
    clean, corrupt = _pair(25, [2, 13])
    rc = engines.record(model, clean)
    with_q = engines.record(model, corrupt)
    without_q = Recording(sites={"resid_pre", "resid_post", "k", "v"})
    with torch.no_grad():
        model(corrupt, record=without_q, last_only=True)
    layers, positions = [0, 1, 2], list(range(2, 25))
    values = rc.resid[:, 0][:, positions]  # (3, 23, C)
    calls = []
    real = resume._Known.linear
    resume._Known.linear = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        saved = model.forward_patched(with_q, layers, positions, values)
        assert calls, "the first-block saving was not used"
        n = len(calls)
        plain = model.forward_patched(without_q, layers, positions, values)
        assert len(calls) == n, "without q the saving must not be used"
    finally:
        resume._Known.linear = real
    scale = plain.abs().max()
    assert_close(saved, plain, scale=scale)
    for i, l in enumerate(layers):  # and against single plain forwards
        for j in (0, 7, 22):
            p = positions[j]
            want, _ = model(corrupt, patch=model_module.Patch(l, p, values[i, j]))
            assert_close(saved[i, j], want[0, -1], scale=scale)


# ----------------------------------------------------------------------------- painter


def _spec():
    """A spec with report.heatmap_spec's fields (a CJK label, a rule, a two-line title)."""
    return dict(matrix=np.arange(12.0).reshape(3, 4) - 5, lim=6.0, figsize=(5, 4),
                xticks=([0, 1, 2, 3], ["a (0)", " b (1)", "日本 (2)", "d (3)"], 90), xlabel="position",
                yticks=([0, 1, 2], ["0", "1", "2"]), rules=[0.5], ylabel="layer", title="t\nu", colorbar="m")


def test_helper_draws_the_same_png_as_this_process(tmp_path):
    """The helper is forked in a fresh interpreter (before torch's import, as the executable does)."""
    script = (
        "import pickle, sys\n"
        "from patching import painter\n"
        "painter.start()\n"
        "assert painter._helper is not None\n"
        "spec = pickle.load(open(sys.argv[1], 'rb'))\n"
        "painter.paint(spec, sys.argv[2])\n"
        "assert painter._helper is not None, 'the helper failed'\n"
        "painter.stop()\n")
    import pickle
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(_spec()))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "spec.pkl"), str(tmp_path / "helper.png")],
                   check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    painter.draw_heatmap(_spec(), str(tmp_path / "here.png"))
    assert (tmp_path / "helper.png").read_bytes() == (tmp_path / "here.png").read_bytes()


def test_without_a_live_helper_the_heatmap_is_drawn_here(tmp_path, monkeypatch):
    r, w = os.pipe()
    os.close(r)  # a helper that is gone: writing to it fails
    dead = (os.getpid(), os.fdopen(w, "wb"), open(os.devnull, "rb"))
    monkeypatch.setattr(painter, "_helper", dead)
    monkeypatch.setattr(os, "waitpid", lambda pid, flags: (pid, 0))
    painter.paint(_spec(), tmp_path / "x.png")
    assert painter._helper is None
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_helper_starts_only_before_torch():
    painter.start()  # this test process imported torch long ago: forking now would be unsafe
    assert painter._helper is None


@pytest.mark.parametrize("argv, starts", [
    (["--clean", "a", "--corrupt", "b", "--target", "x", "--foil", "y"], True),
    (["patch", "--clean", "a"], True),
    ([], False), (["--help"], False), (["lens", "--prompt", "a"], False), (["--batch", "f.yaml"], False),
    (["--batch=f.yaml"], False), (["--clean", "a", "--dry-run"], False), (["merge", "a"], False)])
def test_which_arguments_start_a_helper(argv, starts):
    assert painter._draws_one_heatmap(argv) is starts


def test_python_dash_m_patching_runs_the_cli(tmp_path):
    """`python -m patching` (the executable's entry, with its helper) writes the same files as main()."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "patching", "--model", "demo-names", "--quiet", "--clean",
                           "Michelle Jones was a top-notch student. Michelle", "--corrupt",
                           "Michelle Smith was a top-notch student. Michelle", "--target", "Jones", "--foil", "Smith",
                           "--out", str(out)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    png = (out / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from patching.report import heatmap_spec
    from patching.api import Settings, load, run
    settings = Settings(model="demo-names")
    model, tok = load(settings)
    result = run(model, tok, "Michelle Jones was a top-notch student. Michelle",
                 "Michelle Smith was a top-notch student. Michelle", "Jones", "Smith", settings)
    painter.draw_heatmap(heatmap_spec(result), str(tmp_path / "here.png"))
    assert (tmp_path / "here.png").read_bytes() == png

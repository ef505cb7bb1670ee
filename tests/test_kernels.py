"""Tests of the inference fast paths, each against the plain computation it replaces.

- `dense` (oneDNN's matmul with the bias and activation fused, without gradients) against F.linear
  and the activation, and the model under no_grad against the model with gradients on (F.linear);
- the MLP's row slices of long batches against one slice;
- mingpt.resume's attention buckets (any bucket size) and its first-block saving (the base run's
  q, k, v reused) against the loop oracle, and against the resumed forward without the saving;
- mingpt.ragged's compiled attention against a plain per-row softmax and against the torch buckets,
  built for two vector widths and by gcc and clang against itself (the same bits), sweeps that use it
  against the loop, and the torch fallback when it cannot be built;
- patching.painter: the helper process draws the same PNG bytes as this process, the fallback when
  the helper is gone, and which arguments start one.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from mingpt import linear as linear_module
from mingpt import model as model_module
from mingpt import ragged, resume
from mingpt.model import ACTIVATIONS, GPT, GPTConfig, Recording, dense
from patching.core import engines, painter

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


@pytest.mark.parametrize("fuse", [True, False])  # the GELU inside oneDNN's product (AVX-512) or after it (AVX2)
@pytest.mark.parametrize("act", [None, *ACTIVATIONS])
def test_dense_equals_linear_and_activation(act, fuse, monkeypatch):
    monkeypatch.setattr(linear_module, "fuse_gelu", lambda: fuse)
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
    differing positions makes groups of many lengths. (The torch ops' attention: the kernel off.)"""
    monkeypatch.setattr(ragged, "enabled", False)
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


@pytest.mark.parametrize("T, positions", [(5, [1, 3]), (25, [2, 13])])
def test_first_block_saving_in_one_call_or_two(T, positions):
    """The block where an input patch joins computes the earlier slabs' rows and the fresh slabs'
    patched rows in one call when the earlier rows are few (T=5), in two calls otherwise (T=25): both
    give the plain forward's numbers."""
    model = random_model(seed=8, n_layer=4)
    clean, corrupt = _pair(T, positions)
    rc, rk = engines.record(model, clean), engines.record(model, corrupt)
    layers, cols = [0, 1, 2, 3], list(range(1, T))
    values = rc.resid[:, 0][:, cols]  # (4, T - 1, C)
    calls = []
    c_attn = model.transformer.h[2].attn.c_attn  # block 2: block 0's slab joined earlier, block 1's joins here
    hook = c_attn.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))
    try:
        got = model.forward_patched(rk, layers, cols, values)
    finally:
        hook.remove()
    old_rows, fresh_rows = sum(T - p for p in cols), len(cols)
    want_calls = [(old_rows + fresh_rows, 16)] if T == 5 else [(1, fresh_rows, 16), (1, old_rows, 16)]
    assert sorted(tuple(s) for s in calls) == sorted(want_calls), calls
    scale = got.abs().max()
    for i, l in enumerate(layers):
        for j, p in enumerate(cols):
            want, _ = model(corrupt, patch=model_module.Patch(l, p, values[i, j]))
            assert_close(got[i, j], want[0, -1], scale=scale)


# ----------------------------------------------------------------------------- packed weights

needs_packing = pytest.mark.skipif(linear_module._REORDER is None, reason="this torch has no oneDNN weight packing")


@needs_packing
@pytest.mark.parametrize("act", [None, "gelu_new"])
@pytest.mark.parametrize("rows", [slice(None), slice(16, None), slice(None, 16)])
def test_packed_linear_equals_plain(act, rows):
    torch.manual_seed(9)
    lin = linear_module.Linear(16, 48)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        plain = lin(x, act, rows=rows)
        lin.keep_packed = True
        packed = lin(x, act, rows=rows)
        again = lin(x, act, rows=rows)
    assert lin._packs, "no packed weight was made"
    with torch.no_grad():  # one row: oneDNN's matrix-vector path rounds otherwise with a pack, so none is used
        lin.keep_packed = False
        one_plain = lin(x[:1, :1], act, rows=rows)
        lin.keep_packed = True
        assert torch.equal(lin(x[:1, :1], act, rows=rows), one_plain)
    want = dense(x, lin.weight[rows], lin.bias[rows], act)
    assert plain.shape == packed.shape == (3, 7, len(range(48)[rows]))
    for got in (plain, packed, again):
        assert_close(got, want, scale=want.abs().max())


@needs_packing
def test_packed_weight_follows_changes_of_the_weight():
    """An in-place edit (its version counter moves) or a new tensor is seen: the pack is made again."""
    torch.manual_seed(10)
    lin, x = linear_module.Linear(16, 32), torch.randn(5, 16)
    lin.keep_packed = True
    with torch.no_grad():
        before = lin(x)
        lin.weight.mul_(-2)
        edited = lin(x)
        lin.weight = torch.nn.Parameter(torch.zeros(32, 16))
        replaced = lin(x)
    assert not torch.allclose(edited, before)
    assert_close(edited - lin.bias, -2 * (before - lin.bias), scale=before.abs().max() * 2)
    assert_close(replaced, lin.bias.expand(5, 32), scale=1.0)


def test_packed_context_nests_frees_and_stays_out_of_copies(monkeypatch):
    import copy
    import pickle
    model = random_model(seed=11)
    idx = torch.randint(0, 53, (1, 9), generator=torch.Generator().manual_seed(1))
    linears = [m for m in model.modules() if isinstance(m, linear_module.Linear)]
    with torch.no_grad():
        plain, _ = model(idx)
        with model.packed():
            with model.packed():
                inner, _ = model(idx)
            assert all(m.keep_packed for m in linears), "leaving the inner context must keep packing on"
            if linear_module._REORDER is not None:
                assert all(getattr(m, "_packs", None) for m in linears)
            twin = copy.deepcopy(model)
            pickle.loads(pickle.dumps(model))
            assert not any(hasattr(m, "_packs") for m in twin.modules())
        assert not any(m.keep_packed or hasattr(m, "_packs") for m in linears), "the outer context frees"
        monkeypatch.setattr(linear_module, "free_memory", lambda: 10**12)
        with model.packed(reserve=10**12 - 1000):  # the caller needs nearly all of it
            assert not any(m.keep_packed for m in linears)
        monkeypatch.setattr(linear_module, "free_memory", lambda: 1000)  # too little room for a copy
        with model.packed():
            starved, _ = model(idx)
            assert not any(m.keep_packed or hasattr(m, "_packs") for m in linears)
    for got in (inner, starved, twin(idx)[0].detach()):
        assert_close(got, plain, scale=plain.abs().max())


def test_sweeps_with_packed_weights_equal_the_loop():
    """Several chunks make the engine pack; an outer context keeps the packs for a second sweep."""
    model = random_model(seed=12)
    clean, corrupt = _pair(20, [1, 8])
    rc, rk = engines.record(model, clean, ["z"]), engines.record(model, corrupt, ["z"])
    loop = engines.sweep(model, corrupt, rk, rc["z"][:, 0], "z", 3, 4, False, engine="loop")
    one = engines.sweep(model, corrupt, rk, rc["z"][:, 0], "z", 3, 4, False, max_rows=40)
    with model.packed():
        engines.sweep(model, corrupt, rk, rc["z"][:, 0], "z", 3, 4, False)
        if linear_module._REORDER is not None:
            assert model.transformer.h[2].mlp.c_fc._packs, "the sweep did not use packed weights"
        two = engines.sweep(model, corrupt, rk, rc["z"][:, 0], "z", 3, 4, False)
    for got in (one, two):
        assert_close(got[..., :2], loop[..., :2], scale=loop[..., :2].abs().max())


# ----------------------------------------------------------------------------- compiled attention

HAS_CC = bool(os.environ.get("CC") or any(map(shutil.which, ("cc", "gcc", "clang"))))
needs_cc = pytest.mark.skipif(not HAS_CC or not ragged.enabled,
                              reason="no C compiler, or PATCH_RUN_ATTENTION=torch: the kernel is not built (torch ops run)")


def _ragged_case(n, nh, hs, groups, seed):
    """q, k, v (n, nh, R, hs) as strided views of one c_attn-like output, and the base run's prefix."""
    g = torch.Generator().manual_seed(seed)
    R, T = sum(S for _, _, S in groups), max(p + S for p, _, S in groups)
    qkv = torch.randn(n, R, 3, nh, hs, generator=g) * 2  # scores of a few units: a real softmax, not uniform
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    prefix = tuple(torch.randn(T, nh, hs, generator=g).transpose(0, 1) for _ in range(2))  # (nh, T, hs), strided
    return q, k, v, prefix


def _per_row(q, k, v, prefix, groups, rows):
    """The plain reference: for each query row (rows: indices into q's rows), softmax over exactly the
    keys it sees, in float64; (n, len(rows), nh, hs)."""
    q, k, v = (t.double() for t in (q, k, v))
    pk, pv = (t.double() for t in prefix)
    out = torch.empty(q.shape[0], len(rows), q.shape[1], q.shape[3], dtype=torch.float64)
    for j, r in enumerate(rows):
        p, start, _ = next(gr for gr in groups if gr[1] <= r < gr[1] + gr[2])
        keys = torch.cat([pk[None, :, :p].expand(len(q), -1, -1, -1), k[:, :, start:r + 1]], dim=2)
        vals = torch.cat([pv[None, :, :p].expand(len(q), -1, -1, -1), v[:, :, start:r + 1]], dim=2)
        w = torch.softmax(torch.einsum("nhd,nhkd->nhk", q[:, :, r], keys) / math.sqrt(q.shape[-1]), dim=-1)
        out[:, j] = torch.einsum("nhk,nhkd->nhd", w, vals)
    return out


@needs_cc
@pytest.mark.parametrize("hs", [8, 16, 20, 64, 72])
@pytest.mark.parametrize("last_only", [False, True])
def test_ragged_kernel_equals_per_row_softmax_and_torch_buckets(hs, last_only, monkeypatch):
    """Groups starting at position 0 (no base keys), short and long (up to 70 keys: several vectors of
    scores), head sizes with and without a scalar tail: the kernel's z equals a float64 per-row
    softmax and the torch buckets' z, and it writes every row."""
    assert ragged._kernel()[0] is not None, ragged.status()
    groups, start = [], 0
    for p, S in [(0, 70), (3, 67), (40, 30), (68, 2), (69, 1)]:
        groups.append((p, start, S))
        start += S
    n, nh = 3, 2
    q, k, v, prefix = _ragged_case(n, nh, hs, groups, seed=hs)
    last = torch.tensor([st + S - 1 for _, st, S in groups])
    rows = last.tolist() if last_only else list(range(start))  # the query rows, in z's order
    qq = q[:, :, last] if last_only else q
    z = torch.full((n, len(rows), nh, hs), float("nan"))
    assert ragged.attend(qq, k, v, prefix, ragged.table(groups), z, last_only)
    want = _per_row(q, k, v, prefix, groups, rows)
    assert_close(z, want, scale=want.abs().max(), what="kernel vs per-row softmax")
    # a damaged key (NaN) reaches every row that sees it, as in torch, and no other
    damaged = k.clone()
    damaged[1, 0, 75] = float("nan")  # group 1's 6th row (position 8): its rows from there see it, no other group
    bad = torch.full_like(z, float("nan"))
    assert ragged.attend(qq, damaged, v, prefix, ragged.table(groups), bad, last_only)
    want_bad = _per_row(q, damaged, v, prefix, groups, rows)
    assert want_bad.isnan().any() and not want_bad.isnan().all()
    assert_close(bad, want_bad, scale=want_bad.nan_to_num().abs().max(), what="kernel vs per-row softmax, a NaN key")
    # the torch buckets, as resume runs them without the kernel
    monkeypatch.setattr(ragged, "enabled", False)
    mix = resume._Groups(None, resume._Layout(groups, last, "cpu"), prefix)
    zt = torch.full_like(z, float("nan"))
    (mix.fill_last if last_only else mix.fill)(zt, qq, k, v)
    assert_close(z, zt, scale=zt.abs().max(), what="kernel vs torch buckets")


# the kernel built for this CPU and for x86-64's baseline, every product rounded before its sum
NATIVE, BASELINE = ["-O3", "-march=native", "-ffp-contract=off"], ["-O3", "-ffp-contract=off"]
WIDER = "avx" in (linear_module.cpu_flags() or ())  # this CPU's vectors are wider than the baseline's


def _build(flags, folder: Path, cc=None):
    """ragged.c built with these flags (and this compiler, else the cache's) into folder as the cache
    builds it, loaded as the kernel's entry point."""
    lib = folder / f"ragged-{len(list(folder.glob('*.so')))}.so"
    fd, why, _ = ragged._compile(cc or ragged.compiler(), flags, lib)
    assert fd is not None, why
    return ragged._entry(fd, lib)


def _assert_same_bits(*runs):
    """The builds give the same bits, with and without scalar tails, for all rows and last rows, NaN included."""
    groups, start = [], 0
    for p, S in [(0, 35), (3, 32), (20, 15), (33, 2), (34, 1)]:
        groups.append((p, start, S))
        start += S
    last = torch.tensor([st + S - 1 for _, st, S in groups])
    for hs in (16, 20, 64, 72):
        q, k, v, prefix = _ragged_case(2, 3, hs, groups, seed=hs)
        k[1, 2, 40] = float("nan")  # a damaged key: NaN where it is seen, in every build
        for last_only in (False, True):
            qq = q[:, :, last] if last_only else q
            outs = []
            for run in runs:
                z = torch.full((2, len(last) if last_only else start, 3, hs), 7.0)
                assert ragged._call(run, qq, k, v, prefix, ragged.table(groups), z, last_only) == 0
                outs.append(z)
            assert outs[0].isnan().any() and not outs[0].isnan().all()
            for z in outs[1:]:
                assert torch.equal(outs[0].isnan(), z.isnan())
                assert torch.equal(outs[0].nan_to_num(), z.nan_to_num()), (hs, last_only)


@needs_cc
@pytest.mark.skipif(not WIDER, reason="an x86 CPU with AVX: its native vectors are wider than the baseline's 16 bytes")
def test_ragged_kernel_gives_the_same_bits_at_every_vector_width(tmp_path):
    """The kernel sums 16 lanes in one order whatever the CPU's vector width (ragged.c): built for this
    CPU's widest vectors and for x86-64's baseline (SSE2, 4 floats), both with every product rounded
    before its sum (-ffp-contract=off: a fused multiply-add rounds once, so FMA or not may change a
    result; -mno-fma would not do, AVX-512 has FMA of its own), the two give the same bits."""
    _assert_same_bits(_build(NATIVE, tmp_path), _build(BASELINE, tmp_path))


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("clang")), reason="needs both gcc and clang")
def test_ragged_kernel_gives_the_same_bits_with_gcc_and_clang(tmp_path):
    """The kernel's one sum order holds in either compiler's build (each has its own lane shuffles):
    gcc's and clang's, for this CPU (and for x86-64's baseline where this CPU has AVX), with every
    product rounded before its sum, give the same bits."""
    flags = [NATIVE, BASELINE] if WIDER else [NATIVE]
    _assert_same_bits(*(_build(f, tmp_path, [cc]) for f in flags for cc in ("gcc", "clang")))


@needs_cc
@pytest.mark.parametrize("threads", [2, 3, 7])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("last_only", [False, True])
def test_ragged_kernel_splits_its_work_between_threads_without_gaps(threads, n, last_only):
    """The kernel's threads share (slab, group) items by their work (the suite otherwise runs one
    thread): with more threads than items of one slab, and groups of very different sizes (one empty),
    every row is written, and each to the bit as one thread writes it (a row's sums do not depend on
    which thread computes it)."""
    groups, start = [], 0
    for p, S in [(0, 40), (1, 1), (2, 0), (5, 12), (20, 3), (30, 25)]:
        groups.append((p, start, S))
        start += S
    q, k, v, prefix = _ragged_case(n, 3, 16, groups, seed=threads)
    last = [st + S - 1 for _, st, S in groups if S]
    table = ragged.table([g for g in groups if g[2]] if last_only else groups)
    qq = q[:, :, last] if last_only else q
    rows = len(last) if last_only else start
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.full((n, rows, 3, 16), float("nan"))
        assert ragged.attend(qq, k, v, prefix, table, one, last_only)
        torch.set_num_threads(threads)
        many = torch.full_like(one, float("nan"))
        assert ragged.attend(qq, k, v, prefix, table, many, last_only)
    finally:
        torch.set_num_threads(before)
    assert not many.isnan().any(), "a row was left unwritten"
    assert torch.equal(many, one)
    want = _per_row(q, k, v, prefix, [g for g in groups if g[2]], last if last_only else list(range(start)))
    assert_close(many, want, scale=want.abs().max(), what="kernel with several threads vs per-row softmax")


@needs_cc
@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "attn_out", "mlp_out", "q", "k", "v", "z"])
def test_sweeps_with_the_kernel_equal_the_loop(site, monkeypatch):
    """Every site's fast sweep runs its attention in the kernel (each call is counted) and equals the
    loop oracle; a head size of 16 gives the kernel whole vectors (the suite's small models have 8)."""
    calls = []
    real = ragged.attend
    monkeypatch.setattr(ragged, "attend", lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    model = random_model(seed=13, n_embd=32, n_head=2)
    clean, corrupt = _pair(24, [1, 9, 17])
    rc, rk = engines.record(model, clean, [site]), engines.record(model, corrupt, [site])
    fast = engines.sweep(model, corrupt, rk, rc[site][:, 0], site, 3, 4, True, engine="fast")
    loop = engines.sweep(model, corrupt, rk, rc[site][:, 0], site, 3, 4, True, engine="loop")
    assert calls and all(calls), "the sweep did not use the kernel"
    assert_close(fast[..., :2], loop[..., :2], scale=loop[..., :2].abs().max())


@needs_cc
@pytest.mark.parametrize("keys", [3, 16, 20])
def test_ragged_kernel_rows_whose_scores_are_all_minus_infinity_give_nan(keys):
    """As torch's softmax does, whether or not the row's keys fill whole vectors (the kernel pads
    the rest of the last one)."""
    groups = [(0, 0, keys)]
    q, k, v, prefix = _ragged_case(1, 1, 16, groups, seed=3)
    q, k = torch.full_like(q, float("inf")), -k.abs() - 1  # every score -inf
    z = torch.zeros(1, keys, 1, 16)
    assert ragged.attend(q, k, v, prefix, ragged.table(groups), z)
    assert z.isnan().all()
    assert _per_row(q, k, v, prefix, groups, list(range(keys))).isnan().all()


def test_ragged_kernel_declines_what_it_cannot_compute():
    """Half precision (and a non-contiguous head dimension) go to torch ops: attend says False and
    leaves z alone."""
    groups = [(0, 0, 3), (1, 3, 2)]
    q, k, v, prefix = _ragged_case(1, 2, 16, groups, seed=1)
    z = torch.zeros(1, 5, 2, 16)
    assert not ragged.attend(q.half(), k.half(), v.half(), tuple(t.half() for t in prefix), ragged.table(groups),
                             z.half())
    across = torch.randn(1, 2, 16, 5).transpose(-1, -2)  # (1, 2, 5, 16), its head dimension strided
    assert not ragged.attend(across, k, v, prefix, ragged.table(groups), z)
    assert z.abs().max() == 0


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """ragged's build state reset, its cache in tmp_path; the real kernel is back afterwards."""
    monkeypatch.setenv("PATCH_RUN_CACHE", str(tmp_path))
    monkeypatch.setattr(ragged, "enabled", True)
    ragged._kernel.cache_clear()
    yield tmp_path
    ragged._kernel.cache_clear()


def test_without_a_compiler_sweeps_use_torch_ops(fresh_kernel, monkeypatch):
    """No compiler at all, or one that fails: the status says so in a line, attend declines, a failed
    build is remembered in the cache (not retried by every process), and sweeps still equal the loop."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(ragged.shutil, "which", lambda name: None)
    assert ragged.status() == "torch ops (no C compiler found: set CC to one)"
    ragged._kernel.cache_clear()
    broken = fresh_kernel / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert ragged.status().startswith("torch ops (no usable C kernel: ")
    assert "this compiler is broken" in ragged.status()
    assert len(list(fresh_kernel.glob("*.failed"))) == len(ragged.FLAGS)
    groups = [(0, 0, 2)]
    q, k, v, prefix = _ragged_case(1, 1, 16, groups, seed=2)
    assert not ragged.attend(q, k, v, prefix, ragged.table(groups), torch.empty(1, 2, 1, 16))
    model = random_model(seed=14, n_embd=32, n_head=2)
    clean, corrupt = _pair(12, [2, 7])
    rc, rk = engines.record(model, clean), engines.record(model, corrupt)
    fast = engines.sweep(model, corrupt, rk, rc.resid[:, 0], "resid_post", 3, 4, False)
    loop = engines.sweep(model, corrupt, rk, rc.resid[:, 0], "resid_post", 3, 4, False, engine="loop")
    assert_close(fast[..., :2], loop[..., :2], scale=loop[..., :2].abs().max())


@needs_cc
def test_kernel_is_built_once_and_loaded_from_the_cache(fresh_kernel):
    """The first load builds into the cache (one file for this source, compiler, flags and CPU); a
    second process loads that file without compiling."""
    assert ragged.status().startswith("C kernel ("), ragged.status()
    built = list(fresh_kernel.glob("ragged-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    code = ("import torch\nfrom mingpt import ragged\n"
            "def again(*args): raise SystemExit('compiled again')\n"
            "ragged._compile = again\nprint(ragged.status())\n")
    env = {**os.environ, "PATCH_RUN_CACHE": str(fresh_kernel), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("C kernel ("), out.stdout + out.stderr
    assert built[0].stat().st_mtime_ns == stamp


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
        "from patching.core import painter\n"
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
    from patching.main import draws_one_heatmap
    assert draws_one_heatmap(argv) is starts


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
    from patching.analyses.patch.report import heatmap_spec
    from patching.api import Pair, load, run
    result = run("patch", load("demo-names"), Pair("Michelle Jones was a top-notch student. Michelle",
                                                   "Michelle Smith was a top-notch student. Michelle", "Jones", "Smith"))
    painter.draw_heatmap(heatmap_spec(result), str(tmp_path / "here.png"))
    assert (tmp_path / "here.png").read_bytes() == png

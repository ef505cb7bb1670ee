"""Tests of the sweep engines: the fast engine (forward_patched, chunked) against the oracle loop_sweep.

Covers: random models of several shapes with O(1) activations, prompt lengths 1..64 with clean and
corrupt differing at one or several positions (first and last included), every metric; chunking
(tiny and huge max_rows) and plan_chunks' cover/bound properties; the skip of identical columns;
forward_patched's full-vocab logits; the API on GPT-2 small's shapes; dtype/device handling.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, tol
from mingpt import linear
from mingpt.model import GPT, GPTConfig, Patch
from patching.core import engines
from patching.core.metrics import METRICS, metric_values, needs_lse, readout
from patching.api import ModelSpec, Pair, PatchingError, load, run

# name: (GPTConfig kwargs, seed)
CONFIGS = {
    "1L1H8": (dict(n_layer=1, n_head=1, n_embd=8, vocab_size=37, block_size=64), 0),
    "3L2H16": (dict(n_layer=3, n_head=2, n_embd=16, vocab_size=53, block_size=80), 1),
    "4L4H32i": (dict(n_layer=4, n_head=4, n_embd=32, vocab_size=97, block_size=64, n_inner=48), 2),
}
_MODELS: dict[str, GPT] = {}


def random_model(name: str, std: float = 0.3) -> GPT:
    """A random GPT re-initialised with a large std (LayerNorm gains around 1) so values are O(1)."""
    if name not in _MODELS:
        kwargs, seed = CONFIGS[name]
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**kwargs))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if ".ln_" in pname or pname.startswith("transformer.ln_f"):
                    p.normal_(1.0 if pname.endswith("weight") else 0.0, 0.1)
                else:
                    p.normal_(0.0, std)
        _MODELS[name] = model.eval()
    return _MODELS[name]


def prompt_pair(vocab: int, T: int, differ: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T) clean and corrupt ids that differ exactly at the positions in `differ`."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (1, T), generator=g)
    corrupt = clean.clone()
    for p in differ:
        corrupt[0, p] = (clean[0, p] + 1 + torch.randint(0, vocab - 1, (1,), generator=g)) % vocab
    assert [p for p in range(T) if clean[0, p] != corrupt[0, p]] == sorted(set(differ))
    return clean, corrupt


def differ_patterns(T: int) -> list[tuple[str, list[int]]]:
    if T == 1:
        return [("first", [0])]
    pats = [("first", [0]), ("last", [T - 1])]
    if T > 2:
        pats += [("several", sorted({1, T // 2, T - 1}))]
    if 2 < T < 64:  # the T=64 oracle sweeps are the slow ones: three patterns there are enough
        pats += [("first+mid", [0, T // 3 + 1])]
    return pats


CASES = [(name, T, pname, differ)
         for name in CONFIGS for T in (1, 2, 11, 64) for pname, differ in differ_patterns(T)]


def target_foil(vocab: int, seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    t = rng.randrange(vocab)
    f = (t + 1 + rng.randrange(vocab - 1)) % vocab
    return t, f


def sweep_both(model, clean_ids, corrupt_ids, t, f, lse, max_rows=8192):
    rec_clean, rec_corrupt = engines.record(model, clean_ids), engines.record(model, corrupt_ids)
    fast = engines.fast_sweep(model, rec_corrupt, rec_clean, t, f, lse, max_rows=max_rows)
    loop = engines.loop_sweep(model, corrupt_ids, rec_clean, t, f, lse)
    return rec_clean, rec_corrupt, fast, loop


def assert_readouts_equal(fast: torch.Tensor, loop: torch.Tensor, lse: bool):
    """fast (lse as given) against loop; a loop run with lse=True also checks a fast run without it
    (the target/foil columns do not depend on lse), which saves a second oracle sweep."""
    assert fast.shape == loop.shape and fast.dtype == loop.dtype == torch.float32
    assert_close(fast[..., :2], loop[..., :2], what="target/foil logits")
    if lse:
        assert torch.isfinite(fast[..., 2]).all() and torch.isfinite(loop[..., 2]).all()
        assert_close(fast[..., 2], loop[..., 2], what="log-sum-exp")
    else:  # not asked for: NaN, never a stale or made-up number
        assert torch.isnan(fast[..., 2]).all()


def metric_scale(metric: str, r: torch.Tensor, r_clean: torch.Tensor, r_corrupt: torch.Tensor) -> float:
    """The scale of a metric's float32 rounding (conftest.tol), from the readouts r (..., 3) it is computed from."""
    logits = float(r.abs().max())
    if metric == "prob-diff":  # dp = p dz
        return logits * float(torch.exp(r[..., :2] - r[..., 2:]).max())
    if metric == "recovery":  # divided by the (clean - corrupt) logit difference
        return logits / abs(float((r_clean[1] - r_clean[0]) - (r_corrupt[1] - r_corrupt[0])))
    return logits


# ----------------------------------------------------------------------------- fast == loop


@pytest.mark.parametrize("name,T,pname,differ", CASES, ids=[f"{c[0]}-T{c[1]}-{c[2]}" for c in CASES])
def test_fast_matches_loop_all_metrics(name, T, pname, differ):
    model = random_model(name)
    V, L = model.config.vocab_size, model.config.n_layer
    clean_ids, corrupt_ids = prompt_pair(V, T, differ, seed=T * 100 + len(differ) + differ[0])
    t, f = target_foil(V, seed=T)
    rec_clean, rec_corrupt = engines.record(model, clean_ids), engines.record(model, corrupt_ids)
    loop = engines.loop_sweep(model, corrupt_ids, rec_clean, t, f, True)
    for lse in (False, True):
        fast = engines.fast_sweep(model, rec_corrupt, rec_clean, t, f, lse)
        assert fast.shape == (L, T, 3)
        assert_readouts_equal(fast, loop, lse)
        # logits of O(1): the tolerance, relative to them, is far below what any patch moves
        assert fast[..., :2].abs().max() > 0.1
        r_clean = readout(rec_clean.last_logits[0], t, f, True)
        r_corrupt = readout(rec_corrupt.last_logits[0], t, f, True)
        for metric in METRICS:
            if needs_lse(metric) and not lse:
                continue
            mf = metric_values(metric, fast, r_clean, r_corrupt)
            ml = metric_values(metric, loop, r_clean, r_corrupt)
            assert mf.shape == (L, T) and torch.isfinite(mf).all(), metric
            assert_close(mf, ml, scale=metric_scale(metric, loop, r_clean, r_corrupt), what=metric)
        # patching the last layer at the last position gives the clean run's readout (other kernels)
        r_last = readout(rec_clean.last_logits[0], t, f, lse)
        assert_close(fast[L - 1, T - 1, :2], r_last[:2], scale=loop[..., :2].abs().max(), what="last patch")


def test_prob_diff_is_a_probability_difference():
    model = random_model("3L2H16")
    clean_ids, corrupt_ids = prompt_pair(model.config.vocab_size, 11, [0, 5], seed=7)
    t, f = target_foil(model.config.vocab_size, 3)
    rec_clean, rec_corrupt, fast, loop = sweep_both(model, clean_ids, corrupt_ids, t, f, True)
    logits = torch.stack([model(corrupt_ids, patch=Patch(l, p, rec_clean.resid[l, 0, p]), last_only=True)[0][0, -1]
                          for l in range(3) for p in range(11)]).view(3, 11, -1)
    probs = logits.softmax(-1)
    want = probs[..., f] - probs[..., t]
    got = metric_values("prob-diff", fast, fast[0, 0], fast[0, 0])
    assert_close(got, want, scale=probs[..., [t, f]].max() * logits.abs().max(), what="prob-diff")  # dp = p dz


def test_recovery_is_signed_whichever_run_is_larger():
    """recovery = (x - corrupt) / (clean - corrupt) of the logit difference: clean -> 1, corrupt -> 0,
    halfway -> 0.5, also when clean < corrupt (a trained model: the clean prompt favours the target),
    where a random model rarely puts them."""
    for clean_ld, corrupt_ld in ((-18.5, 20.25), (3.5, -1.25)):
        r_clean = torch.tensor([4.0, 4.0 + clean_ld, math.nan])  # target logit, foil logit, log-sum-exp
        r_corrupt = torch.tensor([-2.0, -2.0 + corrupt_ld, math.nan])
        d = clean_ld - corrupt_ld
        lds = [clean_ld, corrupt_ld, (clean_ld + corrupt_ld) / 2, clean_ld + d, corrupt_ld - d]
        r = torch.tensor([[1.0, 1.0 + ld, math.nan] for ld in lds])  # patched readouts with these logit diffs
        scale = float(torch.cat([r, r_clean[None], r_corrupt[None]])[:, :2].abs().max()) / abs(d)
        got = metric_values("recovery", r, r_clean, r_corrupt)
        assert_close(got, [1.0, 0.0, 0.5, 2.0, -1.0], scale=scale, what=f"clean {clean_ld}, corrupt {corrupt_ld}")
        assert_close(metric_values("recovery", r_clean, r_clean, r_corrupt), 1.0, scale=scale)
        assert_close(metric_values("recovery", r_corrupt, r_clean, r_corrupt), 0.0, scale=scale)


# ----------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("name,T,differ", [("3L2H16", 11, [0, 4]), ("4L4H32i", 29, [0, 13, 28]),
                                           ("1L1H8", 64, [2]), ("4L4H32i", 2, [1])])
def test_chunk_sizes_agree(name, T, differ):
    model = random_model(name)
    clean_ids, corrupt_ids = prompt_pair(model.config.vocab_size, T, differ, seed=11)
    t, f = target_foil(model.config.vocab_size, 5)
    rec_clean, rec_corrupt = engines.record(model, clean_ids), engines.record(model, corrupt_ids)
    loop = engines.loop_sweep(model, corrupt_ids, rec_clean, t, f, True)
    n_patch = model.config.n_layer * (T - min(differ))
    for lse in (False, True):
        huge = engines.fast_sweep(model, rec_corrupt, rec_clean, t, f, lse, max_rows=10**9)
        assert_readouts_equal(huge, loop, lse)
        for max_rows in (1, 7, 50):
            calls = []
            got = engines.fast_sweep(model, rec_corrupt, rec_clean, t, f, lse, max_rows=max_rows,
                                     progress=lambda d, n: calls.append((d, n)))
            # chunk shapes change BLAS blocking: the same numbers up to rounding
            assert_close(got, huge, what=f"max_rows={max_rows}")
            assert calls and calls[-1] == (n_patch, n_patch)
            assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


def check_plan(n_layer, T, positions, max_rows, max_patches):
    chunks = engines.plan_chunks(n_layer, T, positions, max_rows, max_patches)
    seen = []
    for layers, pos in chunks:
        assert layers and pos
        assert layers == sorted(set(layers)) and all(0 <= l < n_layer for l in layers)
        assert len(set(pos)) == len(pos) and all(p in positions for p in pos)
        rows = len(layers) * sum(T - p for p in pos)
        if len(pos) > 1:
            assert rows <= max_rows, (n_layer, T, positions, max_rows, max_patches, layers, pos)
        elif len(layers) > 1:  # one position, several layers: only when they fit
            assert rows <= max_rows, (n_layer, T, positions, max_rows, max_patches, layers, pos)
        if max_patches is not None:
            assert len(layers) * len(pos) <= max(max_patches, 1), (n_layer, T, positions, max_rows, max_patches)
        seen += [(l, p) for l in layers for p in pos]
    want = [(l, p) for p in positions for l in range(n_layer)]
    assert sorted(seen) == sorted(want), (n_layer, T, positions, max_rows, max_patches)
    return chunks


def test_plan_chunks_examples():
    assert engines.plan_chunks(2, 3, [0, 1, 2], 10**6) == [([0, 1], [0, 1, 2])]
    assert engines.plan_chunks(2, 3, [], 10) == []
    # max_rows 1: one patch per chunk
    assert engines.plan_chunks(2, 2, [0, 1], 1) == [([0], [0]), ([1], [0]), ([0], [1]), ([1], [1])]
    # rows (T - p) * n_layer: 3*2=6 fits in 6, then 2*2 + 1*2 = 6
    assert engines.plan_chunks(2, 3, [0, 1, 2], 6) == [([0, 1], [0]), ([0, 1], [1, 2])]
    check_plan(12, 11, list(range(1, 11)), 8192, None)


def test_plan_chunks_properties():
    rng = random.Random(1234)
    for _ in range(800):
        n_layer = rng.randint(1, 14)
        T = rng.randint(1, 80)
        positions = sorted(rng.sample(range(T), rng.randint(0, T)))
        max_rows = rng.choice([1, 2, 3, 7, 50, rng.randint(1, 2 * n_layer * T), 10**9])
        max_patches = rng.choice([None, None, 1, 2, 5, rng.randint(1, n_layer * T + 1), 512])
        check_plan(n_layer, T, positions, max_rows, max_patches)


# ----------------------------------------------------------------------------- skipped columns


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lse", [False, True])
def test_identical_prompts_give_corrupt_value_everywhere(name, lse):
    model = random_model(name)
    ids, _ = prompt_pair(model.config.vocab_size, 11, [], seed=3)
    t, f = target_foil(model.config.vocab_size, 9)
    rec_clean, rec_corrupt, fast, loop = sweep_both(model, ids, ids.clone(), t, f, lse)
    corrupt_r = readout(rec_corrupt.last_logits[0], t, f, lse)
    want = corrupt_r.expand_as(fast)
    assert torch.equal(fast[..., :2], want[..., :2])  # no-op patches are copies of the corrupt readout: exact
    assert_close(loop, want, what="loop vs corrupt run")
    assert_readouts_equal(fast, loop, lse)
    assert torch.isnan(loop[..., 2]).all() != lse  # the oracle, too, fills lse only when asked


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("k", [0, 1, 5, 10])
def test_columns_before_first_difference_are_corrupt_value(name, k):
    model = random_model(name)
    T = 11
    clean_ids, corrupt_ids = prompt_pair(model.config.vocab_size, T, [k], seed=20 + k)
    t, f = target_foil(model.config.vocab_size, k)
    for lse in (False, True):
        rec_clean, rec_corrupt, fast, loop = sweep_both(model, clean_ids, corrupt_ids, t, f, lse)
        corrupt_r = readout(rec_corrupt.last_logits[0], t, f, lse)
        # skipped columns are copies of the corrupt readout: exact
        assert torch.equal(fast[:, :k, :2], corrupt_r[:2].expand(model.config.n_layer, k, 2))
        if lse:
            assert torch.equal(fast[:, :k, 2], corrupt_r[2].expand(model.config.n_layer, k))
        assert_close(loop[:, :k], fast[:, :k], scale=fast.nan_to_num().abs().max(), what="skipped columns")
        # column k onwards really is patched: not all equal to the corrupt value
        assert not torch.allclose(fast[:, k:, :2], corrupt_r[:2].expand(model.config.n_layer, T - k, 2))
        assert_readouts_equal(fast, loop, lse)


def test_only_columns_identical_at_every_layer_are_skipped(tiny_ckpt):
    """Block 0 with its attention output zeroed copies nothing across positions: for prompts differing at
    position 1, block 0's outputs at positions 2.. are identical in both runs, while later blocks carry
    the difference there. Those columns must still be patched: only equality at every layer is a no-op."""
    model = GPT.from_pretrained(str(tiny_ckpt))
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.zero_()
        model.transformer.h[0].attn.c_proj.bias.zero_()
    T, V = 9, model.config.vocab_size
    clean_ids, corrupt_ids = prompt_pair(V, T, [1], seed=13)
    t, f = target_foil(V, 13)
    rec_clean, rec_corrupt = engines.record(model, clean_ids), engines.record(model, corrupt_ids)
    assert torch.equal(rec_clean.resid[0, 0, 2:], rec_corrupt.resid[0, 0, 2:])  # block 0: per position
    assert not torch.equal(rec_clean.resid[1:, 0, 2:], rec_corrupt.resid[1:, 0, 2:])  # later: mixed
    for lse in (False, True):
        fast = engines.fast_sweep(model, rec_corrupt, rec_clean, t, f, lse)
        loop = engines.loop_sweep(model, corrupt_ids, rec_clean, t, f, lse)
        assert_readouts_equal(fast, loop, lse)
    # the cells a wrong skip would fill with the corrupt value really move away from it
    corrupt_r = readout(rec_corrupt.last_logits[0], t, f, True)
    moved = (loop[1:, 2:, :2] - corrupt_r[:2]).abs().max()
    assert moved > 100 * tol(loop[..., :2].abs().max()), moved


# ----------------------------------------------------------------------------- forward_patched, full vocab


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T", [1, 2, 11])
def test_forward_patched_full_logits_match_loop(name, T):
    model = random_model(name)
    L, V = model.config.n_layer, model.config.vocab_size
    clean_ids, corrupt_ids = prompt_pair(V, T, [0, T - 1], seed=40 + T)
    rec_clean, rec_corrupt = engines.record(model, clean_ids), engines.record(model, corrupt_ids)
    layers, positions = list(range(L)), list(range(T))
    values = rec_clean.resid[:, 0][:, positions]  # (L, T, C)
    full = model.forward_patched(rec_corrupt, layers, positions, values, None)
    assert full.shape == (L, T, V)
    with torch.no_grad():
        want = torch.stack([model(corrupt_ids, patch=Patch(l, p, values[l, p]), last_only=True)[0][0, -1]
                            for l in layers for p in positions]).view(L, T, V)
    assert_close(full, want, what="full logits")
    # selected columns are the same numbers as the full unembedding's (another matmul shape)
    ids = torch.tensor([3, 0, V - 1])
    part = model.forward_patched(rec_corrupt, layers, positions, values, ids)
    assert_close(part, full[..., ids], scale=full.abs().max(), what="selected columns")


def test_forward_patched_unsorted_layers_and_positions():
    model = random_model("4L4H32i")
    T, C, V = 9, model.config.n_embd, model.config.vocab_size
    _, corrupt_ids = prompt_pair(V, T, [], seed=5)
    rec = engines.record(model, corrupt_ids)
    layers, positions = [2, 0, 3, 0], [6, 1, 8, 3]
    values = torch.randn(len(layers), len(positions), C, generator=torch.Generator().manual_seed(0))
    got = model.forward_patched(rec, layers, positions, values, None)
    with torch.no_grad():
        for i, l in enumerate(layers):
            for j, p in enumerate(positions):
                want = model(corrupt_ids, patch=Patch(l, p, values[i, j]), last_only=True)[0][0, -1]
                assert_close(got[i, j], want, what=f"layer {l} pos {p}")


# ----------------------------------------------------------------------------- through the API


MICHELLE = dict(clean="Michelle Jones was a top-notch student. Michelle",
                corrupt="Michelle Smith was a top-notch student. Michelle", target="Jones", foil="Smith")


def test_api_fast_equals_loop_on_small(small_ckpt):
    ctx = load(ModelSpec(model=str(small_ckpt), device="cpu"))
    assert ctx.config.n_layer == 12 and ctx.config.n_embd == 768
    results = {e: run("patch", ctx, Pair(**MICHELLE), engine=e) for e in ("fast", "loop")}
    fast, loop = results["fast"], results["loop"]
    T = len(fast.prepared.clean_ids)
    assert fast.matrix.shape == loop.matrix.shape == (12, T)
    assert fast.prepared.differing == [1]
    assert np.isfinite(fast.matrix).all()
    # logit differences carry the rounding of the logits they are read from
    scale = max(abs(x) for s in (fast.clean, fast.corrupt) for x in (s.target_logit, s.foil_logit, s.topk[0].logit))
    assert_close(fast.matrix, loop.matrix, scale=scale, what="fast vs loop")
    # column 0 is before the differing token: exactly the corrupt run's value (a copy)
    assert (fast.matrix[:, 0] == fast.corrupt.value).all()
    assert_close(fast.matrix[-1, -1], fast.clean.value, scale=scale, what="last patch")
    assert fast.clean.value == loop.clean.value and fast.corrupt.value == loop.corrupt.value  # the same recording code


def test_api_takes_bf16_on_cpu_only_with_native_bf16(tiny_ckpt, monkeypatch):
    import patching.core.context as context
    with pytest.raises(PatchingError, match="float16 is for GPUs"):
        load(ModelSpec(model=str(tiny_ckpt), device="cpu", dtype="float16"))
    monkeypatch.setattr(context, "cpu_bf16", lambda: None)
    with pytest.raises(PatchingError, match="AMX or AVX512-BF16"):
        load(ModelSpec(model=str(tiny_ckpt), device="cpu", dtype="bfloat16"))
    monkeypatch.setattr(context, "cpu_bf16", lambda: "AMX")
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu", dtype="bfloat16"))
    assert ctx.model.transformer.wte.weight.dtype == torch.bfloat16


NATIVE_BF16 = linear.cpu_bf16()


@pytest.mark.skipif(NATIVE_BF16 is None, reason="this CPU has no native bfloat16 matmul (AMX or AVX512-BF16)")
def test_bf16_on_cpu_onednn_equals_f_linear_and_fast_matches_the_float32_loop():
    # the oneDNN path (fused GELU, packed weights) computes what F.linear does in bfloat16
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((37, 64), (96, 64), (96,)))
    with torch.no_grad():
        assert linear.onednn(x, w)
        ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
        got = linear.dense(x, w, b, "gelu_new").float()
    assert (got - ref).abs().max() <= 2 ** -6 * ref.abs().max()  # bfloat16 keeps 8 bits
    cpu = random_model("4L4H32i")
    V, T = cpu.config.vocab_size, 11
    clean_ids, corrupt_ids = prompt_pair(V, T, [0, 4, T - 1], seed=78)
    t, f = target_foil(V, 78)
    loop = engines.loop_sweep(cpu, corrupt_ids, engines.record(cpu, clean_ids), t, f, False)
    half = GPT(cpu.config)
    half.load_state_dict(cpu.state_dict())
    half = half.to(torch.bfloat16).eval()
    with half.packed():
        fast = engines.fast_sweep(half, engines.record(half, corrupt_ids), engines.record(half, clean_ids), t, f, False,
                                  max_rows=50)
    assert fast.dtype == torch.float32
    assert (fast[..., :2] - loop[..., :2]).abs().max() <= 0.1 * loop[..., :2].abs().max()


# ----------------------------------------------------------------------------- dtype and device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("name", ["3L2H16", "4L4H32i"])
def test_fast_on_cuda_matches_cpu_loop(name, dtype, rtol):
    cpu = random_model(name)
    V, T = cpu.config.vocab_size, 11
    clean_ids, corrupt_ids = prompt_pair(V, T, [0, 4, T - 1], seed=77)
    t, f = target_foil(V, 77)
    for lse in (False, True):
        rec_clean = engines.record(cpu, clean_ids)
        loop = engines.loop_sweep(cpu, corrupt_ids, rec_clean, t, f, lse)
        gpu = GPT(cpu.config)
        gpu.load_state_dict(cpu.state_dict())
        gpu = gpu.to(device="cuda", dtype=dtype).eval()
        g_clean, g_corrupt = engines.record(gpu, clean_ids.cuda()), engines.record(gpu, corrupt_ids.cuda())
        assert g_clean.resid.dtype == dtype
        fast = engines.fast_sweep(gpu, g_corrupt, g_clean, t, f, lse, max_rows=50)
        assert fast.device.type == "cpu" and fast.dtype == torch.float32
        scale = loop[..., :2].abs().max()
        assert (fast[..., :2] - loop[..., :2]).abs().max() <= rtol * scale
        if lse:
            assert (fast[..., 2] - loop[..., 2]).abs().max() <= rtol * loop[..., 2].abs().max()
        else:
            assert torch.isnan(fast[..., 2]).all()

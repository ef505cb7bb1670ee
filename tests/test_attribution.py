"""Attribution patching against independent references.

- finite differences: every cell's estimate is the directional derivative of the metric along
  (source - base), taken here by central differences of plain patched forwards in float64;
- exactness where the model is linear: with its LayerNorms and MLP activation replaced by identities
  (test-side surgery, mingpt is unchanged), everything after a last-block site is linear, so the
  estimate equals the exact sweep there, and with the QK fix so do q and k (the pattern is exact);
- the QK fix on a normal model: its estimate is the finite difference along the exactly patched run's
  pattern change;
- the check's statistics against hand-computed values; the CLI's files and bad input.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import large_init, saved_bytes
from mingpt.model import GPT, GPTConfig
from mingpt.sites import HEAD_SITES, SITES, Patch, Recording
from patching.analyses.patch import attribution
from patching.core import engines
from patching.core.metrics import METRICS, readout
from patching.cli import main

T, TARGET, FOIL = 7, 3, 5


def random_model(n_layer=2, n_head=2, n_embd=16, seed=0, linear=False) -> GPT:
    """A float64 GPT with O(1) activations; linear=True swaps LayerNorms and GELU for identities."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=41, block_size=32)).eval()
    large_init(model)
    if linear:
        for block in model.transformer.h:
            block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
            block.mlp.act = lambda x: x
        model.transformer.ln_f = nn.Identity()
    return model.double()


def ids_pair(seed=1, differ=(2,)):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 41, (1, T), generator=g)
    corrupt = clean.clone()
    for p in differ:
        corrupt[0, p] = (clean[0, p] + 7) % 41
    return clean, corrupt


def metric_of(metric: str, logits: torch.Tensor, src: torch.Tensor, base: torch.Tensor) -> float:
    """The metric from last-position logits, written out here (src/base: the unpatched runs' logits)."""
    ld = lambda x: float(x[FOIL] - x[TARGET])  # noqa: E731
    if metric == "logit-diff":
        return ld(logits)
    if metric == "target-logit":
        return float(logits[TARGET])
    if metric == "prob-diff":
        p = torch.softmax(logits, -1)
        return float(p[FOIL] - p[TARGET])
    return (ld(logits) - ld(base)) / (ld(src) - ld(base))  # recovery


def runs(model, site, direction="denoise", seed=1):
    clean, corrupt = ids_pair(seed)
    sites = [site] + attribution.needed_sites(site, True)
    rc, rx = engines.record(model, clean, sites), engines.record(model, corrupt, sites)
    return (corrupt, rx, rc) if direction == "denoise" else (clean, rc, rx)


def estimate(model, site, metric="logit-diff", direction="denoise", every=False, qk_fix=False):
    base_ids, base, src = runs(model, site, direction)
    r = lambda rec: readout(rec.last_logits[0], TARGET, FOIL, True)  # noqa: E731
    est = attribution.estimate(model, base_ids, base, src[site][:, 0], site, metric, TARGET, FOIL, r(src), r(base),
                               every, qk_fix)
    return est, base_ids, base, src


def cells_of(site, shape):
    """(layer, head, position) of every cell in engines.cells' order; head/position None where absent."""
    if SITES[site] == "btc":
        return [((l, None, p), (l, p)) for l in range(shape[0]) for p in range(shape[1])]
    if len(shape) == 2:
        return [((l, h, None), (l, h)) for l in range(shape[0]) for h in range(shape[1])]
    return [((l, h, p), (l, h, p)) for l in range(shape[0]) for h in range(shape[1]) for p in range(shape[2])]


def value_at(rec_value, h, p):
    v = rec_value if h is None else rec_value[h]
    return v if p is None else v[p]


def finite_difference(model, site, base_ids, base, src, metric, cell, eps=1e-4) -> float:
    """(m(base + eps d) - m(base - eps d)) / 2 eps along d = source - base at one cell."""
    l, h, p = cell
    b = value_at(base[site][l, 0], h, p)
    d = value_at(src[site][l, 0], h, p) - b
    m = []
    for s in (eps, -eps):
        with torch.no_grad():
            logits, _ = model(base_ids, patch=Patch(l, p, b + s * d, site=site, head=h), last_only=True)
        m.append(metric_of(metric, logits[0, -1], src.last_logits[0], base.last_logits[0]))
    return (m[0] - m[1]) / (2 * eps)


def check_fd(model, site, metric="logit-diff", direction="denoise", every=False):
    est, base_ids, base, src = estimate(model, site, metric, direction, every)
    assert est.dtype == torch.float64 and est.shape == engines.cells(site, src[site][:, 0], every)[1]
    ref = torch.zeros_like(est)
    for cell, idx in cells_of(site, est.shape):
        ref[idx] = finite_difference(model, site, base_ids, base, src, metric, cell)
    scale = float(ref.abs().max())
    assert scale > 1e-3, "the patches must move the metric for the test to mean anything"
    assert float((est - ref).abs().max()) <= 1e-5 * scale, (site, metric, float((est - ref).abs().max()), scale)


# ----------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize("site", list(SITES))
def test_estimate_equals_finite_differences_every_site(site):
    check_fd(random_model(), site)


@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("site", ["resid_mid", "z"])
def test_estimate_equals_finite_differences_every_metric(metric, site):
    check_fd(random_model(), site, metric)


@pytest.mark.parametrize("site", ["resid_pre", "v", "pattern"])
def test_estimate_noise_direction_and_all_positions(site):
    model = random_model(n_layer=3, seed=2)
    check_fd(model, site, "prob-diff", "noise")
    if site in HEAD_SITES:
        check_fd(model, site, "logit-diff", "denoise", every=True)


# ----------------------------------------------------------------------------- exact where linear


def exact_values(model, site, direction="denoise", every=False):
    base_ids, base, src = runs(model, site, direction)
    got = engines.sweep(model, base_ids, base, src[site][:, 0], site, TARGET, FOIL, False, every)
    return (got[..., 1] - got[..., 0]).double(), base


LINEAR_CASES = [(site, n) for site in ("z", "v", "pattern", "attn_out", "resid_mid", "mlp_out", "resid_post", "q", "k")
                for n in (1, 2) if (site, n) != ("q", 1)]  # one block: the last query is the same in both runs


@pytest.mark.parametrize("site,n_layer", LINEAR_CASES)
def test_estimate_is_exact_after_the_last_softmax_of_a_linear_model(site, n_layer):
    """Identity LayerNorms and activation: after the last block's attention pattern the map to the
    logit difference is linear, so attribution (with the QK fix for q and k) is the exact patch."""
    model = random_model(n_layer=n_layer, seed=3, linear=True)
    for direction in ("denoise", "noise"):
        for every in ([False, True] if site in HEAD_SITES else [False]):
            est, base_ids, base, src = estimate(model, site, direction=direction, every=every, qk_fix=True)
            exact, _ = exact_values(model, site, direction, every)
            ld = float(base.last_logits[0, FOIL] - base.last_logits[0, TARGET])
            last = slice(n_layer - 1, n_layer)  # the last block: nothing nonlinear after its pattern
            effect = exact[last] - ld
            scale = float(base.last_logits.abs().max())
            assert float(effect.abs().max()) > 1e-3 * scale  # the patches do something
            err = float((est[last] - effect).abs().max())
            assert err <= 1e-5 * scale, (site, direction, every, err, scale)  # float32 readouts: ~1e-7


@pytest.mark.parametrize("site", ["q", "k"])
def test_without_the_qk_fix_queries_and_keys_are_not_exact(site):
    """The same linear model: linearising through the softmax misses (the fix is what makes it exact)."""
    model = random_model(n_layer=1, seed=3, linear=True)
    est, _, base, _ = estimate(model, site, qk_fix=False)
    exact, _ = exact_values(model, site)
    effect = exact - float(base.last_logits[0, FOIL] - base.last_logits[0, TARGET])
    assert float((est - effect).abs().max()) > 1e-3 * float(effect.abs().max())


@pytest.mark.parametrize("site", ["q", "k"])
@torch.no_grad()
def test_qk_fix_is_the_finite_difference_along_the_exact_pattern_change(site):
    """On a normal model: the fix's estimate for a cell = d/d eps of the metric with the pattern moved
    eps of the way to the pattern of the run exactly patched at that cell (recorded, not recomputed)."""
    model = random_model(n_layer=2, seed=4)
    est, base_ids, base, src = estimate(model, site, "logit-diff", qk_fix=True)
    rec = Recording(sites=("pattern",))
    model(base_ids, record=rec, last_only=True)
    ref = torch.zeros_like(est)
    for l in range(2):
        for h in range(2):
            for p in range(T):
                moved = Recording(sites=("pattern",))
                model(base_ids, patch=Patch(l, p, src[site][l, 0, h, p], site=site, head=h), record=moved,
                      last_only=True)
                b, d = rec["pattern", l][0, h], moved["pattern", l][0, h] - rec["pattern", l][0, h]  # (T, T)
                m = []
                for s in (1e-4, -1e-4):
                    logits, _ = model(base_ids, patch=Patch(l, None, b + s * d, site="pattern", head=h), last_only=True)
                    m.append(float(logits[0, -1, FOIL] - logits[0, -1, TARGET]))
                ref[l, h, p] = (m[0] - m[1]) / 2e-4
    scale = float(ref.abs().max())
    assert scale > 1e-3
    assert float((est - ref).abs().max()) <= 1e-5 * scale


# ----------------------------------------------------------------------------- the check's statistics


def test_compare_statistics_by_hand():
    exact = np.array([[0.0, 10.0, 4.0, 4.0], [1.0, 2.0, 3.0, -8.0]])
    est = np.array([[0.0, 9.0, 4.0, 5.0], [1.0, 2.0, 6.0, -2.0]])
    live = np.ones_like(exact, dtype=bool)
    live[0, 0] = False  # a no-op cell is left out
    c = attribution.compare(exact, est, 0.0, live, ["layer", "position"], list("abcd"), k=3)
    e, a = exact[live], est[live]
    assert c["cells"] == 7
    assert c["pearson"] == pytest.approx(np.corrcoef(e, a)[0, 1])
    # ranks written out (ties averaged): e = 10 4 4 1 2 3 -8, a = 9 4 5 1 2 6 -2
    re, ra = [7, 5.5, 5.5, 2, 3, 4, 1], [7, 4, 5, 2, 3, 6, 1]
    assert c["spearman"] == pytest.approx(np.corrcoef(re, ra)[0, 1])
    assert c["max_abs_error"] == 6.0
    assert c["max_abs_error_cell"] == {"layer": 1, "position": 3, "token": "d", "exact": -8.0, "estimate": -2.0,
                                       "error": 6.0}
    # exact top 3 by |effect|: 10, -8, and one of the 4s; estimate's: 9, 6, 5 -> shares 10 and maybe a 4
    assert c["top_k"] == 3 and c["top_k_recall"] in (1 / 3, 2 / 3)
    assert attribution.compare(exact, est * 0 + 1, 1.0, live, ["layer", "position"], list("abcd"))["pearson"] is None


def test_ranks_average_ties():
    assert attribution._ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


# ----------------------------------------------------------------------------- CLI


def cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


PAIR = ["--clean", "Michelle Jones was a top-notch student. Michelle", "--corrupt",
        "Michelle Smith was a top-notch student. Michelle", "--target", "Jones", "--foil", "Smith"]


@pytest.mark.parametrize("site", ["resid_post", "k"])
def test_cli_check_writes_both_matrices_and_the_report(tiny_ckpt, tmp_path, site):
    rc, out, err = cli([*PAIR, "--model", str(tiny_ckpt), "--device", "cpu", "--site", site, "--method",
                        "attribution", "--check", "--out", str(tmp_path / "a")])
    assert rc == 0, err
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"results.json", "results.csv", "heatmap.png", "exact.csv", "exact-heatmap.png", "scatter.png"} <= names
    doc = json.loads((tmp_path / "a" / "results.json").read_text())
    assert doc["method"] == "attribution" and doc["qk_fix"] is True
    for key in ("pearson", "spearman", "max_abs_error", "max_abs_error_cell", "top_k_recall", "cells"):
        assert key in doc["check"]
    assert "check against the exact sweep" in out and "Pearson" in out
    # the exact matrix is the exact method's own
    rc, _, err = cli([*PAIR, "--model", str(tiny_ckpt), "--device", "cpu", "--site", site, "--out", str(tmp_path / "e")])
    assert rc == 0, err
    plain = json.loads((tmp_path / "e" / "results.json").read_text())
    assert doc["exact_matrix"] == plain["matrix"] and plain["method"] == "exact" and "check" not in plain
    assert doc["matrix"] != plain["matrix"]


def test_cli_check_needs_attribution(tiny_ckpt, tmp_path):
    rc, out, err = cli([*PAIR, "--model", str(tiny_ckpt), "--device", "cpu", "--check", "--out", str(tmp_path / "x")])
    assert rc == 1 and err.count("\n") == 1 and "--method attribution" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_compare_ignores_rounding_noise_in_ranks_and_top_k():
    """Exact effects of a few float32 ulps are no ranking: they count as 0, and top-k takes only the
    cells above the noise floor."""
    exact = np.array([20.0, 20.0 - 1.9e-6, 20.0 + 1.9e-6, -18.0, 5.0])
    est = np.array([20.0, 20.0 + 1e-9, 20.0 - 1e-9, -6.0, 12.0])
    c = attribution.compare(exact, est, 20.0, np.ones(5, bool), ["layer"], [])
    assert c["cells_above_noise"] == 2 and c["top_k"] == 2 and c["top_k_recall"] == 1.0
    assert c["noise_floor"] == pytest.approx(2e-4)
    assert c["spearman"] == pytest.approx(np.corrcoef([3, 3, 3, 1, 5], [3, 3, 3, 1, 5])[0, 1])


# ----------------------------------------------------------------------------- its plan and memory


def saved_for_backward(model, site, T_, qk_fix) -> int:
    """Bytes autograd keeps for one estimate's backward (attribution.gradients), parameters excluded:
    the reference for backward_bytes, read from autograd's own saved-tensor hooks."""
    ids = torch.randint(0, model.config.vocab_size, (1, T_), generator=torch.Generator().manual_seed(0))
    base = engines.record(model, ids, [site] + attribution.needed_sites(site, qk_fix))
    r = torch.zeros(3)
    return saved_bytes(model, lambda: attribution.gradients(
        model, ids, base, "pattern" if qk_fix and site in attribution.QK_SITES else site, "prob-diff", TARGET, FOIL, r, r))


@pytest.mark.parametrize("site, qk_fix", [("resid_pre", True), ("z", True), ("v", True), ("pattern", True),
                                          ("q", True), ("k", False)])
@pytest.mark.parametrize("T_", [8, 48])
def test_backward_bytes_bounds_what_autograd_keeps(site, qk_fix, T_):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=64)).eval()
    saved = saved_for_backward(model, site, T_, qk_fix)
    estimate = attribution.backward_bytes(model.config, T_, site, qk_fix)
    assert saved <= estimate <= 3 * saved, (saved, estimate)


def test_attribution_plan_is_its_own(tiny_ckpt, tmp_path, monkeypatch):
    """--dry-run describes the estimate (one backward), --check adds the exact sweep, and the memory
    check uses the method's own plan: with room for one but not the other, only that one runs."""
    rc, out, err = cli([*PAIR, "--model", str(tiny_ckpt), "--method", "attribution", "--dry-run"])
    assert rc == 0, err
    assert out.startswith("plan: ") and "estimated by attribution patching: one forward and one backward;" in out
    assert "chunk" not in out
    rc, out, err = cli([*PAIR, "--model", str(tiny_ckpt), "--method", "attribution", "--check", "--dry-run"])
    assert rc == 0 and "then the exact sweep to check it: " in out and "1 chunk" in out
    rc, exact_out, _ = cli([*PAIR, "--model", str(tiny_ckpt), "--site", "pattern", "--dry-run"])
    rc, attr_out, _ = cli([*PAIR, "--model", str(tiny_ckpt), "--site", "pattern", "--method", "attribution", "--dry-run"])
    mib = lambda text: float(text.split("estimated peak memory ")[1].split(" MiB")[0])  # noqa: E731
    lo, hi = sorted([mib(exact_out), mib(attr_out)])
    assert lo < hi
    monkeypatch.setattr(engines, "available_memory", lambda device: int((lo + hi) / 2 * 2**20))
    results = {}
    for method in ("exact", "attribution"):
        rc, _, err = cli([*PAIR, "--model", str(tiny_ckpt), "--site", "pattern", "--method", method,
                          "--out", str(tmp_path / method)])
        results[method] = (rc, err)
    small = "exact" if mib(exact_out) == lo else "attribution"
    big = "attribution" if small == "exact" else "exact"
    assert results[small][0] == 0, results[small][1]
    rc, err = results[big]
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "shorten the prompt" in err
    assert ("attribution estimate needs about" in err) == (big == "attribution") and "--max-rows" not in err
    assert not (tmp_path / big).exists()

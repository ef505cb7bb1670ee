"""patch-run top and the mlp_post site, against independent references.

- mlp_post: our recording (both MLP paths: whole, and the long no-grad batch the MLP slices) equals
  transformers' GPT2LMHeadModel with a forward hook on `mlp.act`; a one-neuron patch equals the same
  edit made by that hook.
- every unit kind's value at every corpus token equals a plain loop over documents and windows with
  transformers' hooks (mlp.act, attn.c_proj's input, output_attentions) or a dot product of hidden states;
- the bounded top-k (every unit at once, batches in any order, with many ties) equals a full numpy sort,
  ties broken by (document, position); an index equals one-unit runs: top-k, density, and the histogram
  count for count on the index's bins; its bands equal a one-unit run's where the sample is the whole
  corpus, and hold the sampled tokens' exact values where it is not; an interrupted and resumed index
  equals an uninterrupted one, array for array; an index of an older format is refused in one line;
- the command line's files, bad input as one line with nothing written, and the page in Chromium.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_close, hf_model
from mingpt.model import GPT
from mingpt.sites import Patch, Recording
from patching.analyses.base import Events
from patching.analyses.top import corpus as corpora
from patching.analyses.top import fold as folds
from patching.analyses.top import index as indexes
from patching.analyses.top.scan import TopK
from patching.core.context import ModelSpec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TEXT = ("The cat sat on the mat. The cat sat on the mat again, and the dog watched the cat.\n\n"
        "Michelle Jones was a top-notch student. Michelle Jones won the race.\n\n"
        "import os\nprint(os.getcwd())\n\n"
        "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen.\n")


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    from patching import analyses
    monkeypatch.setitem(analyses.REGISTRY, "top", "patching.analyses.top:Top")


@pytest.fixture(scope="module")
def both(tiny_ckpt):
    return GPT.from_pretrained(str(tiny_ckpt)), hf_model(tiny_ckpt)


@pytest.fixture(scope="module")
def ctx(tiny_ckpt):
    from patching.core.context import load
    return load(ModelSpec(model=str(tiny_ckpt), device="cpu"))


def cli(args, tmp_path=None, name="out"):
    from patching.cli import main
    out = [] if tmp_path is None else ["--out", str(tmp_path / name)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["top", *args, "--device", "cpu", *out])
    return rc, stdout.getvalue(), stderr.getvalue()


def hook_acts(hf, idx, module, pre=False):
    got = {}
    if pre:
        h = module.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].detach().clone()))
    else:
        h = module.register_forward_hook(lambda m, a, o: got.__setitem__("x", o.detach().clone()))
    try:
        with torch.no_grad():
            out = hf(idx, output_attentions=True, output_hidden_states=True)
    finally:
        h.remove()
    return got["x"], out


# ----------------------------------------------------------------------------- the mlp_post site


@pytest.mark.parametrize("shape, grad", [((1, 9), False), ((3, 120), False), ((1, 9), True)])
def test_mlp_post_equals_transformers_act_hook(both, shape, grad):
    """(3, 120): 360 rows; MLP_ROWS lowered so the no-grad forward would slice them; recording takes them whole."""
    ours, hf = both
    idx = torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(3))
    import mingpt.model as m
    old, m.MLP_ROWS = m.MLP_ROWS, 100
    try:
        rec = Recording(sites=("mlp_post",))
        with torch.set_grad_enabled(grad):
            logits, _ = ours(idx, record=rec)
            plain, _ = ours(idx)  # the sliced path, nothing recorded
    finally:
        m.MLP_ROWS = old
    assert rec["mlp_post"].shape == (2, *shape, ours.config.n_inner)
    for l, block in enumerate(hf.transformer.h):
        want, out = hook_acts(hf, idx, block.mlp.act)
        assert_close(rec["mlp_post", l], want, what=f"mlp_post {l}")
    assert_close(logits, out.logits)
    assert_close(plain, logits)


def test_one_neuron_patch_equals_transformers_hook(both):
    ours, hf = both
    idx = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(4))
    l, p, n, value = 1, 6, 17, 3.5

    def edit(mod, args, out):
        out = out.clone()
        out[:, p, n] = value
        return out

    h = hf.transformer.h[l].mlp.act.register_forward_hook(edit)
    try:
        with torch.no_grad():
            want = hf(idx).logits
    finally:
        h.remove()
    with torch.no_grad():
        got, _ = ours(idx, patch=Patch(l, p, torch.tensor(value), site="mlp_post", neuron=n))
        same, _ = ours(idx, patch=Patch(l, p, torch.tensor(value), site="mlp_post", head=n))
        plain, _ = ours(idx)
    assert_close(got, want)
    assert torch.equal(got, same)
    assert float((got - plain).abs().max()) > 1e-3  # the edit matters


def test_mlp_post_patch_refuses_a_head_site_neuron():
    from mingpt.errors import InputError
    with pytest.raises(InputError, match="neuron= is for neuron sites"):
        Patch(0, 0, torch.zeros(3), site="z", neuron=1)


# ----------------------------------------------------------------------------- activations vs a plain loop


def reference(hf, corpus, unit_site, layer, index, size, bos, vector=None):
    """Every document token's value by a plain loop: one HF forward per window, hooks, no batching."""
    out = np.full(corpus.n_tokens, np.nan)
    step = size - bos
    H = hf.config.n_head
    for d in range(corpus.n_documents):
        ids = corpus.document(d)
        for s in range(0, len(ids), step):
            w = [int(i) for i in ids[s:s + step]]
            x = torch.tensor([[50256] * bos + w])
            block = hf.transformer.h[layer]
            if unit_site == "mlp_post":
                a, _ = hook_acts(hf, x, block.mlp.act)
                v = a[0, :, index] if vector is None else a[0] @ vector.double().float()
            elif unit_site == "z":
                a, _ = hook_acts(hf, x, block.attn.c_proj, pre=True)
                v = a[0].unflatten(-1, (H, -1))[:, index].norm(dim=-1)
            elif unit_site == "pattern":
                _, o = hook_acts(hf, x, block.mlp.act)
                att = o.attentions[layer][0, index]  # (T, T)
                v = torch.zeros(att.shape[0])
                for t in range(att.shape[0]):
                    srcs = [att[t, u] for u in range(bos, t)]
                    v[t] = max(srcs) if srcs else 0.0
            else:  # a residual direction: resid_pre of `layer` is hidden_states[layer]
                _, o = hook_acts(hf, x, block.mlp.act)
                v = o.hidden_states[layer][0] @ vector
            out[corpus.offsets[d] + s: corpus.offsets[d] + s + len(w)] = v[bos:].double().numpy()
    return out


@pytest.mark.parametrize("unit, bos", [("mlp_post:1.17", False), ("mlp_post:0.3", True), ("z:1.2", True),
                                       ("pattern:1.3", False), ("pattern:0.1", True)])
def test_unit_values_equal_a_plain_loop_with_hooks(both, ctx, unit, bos):
    from patching.analyses.top import scan_unit
    from patching.analyses.top.scan import parse_unit
    ours, hf = both
    corpus = corpora.tokenize(ctx.tok, "t", corpora.paragraphs(TEXT), 50257)
    o = _options(unit=unit, corpus="x", window=12, prepend_bos=bos, batch_size=3)
    u = parse_unit(unit, ctx.config)
    acts, source = scan_unit(ctx, corpus, u, o)
    want = reference(hf, corpus, u.site, u.layer, u.index, 12, int(bos))
    assert np.isfinite(want).all() and len(corpus.windows if hasattr(corpus, "windows") else [0])
    assert_close(acts, want, what=unit)


def test_direction_unit_is_a_dot_product(both, ctx, tmp_path):
    from patching.analyses.top import scan_unit
    from patching.analyses.top.scan import parse_unit
    _, hf = both
    v = np.random.default_rng(0).normal(size=32).astype(np.float32)
    np.save(tmp_path / "d.npy", v)
    corpus = corpora.tokenize(ctx.tok, "t", corpora.paragraphs(TEXT), 50257)
    u = parse_unit(f"resid_pre:1@{tmp_path / 'd.npy'}", ctx.config)
    acts, _ = scan_unit(ctx, corpus, u, _options(unit=u.name, corpus="x", window=16))
    want = reference(hf, corpus, "resid_pre", 1, None, 16, 0, torch.from_numpy(v))
    assert_close(acts, want)


def _options(**kw):
    from patching.analyses.top import TopOptions
    return TopOptions(**kw)


# ----------------------------------------------------------------------------- top-k


def test_bounded_topk_equals_a_full_sort_with_ties():
    """Integer values (many ties), batches folded in a shuffled order: the same as one lexsort."""
    rng = np.random.default_rng(1)
    n, U, k = 500, 7, 9
    values = rng.integers(-3, 6, size=(n, U)).astype(np.float32)
    values[:, 6] = 2.0  # a unit that is one tie
    document = np.repeat(np.arange(50), 10)
    position = np.tile(np.arange(10), 50)
    chunks = np.array_split(rng.permutation(n), 13)
    top = TopK(U, k)
    for c in chunks:
        top = top.fold(torch.from_numpy(values[c]), document[c], position[c])
    for u in range(U):
        order = np.lexsort((position, document, -values[:, u]))[:k]
        np.testing.assert_array_equal(top.values[u], values[order, u])
        np.testing.assert_array_equal(top.document[u], document[order])
        np.testing.assert_array_equal(top.position[u], position[order])


def test_blocked_topk_equals_a_full_sort():
    """Batches of hundreds of tokens (whole 64-token blocks and a short last one), integer values with many
    ties, a unit that rises late and a constant one: the same as one lexsort, and the lists are full
    after the first batch so every later fold takes the blocked path."""
    rng = np.random.default_rng(5)
    n, U, k = 1500, 6, 7
    values = rng.integers(-20, 20, size=(n, U)).astype(np.float32)
    values[:, 4] = np.where(np.arange(n) > 1200, values[:, 4] + 30, values[:, 4])  # its top arrives last
    values[:, 5] = -0.0  # all ties (and -0.0 ties with 0.0)
    values[::7, 5] = 0.0
    document = np.repeat(np.arange(30), 50)
    position = np.tile(np.arange(50), 30)
    perm = rng.permutation(n)
    top = TopK(U, k)
    for c in np.split(perm, [300, 700, 701, 1000, 1250]):
        top = top.fold(torch.from_numpy(values[c]), document[c], position[c])
    for u in range(U):
        order = np.lexsort((position, document, -values[:, u].astype(np.float64)))[:k]
        np.testing.assert_array_equal(top.values[u], values[order, u])
        np.testing.assert_array_equal(top.document[u], document[order])
        np.testing.assert_array_equal(top.position[u], position[order])


def right_closed(values: np.ndarray, exponent, start) -> np.ndarray:
    """A histogram on an index's bins, written out in float64: bin j holds ((start + j - 1) w, (start + j) w]."""
    j = np.ceil(values.astype(np.float64) / 2.0 ** int(exponent)) - int(start)
    assert ((j >= 0) & (j < folds.HIST_BINS)).all()
    return np.bincount(j.astype(np.int64), minlength=folds.HIST_BINS)


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.1])
def test_histogram_fold_is_exact_across_regrids(threshold):
    """Batches whose range grows (both ways, by 300x) and shifts: the bins widen and recentre, and the
    counts equal a histogram of every value on the final bins; density above an edge (0, 0.25) or not
    (0.1) equals a comparison; the sum and the extremes are exact."""
    rng = np.random.default_rng(2)
    U = 5
    layer = folds.Layer.fresh(U, 3)
    seen = []
    for i, scale in enumerate([0.01, 0.02, 0.5, 0.5, 3.0, 0.1]):
        n = int(rng.integers(1, 200))
        x = (rng.normal(size=(n, U)) * scale + np.array([0, 1, -2, 50, 0]) * scale).astype(np.float32)
        x[:, 4] = np.round(x[:, 4] * 8) / 8  # values on the bin edges
        if i == 3:
            x[:3, 0] = [0.0, -0.0, 1e-30]
        seen.append(x)
        doc = np.full(n, i)
        layer = folds.fold(layer, torch.from_numpy(x), doc, np.arange(n), threshold, folds.Scratch())
    allx = np.concatenate(seen)
    assert (layer.exponent > folds.E_MIN).all()
    for u in range(U):
        np.testing.assert_array_equal(layer.hist[u], right_closed(allx[:, u], layer.exponent[u], layer.start[u]))
        assert layer.hist[u].sum() == len(allx) and (layer.hist[u] > 0).sum() >= 8
    np.testing.assert_array_equal(layer.above, (allx > np.float32(threshold)).sum(0))
    np.testing.assert_array_equal(layer.low, allx.min(0))
    np.testing.assert_array_equal(layer.high, allx.max(0))


def test_topk_with_fewer_tokens_than_k():
    top = TopK(2, 5).fold(torch.tensor([[1.0, 2.0], [3.0, 0.5]]), np.array([0, 1]), np.array([4, 0]))
    np.testing.assert_array_equal(top.values[0, :2], [3.0, 1.0])
    assert np.isneginf(top.values[:, 2:]).all() and (top.document[:, 2:] == -1).all()


def test_single_unit_top_is_a_full_sort_of_the_plain_loop(both, ctx, tmp_path):
    """results.json's top-k against a numpy sort of the reference values; schema of every file."""
    _, hf = both
    (tmp_path / "c.txt").write_text(TEXT)
    rc, stdout, stderr = cli(["--model", ctx.spec.model, "--corpus", str(tmp_path / "c.txt"), "--unit",
                              "mlp_post:1.5", "--k", "6", "--window", "12", "--samples", "2", "--context", "3"],
                             tmp_path)
    assert rc == 0, stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    corpus = corpora.tokenize(ctx.tok, "t", corpora.paragraphs(TEXT), 50257)
    want = reference(hf, corpus, "mlp_post", 1, 5, 12, 0)
    doc = np.repeat(np.arange(corpus.n_documents), np.diff(corpus.offsets))
    pos = np.arange(corpus.n_tokens) - corpus.offsets[doc]
    order = np.argsort(-want, kind="stable")[:6]
    assert [(e["document"], e["position"]) for e in res["top"]] == [(int(doc[i]), int(pos[i])) for i in order]
    assert_close([e["activation"] for e in res["top"]], want[order])
    assert res["n_tokens"] == corpus.n_tokens and res["n_documents"] == 4 and res["unit"] == "mlp_post:1.5"
    assert abs(res["density"] - float((want > 0).mean())) <= 1 / corpus.n_tokens
    assert sum(res["histogram"]["counts"]) == corpus.n_tokens and len(res["histogram"]["edges"]) == 51
    for e in res["top"]:
        ids = corpus.document(e["document"])
        assert e["tokens"][e["index"]] == ctx.tok.token_str(int(ids[e["position"]]))
        assert e["index"] <= 3 and e["activations"][e["index"]] == e["activation"]
        assert e["position"] - e["index"] >= (e["position"] // 12) * 12  # never before its window
    assert [len(q["examples"]) for q in res["quantiles"]] == [min(2, q["tokens"]) for q in res["quantiles"]]
    lines = (tmp_path / "out" / "examples.jsonl").read_text().splitlines()
    assert len(lines) == 6 + sum(len(q["examples"]) for q in res["quantiles"])
    assert len(res["promoted"]) == 10 and res["promoted"][0]["logit"] >= res["promoted"][-1]["logit"]
    # the promoted tokens: the neuron's c_proj column through ln_f and the unembedding, written out here
    sd = hf.state_dict()
    d = sd["transformer.h.1.mlp.c_proj.weight"][5].double()  # HF Conv1D: (n_inner, C)
    logits = sd["lm_head.weight"].double() @ ((d - d.mean()) * sd["transformer.ln_f.weight"].double())
    assert [p["id"] for p in res["promoted"]] == torch.topk(logits, 10).indices.tolist()
    assert (tmp_path / "out" / "histogram.png").stat().st_size > 1000
    assert "mlp_post:1.5" in stdout and "wrote" in stdout


# ----------------------------------------------------------------------------- every unit: the index


def test_index_equals_one_unit_runs_and_a_full_sort(ctx, tmp_path):
    from patching.analyses.top import Top, scan_unit
    from patching.analyses.top.scan import parse_unit
    (tmp_path / "c.txt").write_text(TEXT * 3)
    o = _options(unit="all", corpus=str(tmp_path / "c.txt"), index=str(tmp_path / "idx"), window=10, k=4,
                 batch_size=3)
    res = Top().run(ctx, None, o)
    st = indexes.load_state(tmp_path / "idx")
    corpus = corpora.tokenize(ctx.tok, "t", corpora.paragraphs(TEXT * 3), 50257)
    doc = np.repeat(np.arange(corpus.n_documents), np.diff(corpus.offsets))
    pos = np.arange(corpus.n_tokens) - corpus.offsets[doc]
    for unit in ("mlp_post:0.0", "mlp_post:1.77", "mlp_post:1.127"):
        u = parse_unit(unit, ctx.config)
        acts, _ = scan_unit(ctx, corpus, u, o.replace(unit=unit, index=None))  # the same batches: the same bits
        order = np.lexsort((pos, doc, -acts.astype(np.float64)))[:4]
        np.testing.assert_array_equal(st["values"][u.layer, u.index], acts[order])
        np.testing.assert_array_equal(st["document"][u.layer, u.index], doc[order])
        np.testing.assert_array_equal(st["position"][u.layer, u.index], pos[order])
        assert st["above"][u.layer, u.index] == int((acts > 0).sum())
    assert res.to_json()["units"] == 2 * 128 and len(res.strongest) == 20
    # rendered from the index (no corpus given): the same top-k as a one-unit run
    rc, _, stderr = cli(["--model", ctx.spec.model, "--index", str(tmp_path / "idx"), "--unit", "mlp_post:1.77",
                         "--k", "4"], tmp_path, "one")
    assert rc == 0, stderr
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [e["activation"] for e in one["top"]] == st["values"][1, 77].tolist()
    assert one["from_index"] and one["top"][0]["activations"] is None


def test_index_histogram_and_bands_equal_one_unit_runs(ctx, tmp_path):
    """Every unit's histogram in the index equals, count for count, the one-unit run's values binned on
    the index's bins; the rendered histogram sums to n_tokens; with the whole corpus as the sample, the
    bands (low, high, tokens, examples) equal the one-unit run's."""
    from patching.analyses.top import Top, from_index, scan_unit, summarize
    from patching.analyses.top.scan import parse_unit
    (tmp_path / "c.txt").write_text(TEXT * 3)
    o = _options(unit="all", corpus=str(tmp_path / "c.txt"), index=str(tmp_path / "idx"), window=10, k=4,
                 batch_size=3, samples=3)
    Top().run(ctx, None, o)
    st = indexes.load_state(tmp_path / "idx")
    corpus = corpora.tokenize(ctx.tok, "t", corpora.paragraphs(TEXT * 3), 50257)
    assert st["sample"].shape == (2, corpus.n_tokens, 128)  # a small corpus is its own sample
    for l in range(2):
        unit = f"mlp_post:{l}.0"
        acts = np.stack([scan_unit(ctx, corpus, parse_unit(f"mlp_post:{l}.{i}", ctx.config),
                                   o.replace(unit=unit, index=None))[0] for i in range(128)], axis=1)
        for i in range(128):
            np.testing.assert_array_equal(st["hist"][l, i], right_closed(acts[:, i], st["exponent"][l, i],
                                                                         st["start"][l, i]), err_msg=f"{l}.{i}")
        np.testing.assert_array_equal(st["sample"][l], acts)
        np.testing.assert_array_equal(st["low"][l], acts.min(0))
        np.testing.assert_array_equal(st["high"][l], acts.max(0))
    unit = "mlp_post:1.77"
    u = parse_unit(unit, ctx.config)
    acts, src = scan_unit(ctx, corpus, u, o.replace(unit=unit, index=None))
    one = summarize(ctx, corpus, u, acts, src, o.replace(unit=unit, index=None)).to_json()
    got = from_index(ctx, o.replace(unit=unit)).to_json()
    h = got["histogram"]
    assert sum(h["counts"]) == corpus.n_tokens and len(h["edges"]) == len(h["counts"]) + 1 and h["closed"] == "right"
    assert h["counts"][0] > 0 and h["counts"][-1] > 0 and h["edges"][0] < acts.min() and h["edges"][-1] >= acts.max()
    assert got["band_sample"] == corpus.n_tokens and one["band_sample"] is None
    for a, b in zip(one["quantiles"], got["quantiles"]):
        keys = ("band", "low", "high", "tokens")
        assert [a[key] for key in keys] == [b[key] for key in keys]
        assert [(e["document"], e["position"], e["activation"]) for e in a["examples"]] == \
            [(e["document"], e["position"], e["activation"]) for e in b["examples"]]
    assert [e["position"] for e in got["top"]] == [e["position"] for e in one["top"]]
    rc, _, stderr = cli(["--model", ctx.spec.model, "--index", str(tmp_path / "idx"), "--unit", unit], tmp_path, "page")
    assert rc == 0, stderr
    assert (tmp_path / "page" / "histogram.png").stat().st_size > 1000
    assert len((tmp_path / "page" / "examples.jsonl").read_text().splitlines()) > 4


def test_bands_from_a_sample_smaller_than_the_corpus(ctx, tmp_path, monkeypatch):
    """A sample of 37 of the corpus's tokens: the smallest hashes of (document, position); the index holds
    their exact values; band examples come from it, ranked within it, never from the top list."""
    from patching.analyses.top import Top, from_index, scan_unit
    from patching.analyses.top.scan import parse_unit
    monkeypatch.setattr(folds, "SAMPLE_TOKENS", 37)
    (tmp_path / "c.txt").write_text(TEXT * 3)
    o = _options(unit="all", corpus=str(tmp_path / "c.txt"), index=str(tmp_path / "idx"), window=10, k=4,
                 batch_size=3, samples=50, site="z")
    Top().run(ctx, None, o)
    st = indexes.load_state(tmp_path / "idx")
    corpus = corpora.tokenize(ctx.tok, "t", corpora.paragraphs(TEXT * 3), 50257)
    doc = np.repeat(np.arange(corpus.n_documents), np.diff(corpus.offsets))
    pos = np.arange(corpus.n_tokens) - corpus.offsets[doc]
    h = folds.splitmix64((doc.astype(np.uint64) << np.uint64(32)) | pos.astype(np.uint64))
    picked = np.sort(np.argsort(h)[:37])
    np.testing.assert_array_equal(st["sample_document"], doc[picked])
    np.testing.assert_array_equal(st["sample_position"], pos[picked])
    acts, _ = scan_unit(ctx, corpus, parse_unit("z:1.2", ctx.config), o.replace(unit="z:1.2", index=None))
    np.testing.assert_array_equal(st["sample"][1, :, 2], acts[picked])
    got = from_index(ctx, o.replace(unit="z:1.2")).to_json()
    assert got["band_sample"] == 37
    top = {(e["document"], e["position"]) for e in got["top"]}
    sv = acts[picked]
    rank = np.empty(37, np.int64)
    rank[np.argsort(-sv.astype(np.float64), kind="stable")] = np.arange(37)  # ranks within the sample
    for q in got["quantiles"]:
        lo, hi = q["band"]
        assert q["low"] == float(np.quantile(sv, lo)) and q["high"] == float(np.quantile(sv, hi))
        n = corpus.n_tokens
        assert q["tokens"] == int(np.floor((1 - lo) * n)) - max(int(np.floor((1 - hi) * n)),
                                                              min(4, int(np.floor((1 - lo) * n))))
        for e in q["examples"]:
            i = int(np.nonzero((doc[picked] == e["document"]) & (pos[picked] == e["position"]))[0][0])
            assert e["activation"] == float(sv[i]) and (e["document"], e["position"]) not in top
            assert np.floor((1 - hi) * 37) <= rank[i] < np.floor((1 - lo) * 37)
    assert sum(len(q["examples"]) for q in got["quantiles"]) >= 30


def test_index_without_histograms(ctx, tmp_path):
    """--no-histograms: no bins kept, the density (by comparison then) and top-k as with them; a unit read
    from it has no histogram; resuming with histograms is refused; one unit refuses the flag."""
    from patching.analyses.top import Top, from_index
    (tmp_path / "c.txt").write_text(TEXT * 2)
    kw = dict(unit="all", corpus=str(tmp_path / "c.txt"), window=10, k=3, batch_size=4, threshold=0.1)
    Top().run(ctx, None, _options(index=str(tmp_path / "with"), **kw))
    Top().run(ctx, None, _options(index=str(tmp_path / "without"), histograms=False, **kw))
    a, b = indexes.load_state(tmp_path / "with"), indexes.load_state(tmp_path / "without")
    assert b["hist"].shape == (2, 128, 0) and a["hist"].shape == (2, 128, folds.HIST_BINS)
    for key in ("values", "document", "position", "above", "total", "low", "high", "sample"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert from_index(ctx, _options(unit="mlp_post:1.3", index=str(tmp_path / "without"))).histogram is None
    with pytest.raises(Exception, match="another histograms"):
        Top().run(ctx, None, _options(index=str(tmp_path / "without"), **kw))
    rc, _, stderr = cli(["--model", ctx.spec.model, "--corpus", str(tmp_path / "c.txt"), "--unit", "z:0.1",
                         "--no-histograms"], tmp_path)
    assert rc == 1 and "--no-histograms is for --unit all" in stderr


def test_old_index_format_is_refused(ctx, tmp_path):
    from patching.analyses.top import Top
    (tmp_path / "c.txt").write_text(TEXT)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "index.json").write_text(json.dumps({"format": "patch-run top index 1", "site": "z"}))
    with pytest.raises(Exception, match="another version of patch-run top .* build it again into a new --index"):
        Top().run(ctx, None, _options(unit="all", corpus=str(tmp_path / "c.txt"), index=str(tmp_path / "idx")))
    rc, _, stderr = cli(["--model", ctx.spec.model, "--index", str(tmp_path / "idx"), "--unit", "z:0.1"], tmp_path)
    assert rc == 1 and "another version of patch-run top" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sample", [folds.SAMPLE_TOKENS, 11])
def test_interrupted_index_resumes_to_the_same_index(ctx, tmp_path, monkeypatch, sample):
    """Every array of the state (top-k, density, sums, extremes, histogram bins and counts, the sample),
    with the whole corpus as the sample and with a small one."""
    from patching.analyses.top import Top
    monkeypatch.setattr(folds, "SAMPLE_TOKENS", sample)
    (tmp_path / "c.txt").write_text(TEXT * 4)
    kw = dict(unit="all", corpus=str(tmp_path / "c.txt"), window=8, k=3, batch_size=2, site="z")
    Top().run(ctx, None, _options(index=str(tmp_path / "whole"), **kw))

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as exc:
        Top().run(ctx, None, _options(index=str(tmp_path / "cut"), **kw), Events(progress=stop))
    assert "holds 3 of" in exc.value.kept
    assert int(indexes.load_state(tmp_path / "cut")["done"]) == 3
    with pytest.raises(Exception, match="unfinished"):
        indexes.read(tmp_path / "cut")
    Top().run(ctx, None, _options(index=str(tmp_path / "cut"), **kw))
    a, b = indexes.load_state(tmp_path / "whole"), indexes.load_state(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # another setting into the same folder is refused
    with pytest.raises(Exception, match="another k"):
        Top().run(ctx, None, _options(index=str(tmp_path / "cut"), **{**kw, "k": 5}))


# ----------------------------------------------------------------------------- corpora and bad input


def test_corpus_sources(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.txt").write_text("first\n\nstill first")
    assert corpora.documents(str(tmp_path / "d")) == ["first\n\nstill first", "second"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    assert corpora.documents(str(tmp_path / "c.jsonl")) == ["one", "two"]
    (tmp_path / "c.csv").write_text("id,body\n1,hello there\n2,\"a, b\"\n")
    assert corpora.documents(str(tmp_path / "c.csv"), "body") == ["hello there", "a, b"]
    assert len(corpora.documents("python-docs")) > 50


@pytest.mark.parametrize("make, args, message", [
    (lambda p: p.write_text("\n\n  \n"), ["--unit", "mlp_post:0.1"], "has no text"),
    (lambda p: p.write_bytes(b"abc\x00\x01def"), ["--unit", "mlp_post:0.1"], "binary file"),
    (lambda p: p.write_text("hello world"), ["--unit", "mlp_post:2.1"], "does not exist: this model has layers 0..1"),
    (lambda p: p.write_text("hello world"), ["--unit", "mlp_post:0.128"], "neurons 0..127"),
    (lambda p: p.write_text("hello world"), ["--unit", "pattern:1.4"], "heads 0..3"),
    (lambda p: p.write_text("hello world"), ["--unit", "mlp:0.1"], "a unit L.N is a neuron (mlp_post:L.N)"),
    (lambda p: p.write_text("hello world"), ["--unit", "neuron5"], "is not a unit"),
    (lambda p: p.write_text("hello"), ["--unit", "mlp_post:0.1"], "single token"),
    (lambda p: p.write_text("hello world"), ["--unit", "mlp_post:0.1", "--k", "0"], "k must be"),
    (lambda p: p.write_text("hello world"), ["--unit", "all"], "give --index DIR"),
    (lambda p: p.write_text("hello world"), ["--unit", "resid_pre:0@nowhere.npy"], "cannot read the direction"),
    (None, ["--unit", "mlp_post:0.1"], "no text column"),
])
def test_bad_input_is_one_line_and_writes_nothing(ctx, tmp_path, make, args, message):
    path = tmp_path / "c.txt"
    if make is None:
        path = tmp_path / "c.csv"
        path.write_text("body\nhello\n")
        message = "has no 'text' column"
    else:
        make(path)
    rc, stdout, stderr = cli(["--model", ctx.spec.model, "--corpus", str(path), *args], tmp_path)
    assert rc in (1, 2) and message in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()


def test_jsonl_without_the_column_is_refused(ctx, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"body": "hello there"}\n')
    rc, _, stderr = cli(["--model", ctx.spec.model, "--corpus", str(tmp_path / "c.jsonl"), "--unit", "z:0.1"],
                        tmp_path)
    assert rc == 1 and "has no 'text' field" in stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_page_renders_in_chromium(ctx, tmp_path):
    from playwright.sync_api import sync_playwright
    (tmp_path / "c.txt").write_text(TEXT.replace("cat", "<b>cat</b>"))
    rc, _, stderr = cli(["--model", ctx.spec.model, "--corpus", str(tmp_path / "c.txt"), "--unit", "pattern:1.2",
                         "--window", "16", "--k", "5"], tmp_path)
    assert rc == 0, stderr
    path = tmp_path / "out" / "top.html"
    text = path.read_text()
    assert "<b>" not in text and "&lt;" in text  # corpus text is text, never markup
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            problems, requests = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            assert images and all(done and w > 0 for done, w in images)
            first = page.locator("table.examples").first.locator("tbody tr").first
            maxed = first.locator("span.max")
            assert maxed.count() == 1
            value = float(first.locator("td").nth(1).inner_text())
            assert abs(float(maxed.get_attribute("title")) - value) <= 1e-3 * max(1.0, abs(value))
            assert page.locator("table.examples").first.locator("tbody tr").count() == 5
            assert problems == [] and all(u.startswith(("file:", "data:")) for u in requests), (problems, requests)
            page.screenshot(path=str(tmp_path / "top.png"), full_page=True)
        finally:
            browser.close()

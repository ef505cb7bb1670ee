"""Patching the MLP's neurons (`--site mlp_post`): one neuron of one block at one position per cell.

- the fast engine (each cell as a block-output patch, base + delta * c_proj's column) against the loop
  oracle (one plain forward with one Patch per cell), on random models of 2 and 3 blocks, both
  directions, with and without all_positions, chunked finely and coarsely;
- the loop against an independent reference: transformers' GPT-2 with a forward hook on `mlp.act`
  that replaces one neuron's value by the one the other prompt gave it;
- the plan (cells, no-ops, bounded chunks), attribution patching's estimate against finite
  differences, the CLI's files on demo-names, a batch, and the refusals (one line each).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import re

import numpy as np
import pytest
import torch

from conftest import assert_close, hf_model, large_init, random_gpt, saved_bytes
from mingpt.model import GPT, GPTConfig, Patch
from patching.analyses.patch import attribution
from patching.cli import main
from patching.core import engines
from patching.core.metrics import readout

SITE = "mlp_post"
TARGET, FOIL = 3, 5
CONFIGS = {  # name: (GPTConfig kwargs, seed); n_inner kept small so the loop oracle stays quick
    "2L2H16": (dict(n_layer=2, n_head=2, n_embd=16, vocab_size=53, block_size=64, n_inner=20), 0),
    "3L4H32": (dict(n_layer=3, n_head=4, n_embd=32, vocab_size=97, block_size=64, n_inner=24), 1),
}
def model_of(name: str) -> GPT:
    """A random GPT with O(1) activations (large init), so one neuron's patch moves the logits visibly."""
    return random_gpt(*CONFIGS[name])


def pair(vocab: int, T: int, differ: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (1, T), generator=g)
    corrupt = clean.clone()
    for p in differ:
        corrupt[0, p] = (clean[0, p] + 1 + p) % vocab
    return clean, corrupt


def runs(model, clean, corrupt, direction):
    """(base ids, base recording, source values (L, T, N)) for a direction."""
    rc, rx = engines.record(model, clean, [SITE]), engines.record(model, corrupt, [SITE])
    base_ids, base, src = (corrupt, rx, rc) if direction == "denoise" else (clean, rc, rx)
    return base_ids, base, src[SITE][:, 0]


def sweep(model, base_ids, base, source, engine, every, max_rows=engines.MAX_ROWS, lse=True):
    return engines.sweep(model, base_ids, base, source, SITE, TARGET, FOIL, lse, every, engine, max_rows)


# ----------------------------------------------------------------------------- fast against the loop


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("every", [False, True])
def test_fast_equals_loop(name, direction, every):
    model = model_of(name)
    L, N = model.config.n_layer, model.config.n_inner
    clean, corrupt = pair(model.config.vocab_size, 9, [2, 6])
    base_ids, base, source = runs(model, clean, corrupt, direction)
    loop = sweep(model, base_ids, base, source, "loop", every)
    assert loop.shape == ((L, N, 3) if every else (L, N, 9, 3))
    # 13 rows split every layer's neurons over many chunks; the default holds them in a few
    for max_rows in (13, engines.MAX_ROWS):
        fast = sweep(model, base_ids, base, source, "fast", every, max_rows)
        assert_close(fast, loop, what=f"{name} {direction} every={every} max_rows={max_rows}")
    diff = loop[..., 1] - loop[..., 0]
    assert float(diff.std()) > 1e-3  # the patches do move the metric
    if not every:  # positions 0 and 1 come before the first difference: exactly the base run there
        want = readout(base.last_logits[0], TARGET, FOIL, True)
        assert torch.equal(fast[:, :, :2], want.expand(L, N, 2, 3))


def test_fast_equals_loop_with_two_logits_only():
    """Without the log-sum-exp the fast engine unembeds two columns: the same two numbers."""
    model = model_of("3L4H32")
    clean, corrupt = pair(model.config.vocab_size, 7, [0, 4], seed=3)
    base_ids, base, source = runs(model, clean, corrupt, "denoise")
    loop = sweep(model, base_ids, base, source, "loop", False, lse=False)
    fast = sweep(model, base_ids, base, source, "fast", False, 17, lse=False)
    assert_close(fast[..., :2], loop[..., :2])


def test_chunks_stay_within_max_rows_and_skip_no_ops(monkeypatch):
    """Each chunk's block outputs are built for its own cells only (never every cell at once), within
    max_rows suffix rows, and the cells computed are exactly the plan's live ones."""
    model = model_of("2L2H16")
    clean, corrupt = pair(model.config.vocab_size, 8, [3])
    base_ids, base, source = runs(model, clean, corrupt, "denoise")
    seen, real = [], engines.forward_cells

    def spy(model_, base_, site, slabs, positions, values, ids):
        assert site == "resid_post" and all(h is None for _, h in slabs)
        seen.append((len(slabs), positions, tuple(values.shape)))
        return real(model_, base_, site, slabs, positions, values, ids)

    monkeypatch.setattr(engines, "forward_cells", spy)
    max_rows, T, C = 20, 8, model.config.n_embd
    done = []
    engines.sweep(model, base_ids, base, source, SITE, TARGET, FOIL, False, False, "fast", max_rows,
                  progress=lambda d, n: done.append((d, n)))
    for n, positions, shape in seen:
        assert shape == (n, len(positions), C)
        assert n * sum(T - p for p in positions) <= max_rows
    noop = engines.noop_cells(base, source, SITE, False)
    plan = engines.plan(model.config, T, SITE, False, max_rows, False, noop)
    assert plan.cells == model.config.n_layer * model.config.n_inner * T and plan.chunks == len(seen)
    assert plan.live == done[-1][0] == done[-1][1] == sum(n * len(pos) for n, pos, _ in seen)
    assert bool(noop[:, :3].all()) and plan.live <= plan.cells - 3 * model.config.n_layer * model.config.n_inner


def test_plan_on_gpt2_small_shape():
    """A full neuron sweep of GPT-2 small at 11 tokens: 12 x 3072 x 11 cells, bounded chunks, and memory
    that does not grow with the number of cells (two recordings and one chunk)."""
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
    noop = torch.zeros(12 * 3072, 11, dtype=torch.bool)
    noop[:, 0] = True  # the Michelle pair's position 0
    plan = engines.plan(cfg, 11, SITE, False, engines.MAX_ROWS, False, noop)
    assert plan.cells == 405504 and plan.live == 368640
    resid = engines.plan(cfg, 11, "resid_post", False, engines.MAX_ROWS, False, None)
    assert plan.peak_bytes < 2**28 and plan.peak_bytes < 2 * resid.peak_bytes + 2**27
    every = engines.plan(cfg, 11, SITE, True, engines.MAX_ROWS, False, None)
    assert every.cells == 36864 and every.peak_bytes < 2**28


# ----------------------------------------------------------------------------- the independent reference


def hooked_logits(hf, ids, layer, neuron, pos, value) -> torch.Tensor:
    """transformers' last-position logits with neuron `neuron` of block `layer` set to `value` at `pos`
    (None: every position, value (T,)) by a forward hook on the MLP's activation."""
    def hook(module, args, out):
        out = out.clone()
        out[0, slice(None) if pos is None else pos, neuron] = value
        return out

    handle = hf.transformer.h[layer].mlp.act.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf(ids).logits[0, -1]
    finally:
        handle.remove()


def hf_activations(hf, ids) -> torch.Tensor:
    """transformers' MLP activations (L, T, n_inner), read by hooks on `mlp.act`."""
    got = []
    handles = [b.mlp.act.register_forward_hook(lambda m, a, out: got.append(out[0].detach().clone()))
               for b in hf.transformer.h]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(got)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_loop_and_fast_equal_transformers_hooks(tiny_ckpt, direction):
    ours, hf = GPT.from_pretrained(str(tiny_ckpt)), hf_model(tiny_ckpt)
    L, N, T = ours.config.n_layer, ours.config.n_inner, 8
    clean, corrupt = pair(50257, T, [2, 5], seed=4)
    base_ids, base, source = runs(ours, clean, corrupt, direction)
    src_ids = clean if direction == "denoise" else corrupt
    theirs = hf_activations(hf, src_ids)  # the reference's own source values, not ours
    neurons = [0, 1, 17, 64, N - 1]
    for every in (False, True):
        loop = sweep(ours, base_ids, base, source, "loop", every)
        fast = sweep(ours, base_ids, base, source, "fast", every)
        want, got_loop, got_fast = [], [], []
        for l in range(L):
            for n in neurons:
                for p in [None] if every else range(T):
                    value = theirs[l, :, n] if p is None else theirs[l, p, n]
                    want.append(readout(hooked_logits(hf, base_ids, l, n, p, value), TARGET, FOIL, True))
                    cell = (l, n) if every else (l, n, p)
                    got_loop.append(loop[cell])
                    got_fast.append(fast[cell])
        want = torch.stack(want)
        assert_close(torch.stack(got_loop), want, what=f"loop every={every}")
        assert_close(torch.stack(got_fast), want, what=f"fast every={every}")
        moved = want[:, 1] - want[:, 0]
        assert float(moved.max() - moved.min()) > 1e-4  # some of these neurons matter


# ----------------------------------------------------------------------------- attribution patching


def test_attribution_equals_finite_differences():
    """Each cell's estimate is the derivative of the metric along (source - base) of that one neuron
    (central differences of plain patched forwards, float64); with all_positions, along its whole row."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=41, block_size=32, n_inner=12)).eval()
    large_init(model)
    model = model.double()
    clean, corrupt = pair(41, 6, [2], seed=1)
    base_ids, base, source = runs(model, clean, corrupt, "denoise")
    src_rec = engines.record(model, clean, [SITE])
    r = lambda rec: readout(rec.last_logits[0], TARGET, FOIL, True)  # noqa: E731
    L, N, T = 2, 12, 6
    ld = lambda logits: float(logits[FOIL] - logits[TARGET])  # noqa: E731
    for every in (False, True):
        est = attribution.estimate(model, base_ids, base, source, SITE, "logit-diff", TARGET, FOIL, r(src_rec),
                                   r(base), every)
        assert est.shape == ((L, N) if every else (L, N, T))
        ref = torch.zeros_like(est)
        for l in range(L):
            for n in range(N):
                for p in [None] if every else range(T):
                    at = slice(None) if p is None else p
                    b, d = base[SITE][l, 0, at, n], source[l, at, n] - base[SITE][l, 0, at, n]
                    m = []
                    for s in (1e-4, -1e-4):
                        with torch.no_grad():
                            patch = Patch(l, p, b + s * d, site=SITE, neuron=n)
                            logits, _ = model(base_ids, patch=patch, last_only=True)
                        m.append(ld(logits[0, -1]))
                    ref[(l, n) if every else (l, n, p)] = (m[0] - m[1]) / 2e-4
        scale = float(ref.abs().max())
        assert scale > 1e-3
        assert float((est - ref).abs().max()) <= 1e-5 * scale


def test_backward_bytes_bounds_what_autograd_keeps():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=64)).eval()
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    base = engines.record(model, ids, [SITE])
    r = torch.zeros(3)
    saved = saved_bytes(model, lambda: attribution.gradients(model, ids, base, SITE, "prob-diff", TARGET, FOIL, r, r))
    estimate = attribution.backward_bytes(model.config, 24, SITE, True)
    assert saved <= estimate <= 3 * saved, (saved, estimate)


# ----------------------------------------------------------------------------- the command line

MICHELLE = ["--clean", "Michelle Jones was a top-notch student. Michelle",
            "--corrupt", "Michelle Smith was a top-notch student. Michelle", "--target", "Jones", "--foil", "Smith"]


def cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*args, "--device", "cpu"])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("every", [False, True])
def test_cli_on_demo_names_writes_its_files(tmp_path, every):
    folder = tmp_path / "run"
    extra = ["--all-positions", "--direction", "noise"] if every else []
    rc, out, err = cli(["--model", "demo-names", *MICHELLE, "--site", SITE, *extra, "--out", str(folder)])
    assert rc == 0, err
    doc = json.loads((folder / "results.json").read_text())
    L, N = doc["n_layers"], len(doc["matrix"][0])
    m = np.array(doc["matrix"])
    assert doc["site"] == SITE and doc["all_positions"] is every
    assert doc["axes"] == (["layer", "neuron"] if every else ["layer", "neuron", "position"])
    assert m.shape == ((L, N) if every else (L, N, 11)) and N > 40
    base = doc["clean_value"] if every else doc["corrupt_value"]
    if not every:
        assert np.all(m[:, :, 0] == base)  # position 0 is the same token in both prompts: no-op
    rows = list(csv.reader(io.StringIO((folder / "results.csv").read_text())))
    assert rows[0][0] == ("layer" if every else "layer.neuron")
    columns = [f"neuron {n}" for n in range(N)] if every else [f"{i}:{t}" for i, t in enumerate(doc["tokens"])]
    assert rows[0][1:] == columns
    assert [r[0] for r in rows[1:]] == ([str(l) for l in range(L)] if every else
                                        [f"{l}.{n}" for l in range(L) for n in range(N)])
    np.testing.assert_array_equal(np.array([[float(v) for v in r[1:]] for r in rows[1:]]), m.reshape(len(rows) - 1, -1))
    assert (folder / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "report.html").read_text()
    assert "layer.neuron" in page and "the 40 whose patch moves the metric furthest" in page
    assert len(re.findall(r"<tr><th>\d+\.\d+</th>", page)) == 40  # the 40 strongest rows, not every neuron
    assert f"patches at {SITE}" in out and "strongest: layer " in out and ", neuron " in out
    # the strongest patch on the terminal is the matrix's
    first = next(line for line in out.splitlines() if "strongest:" in line)
    flat = np.argmax(np.abs(m - base))
    cell = np.unravel_index(flat, m.shape)
    assert f"layer {cell[0]}, neuron {cell[1]}" in first


@pytest.mark.parametrize("every", [False, True])
def test_heatmap_draws_the_strongest_neurons(every):
    """The figure's rows: the 40 (layer.neuron) with the largest |change| at any position, in layer
    order, as changes from the patched run's value, and the title says so; the page's table the same."""
    from patching.analyses.patch import report
    from patching.api import Pair, load, run
    res = run("patch", load("demo-names"), Pair(*[MICHELLE[i] for i in (1, 3, 5, 7)]), site=SITE,
              all_positions=every)
    spec, m = report.heatmap_spec(res), res.matrix
    L, N = m.shape[:2]
    rows = m.reshape(L * N, -1)
    want = sorted(np.argsort(-np.abs(rows - res.corrupt.value).max(axis=1), kind="stable")[:40])
    assert spec["yticks"][1] == [f"{i // N}.{i % N}" for i in want]
    np.testing.assert_allclose(spec["matrix"], rows[want] - res.corrupt.value)
    assert f"the 40 of {L * N} neurons that move it most" in spec["title"]
    assert ("at any position" in spec["title"]) is not every
    labels, shown, columns, total = report.drawn(res)
    assert labels == spec["yticks"][1] and total == L * N and len(columns) == (1 if every else m.shape[2])


def test_attribution_check_runs_on_the_cli(tiny_ckpt, tmp_path):
    rc, out, err = cli(["--model", str(tiny_ckpt), *MICHELLE, "--site", SITE, "--method", "attribution", "--check",
                        "--out", str(tmp_path / "a")])
    assert rc == 0, err
    doc = json.loads((tmp_path / "a" / "results.json").read_text())
    assert doc["axes"] == ["layer", "neuron", "position"] and doc["check"]["pearson"] > 0.5
    assert "neuron" in doc["check"]["max_abs_error_cell"]
    assert (tmp_path / "a" / "scatter.png").exists() and "check against the exact sweep" in out


def test_batch_with_neurons_writes_every_experiment(tmp_path):
    batch = tmp_path / "b.yaml"
    batch.write_text("defaults: {model: demo-names, site: mlp_post}\nexperiments:\n"
                     "  - {clean: Michelle Jones was a top-notch student. Michelle, corrupt: Michelle Smith was a "
                     "top-notch student. Michelle, target: Jones, foil: Smith}\n"
                     "  - {clean: Jessica Smith was a top-notch student. Jessica, corrupt: Jessica Jones was a "
                     "top-notch student. Jessica, target: Smith, foil: Jones, overrides: {all_positions: true}}\n")
    rc, out, err = cli(["--batch", str(batch), "--out", str(tmp_path / "out")])
    assert rc == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    text = json.dumps(summary)
    assert text.count('"ok"') >= 2 and '"neuron"' in text
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "head or neuron" in md


@pytest.mark.parametrize("args, message", [
    (["--site", "mlp_out", "--all-positions"], "needs a head site (q, k, v, pattern, z) or a neuron site (mlp_post)"),
    (["--site", SITE, "--check"], "--method attribution"),
    (["--site", "mlp_pre"], "invalid choice"),
])
def test_bad_flags_are_one_line(tiny_ckpt, tmp_path, args, message):
    rc, _, err = cli(["--model", str(tiny_ckpt), *MICHELLE, *args, "--out", str(tmp_path / "x")])
    assert rc in (1, 2) and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or rc == 2  # argparse's usage line comes first
    assert not (tmp_path / "x").exists()


def test_a_study_of_neurons_is_refused_in_one_line(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("defaults: {model: demo-names}\nanalysis: {kind: patch, site: mlp_post}\nexperiments:\n"
                     "  - {clean: Michelle Jones was a top-notch student. Michelle, corrupt: Michelle Smith was a "
                     "top-notch student. Michelle, target: Jones, foil: Smith}\n")
    rc, _, err = cli(["--batch", str(study), "--out", str(tmp_path / "out")])
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "a study cannot aggregate mlp_post" in err and "plain batch" in err
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"clean": "Michelle Jones was a top-notch student. Michelle", "corrupt":
                                 "Michelle Smith was a top-notch student. Michelle", "target": "Jones",
                                 "foil": "Smith"}) + "\n")
    rc, _, err = cli(["--pairs", str(pairs), "--model", "demo-names", "--site", SITE, "--out", str(tmp_path / "o2")])
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "a study cannot aggregate mlp_post" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()

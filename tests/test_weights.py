"""`patch-run weights` against references written here, from the Hugging Face state dict, in float64.

Nothing of patching or mingpt computes an expected value: every reference builds the plain matrices of
the definitions (W_OV = W_V W_O and W_QK = W_Q W_K^T / sqrt(d_head) per head, d_model x d_model, with
ln_1's scale folded in; W_U = diag(gamma_f) W_E^T) from transformers' Conv1D weights and takes
eigenvalues and Frobenius norms with numpy. On a model with a 96-token vocabulary the copying score
is checked against the eigenvalues of the full 96 x 96 OV circuit (the analysis never builds it); the
positional scores are recomputed with transformers' own ln_1 module (bias zeroed) and an explicit
per-row softmax loop.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close, draw_biases, hf_model
from mingpt.model import GPT
from patching.api import USER_ERRORS, ModelSpec, Prompt, load, run
from patching.analyses import weights
from patching.cli import main
from patching.core.context import Context

SCORE = 1.0  # every score is a ratio of magnitude <= 1: the scale its float32 rounding is measured against


# ----------------------------------------------------------------------------- models and the reference


@torch.no_grad()
def small_vocab_checkpoint(folder: Path, *, n_layer=3, n_head=6, n_embd=24, vocab=96, seed=7) -> Path:
    """A random GPT-2 with a 96-token vocabulary (full vocab x vocab circuits are small), every LayerNorm
    gain and bias drawn (a folding bug moves every score), weights large enough for sharp softmaxes."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=32, vocab_size=vocab,
                     initializer_range=0.3)
    model = GPT2LMHeadModel(cfg).eval()
    draw_biases(model, seed, 0.3)
    for block in model.transformer.h:
        block.ln_1.weight.normal_(1.0, 0.3)  # gains far from 1, so folding them on the wrong side shows
    model.save_pretrained(folder)
    return folder


def context_of(folder: Path) -> Context:
    """A Context of a checkpoint without tokenizer files (no --tokens on it)."""
    return Context(GPT.from_pretrained(str(folder)), None, ModelSpec(model=str(folder), device="cpu"))


def reference(folder: Path) -> dict:
    """float64 numpy matrices of the definitions, from transformers' state dict (Conv1D: x @ W, (in, out))."""
    hf = hf_model(folder)
    sd = {k: v.double().numpy() for k, v in hf.state_dict().items()}
    cfg = hf.config
    L, H, C = cfg.n_layer, cfg.n_head, cfg.n_embd
    hs = C // H
    ov, qk, q, k = {}, {}, {}, {}
    for l in range(L):
        g = sd[f"transformer.h.{l}.ln_1.weight"]
        w = sd[f"transformer.h.{l}.attn.c_attn.weight"]  # (C, 3C)
        wo = sd[f"transformer.h.{l}.attn.c_proj.weight"]  # (C, C)
        for h in range(H):
            cols = slice(h * hs, (h + 1) * hs)
            wq, wk, wv = (np.diag(g) @ w[:, i * C:(i + 1) * C][:, cols] for i in range(3))
            q[l, h], k[l, h] = wq, wk
            ov[l, h] = wv @ wo[cols, :]
            qk[l, h] = wq @ wk.T / math.sqrt(hs)
    we = sd["transformer.wte.weight"]
    wu = np.diag(sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T
    return {"hf": hf, "sd": sd, "L": L, "H": H, "C": C, "hs": hs, "ov": ov, "qk": qk, "q": q, "k": k,
            "we": we, "wu": wu, "eps": cfg.layer_norm_epsilon}


def copying_of(eigenvalues: np.ndarray) -> float:
    return float(eigenvalues.sum().real / np.abs(eigenvalues).sum())


def fro(m: np.ndarray) -> float:
    return float(np.linalg.norm(m, "fro"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = small_vocab_checkpoint(tmp_path_factory.mktemp("small-vocab"))
    ctx = context_of(folder)
    return {"ctx": ctx, "ref": reference(folder), "folder": folder,
            "result": run("weights", ctx, positions=24)}


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    return {"ctx": ctx, "ref": reference(tiny_ckpt), "ckpt": tiny_ckpt,
            "result": run("weights", ctx, tokens=["Jones", "=.", " the"], heads=["1.2", "0.1", "1.2"], top_k=7,
                          positions=20)}


@pytest.fixture(scope="module")
def demo():
    ctx = load(ModelSpec(model="demo-induction", device="cpu"))
    return {"ctx": ctx, "result": run("weights", ctx, tokens=["Jones"])}


# ----------------------------------------------------------------------------- copying


def test_copying_equals_the_eigenvalues_of_the_full_vocab_matrix(small):
    ref, r = small["ref"], small["result"]
    want = np.array([[copying_of(np.linalg.eigvals(ref["we"] @ ref["ov"][l, h] @ ref["wu"]))  # 96 x 96
                      for h in range(ref["H"])] for l in range(ref["L"])])
    assert r.copying.shape == (ref["L"], ref["H"])
    assert_close(r.copying, want, scale=SCORE, what="copying score vs the full OV circuit's eigenvalues")
    assert np.ptp(want) > 0.1  # the heads differ, so the comparison is not met by a constant


def test_copying_equals_the_d_model_route_on_gpt2s_vocabulary(tiny):
    """With 50257 tokens the full matrix is out of reach: W_OV W_U W_E (d_model x d_model) has the same
    non-zero eigenvalues, by another route than the analysis's d_head x d_head one."""
    ref, r = tiny["ref"], tiny["result"]
    ue = ref["wu"] @ ref["we"]
    want = np.array([[copying_of(np.linalg.eigvals(ref["ov"][l, h] @ ue)) for h in range(ref["H"])]
                     for l in range(ref["L"])])
    assert_close(r.copying, want, scale=SCORE, what="copying score vs the d_model route")


@torch.no_grad()
def test_a_head_built_to_copy_scores_one_and_its_negation_minus_one(tmp_path):
    """With W_V^h folded (diag(gamma_1) W_V), W_O^h = (W_V^h)^T and gamma_f = 1 make W_E W_OV W_U = P P^T
    (P = W_E W_V^h): positive semi-definite, every eigenvalue >= 0, copying score 1; minus that W_O: -1."""
    folder = small_vocab_checkpoint(tmp_path / "m", n_layer=1, n_head=2, n_embd=16)
    ctx = context_of(folder)
    model = ctx.model
    block, hs = model.transformer.h[0], 8
    model.transformer.ln_f.weight.fill_(1.0)
    g = block.ln_1.weight
    wv = block.attn.c_attn.weight[32:48].T * g[:, None]  # (C in, C out): folded W_V of both heads
    proj = block.attn.c_proj.weight  # (C out, C in); W_O^h = proj[:, head's columns].T
    proj[:, 0:hs] = wv[:, 0:hs]  # head 0: W_O^h = (W_V^h)^T
    proj[:, hs:2 * hs] = -wv[:, hs:2 * hs]  # head 1: its negation
    r = run("weights", ctx, positions=8)
    assert_close(r.copying, [[1.0, -1.0]], scale=SCORE, what="constructed copying heads")


# ----------------------------------------------------------------------------- positional QK


@torch.no_grad()
def positional_reference(ref: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(L, H, n, n) logits and (L, H) previous-token scores: transformers' ln_1 (bias zeroed) on W_pos's rows,
    its c_attn without bias, and a softmax written out row by row over sources 0..d."""
    hf, L, H, hs = ref["hf"], ref["L"], ref["H"], ref["hs"]
    logits, prev = np.zeros((L, H, n, n)), np.zeros((L, H))
    pos = hf.transformer.wpe.weight[:n].double()
    for l, block in enumerate(hf.transformer.h):
        ln = torch.nn.LayerNorm(ref["C"], eps=block.ln_1.eps).double()
        ln.weight.copy_(block.ln_1.weight)
        ln.bias.zero_()
        x = ln(pos)
        w = block.attn.c_attn.weight.double()
        qs, ks = x @ w[:, :ref["C"]], x @ w[:, ref["C"]:2 * ref["C"]]
        for h in range(H):
            cols = slice(h * hs, (h + 1) * hs)
            m = (qs[:, cols] @ ks[:, cols].T / math.sqrt(hs)).numpy()
            logits[l, h] = m
            weights_on_previous = []
            for d in range(1, n):
                row = [math.exp(m[d, s] - max(m[d, :d + 1])) for s in range(d + 1)]
                weights_on_previous.append(row[d - 1] / sum(row))
            prev[l, h] = sum(weights_on_previous) / len(weights_on_previous)
    return logits, prev


@pytest.mark.parametrize("which", ["small", "tiny"])
def test_positional_qk_and_previous_token_scores_equal_an_explicit_computation(which, small, tiny):
    case = {"small": small, "tiny": tiny}[which]
    r = case["result"]
    n = r.options.positions
    logits, prev = positional_reference(case["ref"], n)
    assert r.positional_qk.shape == logits.shape
    assert_close(r.positional_qk, logits, what="positional QK logits")  # scale: the logits themselves
    assert_close(r.previous_token, prev, scale=SCORE, what="previous-token score from weights")
    assert np.ptp(prev) > 0.05 and np.abs(logits).max() > 1.0  # sharp enough to tell heads apart


# ----------------------------------------------------------------------------- composition


def test_composition_scores_equal_the_definitions_in_float64(small):
    ref, r = small["ref"], small["result"]
    L, H = ref["L"], ref["H"]
    want = {k: np.full((L, H, L, H), np.nan) for k in weights.KINDS}
    for a in range(L):
        for b in range(H):
            for x in range(a + 1, L):
                for y in range(H):
                    ov1, qk2, ov2 = ref["ov"][a, b], ref["qk"][x, y], ref["ov"][x, y]
                    want["q"][a, b, x, y] = fro(ov1 @ qk2) / (fro(ov1) * fro(qk2))
                    want["k"][a, b, x, y] = fro(ov1 @ qk2.T) / (fro(ov1) * fro(qk2))
                    want["v"][a, b, x, y] = fro(ov1 @ ov2) / (fro(ov1) * fro(ov2))
    for k in weights.KINDS:
        assert_close(r.composition[k], want[k], scale=SCORE, what=f"{k}-composition")  # NaN exactly where l1 >= l2
        assert np.nanmax(want[k]) - np.nanmin(want[k]) > 0.05
    assert not np.allclose(want["q"], want["k"], equal_nan=True)  # Q and K really read different sides


def test_composition_of_gpt2s_vocabulary_model_equals_the_definitions(tiny):
    ref, r = tiny["ref"], tiny["result"]
    for b in range(ref["H"]):
        for y in range(ref["H"]):
            ov1, qk2, ov2 = ref["ov"][0, b], ref["qk"][1, y], ref["ov"][1, y]
            got = [r.composition[k][0, b, 1, y] for k in weights.KINDS]
            want = [fro(ov1 @ qk2) / (fro(ov1) * fro(qk2)), fro(ov1 @ qk2.T) / (fro(ov1) * fro(qk2)),
                    fro(ov1 @ ov2) / (fro(ov1) * fro(ov2))]
            assert_close(got, want, scale=SCORE, what=f"composition 0.{b} -> 1.{y}")


def test_the_random_baseline_matches_an_independent_monte_carlo(small):
    """numpy's own generator, full d_model x d_model products, all three kinds: the same distribution."""
    r, C, hs = small["result"], small["ref"]["C"], small["ref"]["hs"]
    rng = np.random.default_rng(12345)
    n = 400
    kinds = {"q": [], "k": [], "v": []}
    for _ in range(n):
        a = rng.standard_normal((C, hs)) @ rng.standard_normal((hs, C))  # W_V W_O
        b = rng.standard_normal((C, hs)) @ rng.standard_normal((hs, C))  # W_Q W_K^T (or a second W_V W_O)
        kinds["q"].append(fro(a @ b) / (fro(a) * fro(b)))
        kinds["k"].append(fro(a @ b.T) / (fro(a) * fro(b)))
        kinds["v"].append(fro(b @ a) / (fro(a) * fro(b)))  # a sender's W_OV into a receiver's W_OV
    b = r.baseline
    assert b["samples"] == weights.BASELINE_SAMPLES and b["std"] > 0
    for k, s in kinds.items():
        s = np.array(s)
        se = math.sqrt(b["std"] ** 2 / b["samples"] + s.var(ddof=1) / n)
        assert abs(b["mean"] - s.mean()) < 5 * se, (k, b["mean"], s.mean(), se)
        assert abs(b["std"] - s.std(ddof=1)) < 0.3 * s.std(ddof=1)


# ----------------------------------------------------------------------------- token tables


def test_token_rows_equal_the_full_circuits(tiny):
    ref, r, tok = tiny["ref"], tiny["result"], tiny["ctx"].tok
    ids = {" Jones": 5437, ".": 13, " the": 262}
    assert [head for head in r.heads] == [(1, 2), (0, 1)]  # in the order given, once each
    assert [(row.head, row.token) for row in r.rows] == [(h, t) for h in r.heads for t in ids]
    for row in r.rows:
        l, h = row.head
        e = ref["we"][ids[row.token]]
        ov = e @ ref["ov"][l, h] @ ref["wu"]  # (V,)
        qk = e @ ref["qk"][l, h] @ ref["we"].T
        for got, want in ((row.ov, ov), (row.qk, qk)):
            order = np.argsort(-want)[:7]
            assert [i for i, _ in got] == order.tolist()
            assert_close([v for _, v in got], want[order], scale=float(np.abs(want).max()), what="token row")
        assert row.ov_self_rank == 1 + int((ov > ov[row.id]).sum())
        assert row.id == ids[row.token] and tok.token_str(row.id) == row.token


# ----------------------------------------------------------------------------- the demo model's story


def test_demo_induction_shows_the_induction_circuit_in_its_weights(demo):
    """Block 0's head is the previous-token head, block 1's copies, and it reads block 0's output through
    its key: the circuit `patch-run heads` finds by running the model, read off the weights alone."""
    r = demo["result"]
    assert np.unravel_index(np.argmax(r.previous_token), r.previous_token.shape) == (0, 0)
    assert r.previous_token[0, 0] > 0.9 > 0.1 > r.previous_token[1, 0]
    assert r.copying[1, 0] > 0.9
    b = r.baseline
    q, k, v = (r.composition[x][0, 0, 1, 0] for x in weights.KINDS)
    assert k > b["mean"] + 20 * b["std"] and k > 5 * max(q, v)
    (row,) = [row for row in r.rows if row.head == (1, 0)]
    assert row.ov[0][0] == 5437 and row.ov_self_rank == 1  # attending to ' Jones', it raises ' Jones'


# ----------------------------------------------------------------------------- command line, files, errors


def cli(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["weights", *argv, "--device", "cpu"])
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


@pytest.fixture(scope="module")
def demo_cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "w"
    return {"run": cli(["--model", "demo-induction", "--tokens", "Jones", "--out", str(out)]), "out": out}


def test_cli_writes_the_documented_files(demo_cli, demo):
    run_, out, r = demo_cli["run"], demo_cli["out"], demo["result"]
    assert run_["rc"] == 0 and run_["stderr"] == "", run_
    assert "K: 0.0->1.0 0.280" in run_["stdout"] and "rank 1" in run_["stdout"]
    names = {p.name for p in out.iterdir()}
    assert names == {".patch-run.json", "results.json", "results.csv", "composition.csv", "positional_qk.npy",
                     "copying.png", "previous_token.png", "composition.png", "positional_qk.png", "weights.html"}
    for p in ("copying.png", "previous_token.png", "composition.png", "positional_qk.png"):
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "results.json").read_text())
    assert doc["analysis"] == "weights" and doc["model"] == "demo-induction" and doc["positions"] == 64
    assert set(doc["fold"]) == {"ln_1", "ln_f", "left_out", "positional"}
    # the command line ran the same computation as the Python call
    np.testing.assert_array_equal(np.array(doc["copying"]), r.copying)
    np.testing.assert_array_equal(np.array(doc["previous_token_from_weights"]), r.previous_token)
    for k in weights.KINDS:
        nested = doc["composition"][k]  # [l1][h1][l2][h2], null where l1 >= l2
        assert nested[0][0][0] == [None] and nested[1][0][0] == [None] and nested[1][0][1] == [None]
        assert nested[0][0][1][0] == r.composition[k][0, 0, 1, 0]
    assert doc["baseline"]["mean"] == r.baseline["mean"] and doc["top"]["composition"]["k"][0]["sender"] == "0.0"
    (row,) = [t for t in doc["tokens"] if t["head"] == "1.0"]
    assert row["token"] == " Jones" and row["ov"]["top"][0] == {"token": " Jones", "id": 5437,
                                                                "value": row["ov"]["top"][0]["value"]}
    npy = np.load(out / "positional_qk.npy")
    assert npy.shape == (2, 1, 64, 64) and npy.dtype == np.float32
    np.testing.assert_array_equal(npy, r.positional_qk.astype(np.float32))
    page = (out / "weights.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and "http" not in page.replace("http-equiv", "")
    assert "0.280" in page or "0.2799" in page
    rows = (out / "composition.csv").read_text().splitlines()
    assert rows[0] == "sender_layer,sender_head,receiver_layer,receiver_head,q,k,v" and len(rows) == 2


def test_many_heads_get_one_positional_png_per_layer(small):
    r = small["result"]  # 3 layers x 6 heads: more than fit one grid
    files = weights.files(r, figures=True)
    pngs = sorted(n for n in files if n.endswith(".png"))
    assert pngs == ["composition.png", "copying.png", "positional_qk_layer00.png", "positional_qk_layer01.png",
                    "positional_qk_layer02.png", "previous_token.png"]
    assert not any(n.endswith(".png") for n in weights.files(r, figures=False))


def test_a_one_layer_model_has_no_composition(tmp_path):
    ctx = context_of(small_vocab_checkpoint(tmp_path / "one", n_layer=1, n_head=2, n_embd=16))
    r = run("weights", ctx, positions=4)
    assert all(np.isnan(c).all() for c in r.composition.values())
    assert "composition: none (one layer)" in "\n".join(weights.Weights().lines(r))
    assert r.to_json()["top"]["composition"] == {"q": [], "k": [], "v": []}


@pytest.mark.parametrize("argv,says", [
    (["--heads", "5.3"], "head 5.3 does not exist: demo-induction has layers 0..1 and heads 0..0"),
    (["--heads", "1"], "--heads '1' is not a head: write LAYER.HEAD"),
    (["--positions", "0"], "positions must be an integer at least 2, got 0"),
    (["--positions", "1"], "positions must be an integer at least 2, got 1"),
    (["--positions", "129"], "--positions 129 is more than the model's context of 128 positions"),
    (["--tokens", "Jonesberry"], "the --tokens entry ' Jonesberry' is 2 tokens"),
    (["--top-k", "0"], "top_k must be an integer between 1 and 100"),
])
def test_bad_input_is_one_line_and_nonzero_exit(tmp_path, argv, says):
    r = cli(["--model", "demo-induction", *argv, "--out", str(tmp_path / "out")])
    assert r["rc"] == 1
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("patch-run: error: ") and says in lines[0], r["stderr"]
    assert not (tmp_path / "out").exists()


def test_bad_input_from_python_is_one_sentence(demo):
    ctx = demo["ctx"]
    with pytest.raises(USER_ERRORS, match="runs on no input"):
        run("weights", ctx, Prompt("Michelle Jones"))
    with pytest.raises(USER_ERRORS, match=r"heads must be a list of text entries in quotes"):
        run("weights", ctx, heads=[1.0])  # YAML reads 1.10 as the number 1.1
    with pytest.raises(USER_ERRORS, match="--heads is empty"):
        run("weights", ctx, heads=[])
    with pytest.raises(USER_ERRORS, match="unknown key 'layers'"):
        run("weights", ctx, layers=[0])


def test_a_batch_runs_it_and_summarises_the_strongest_heads(tmp_path):
    import yaml
    batch = tmp_path / "b.yaml"
    batch.write_text(yaml.safe_dump({"defaults": {"model": "demo-induction", "positions": 16}, "experiments": [
        {"name": "a", "overrides": {"heads": ["1.0"], "tokens": ["Jones"]}},
        {"name": "b", "overrides": {"heads": [1.0]}}]}))  # YAML's 1.0 is a number, not the head '1.0'
    r = cli(["--batch", str(batch), "--out", str(tmp_path / "out"), "--quiet"])
    assert r["rc"] == 1 and "1 ok, 1 failed" in r["stdout"], r
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["experiments"]
    assert rows[0]["status"] == "ok" and rows[0]["top_k_composition"][0]["sender"] == "0.0"
    assert "heads must be a list of text entries in quotes" in rows[1]["reason"]
    doc = json.loads((tmp_path / "out" / "a" / "results.json").read_text())
    assert doc["positions"] == 16 and doc["heads"] == ["1.0"] and [t["head"] for t in doc["tokens"]] == ["1.0"]
    assert "| a | ok | L1H0 0.998 | L0H0 1.000 | 0.0->1.0 0.280 (baseline 0.125) |" in \
        (tmp_path / "out" / "summary.md").read_text()

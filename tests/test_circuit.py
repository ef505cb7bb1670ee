"""The circuit analysis beyond its reference (tests/test_circuit_reference.py): identities, the
demo-names story, the files, hypotheses, bad input and a study.

- On a model made linear (no LayerNorm, identity MLP activation, uniform attention) EAP is exact, and
  exact per-position scores sum to the summed score.
- The full graph's circuit run is the clean run, the empty graph's the ablated run (f = 1 and 0).
- On demo-names the top edges are the story path patching tells (the block-1 head copies the name
  it reads through its value input to the logits) and <= 10 of them reach f >= 0.95.
- A hypothesis's per-edge removal cost is f(C) - f(C without the edge), each from its own circuit run.
- report.html is self-contained, shows prompts as text, and renders in Chromium.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import yaml

from conftest import CHROMIUM, assert_close, browser_page, make_checkpoint
from patching.analyses.circuit.faithful import circuit_metric
from patching.analyses.circuit.graph import Graph
from patching.api import USER_ERRORS, ModelSpec, Pair, load, run
from patching.cli import main

CLEAN = "Michelle Jones was a top-notch student. Michelle"
CORRUPT = "Michelle Smith was a top-notch student. Michelle"
PAIR = Pair(CLEAN, CORRUPT, "Jones", "Smith")
WIDE = Pair(CLEAN, "Jessica Smith was a top-notch student. Jessica", "Jones", "Smith")  # input reaches the logits


def cli(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["circuit", *argv, "--device", "cpu"])
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(ModelSpec(model=str(make_checkpoint(tmp_path_factory.mktemp("c"), init_std=0.2)), device="cpu"))


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    """A checkpoint whose model is linear in its embeddings: LayerNorms replaced by identities, q and k
    zero (uniform causal attention), the MLP's activation the identity."""
    ctx = load(ModelSpec(model=str(make_checkpoint(tmp_path_factory.mktemp("lin"), seed=3, init_std=0.2)), device="cpu"))
    m, C = ctx.model, ctx.config.n_embd
    with torch.no_grad():
        for block in m.transformer.h:
            block.ln_1, block.ln_2 = torch.nn.Identity(), torch.nn.Identity()
            block.attn.c_attn.weight[:2 * C] = 0
            block.attn.c_attn.bias[:2 * C] = 0
            block.mlp.act = torch.nn.Identity()
        m.transformer.ln_f = torch.nn.Identity()
    return ctx


@pytest.fixture(scope="module")
def demo_names():
    return load(ModelSpec(model="demo-names", device="cpu"))


def test_eap_is_exact_on_a_linear_model_and_exact_positions_sum_there(linear):
    ex = run("circuit", linear, WIDE, method="exact", per_position=True)
    ea = run("circuit", linear, WIDE, method="eap", per_position=True)
    scale = max(abs(ex.clean_value), abs(ex.corrupt_value))
    assert np.abs(ex.summed).max() > 1e-3 * scale  # the scores are not all zero
    assert_close(ea.scores, ex.scores, scale=scale, what="eap vs exact, per position")
    assert_close(ex.scores.sum(-1), run("circuit", linear, WIDE, method="exact").scores, scale=scale,
                 what="exact positions summed")


@pytest.mark.parametrize("ablation", ["corrupt", "zero", "mean"])
def test_the_full_graph_is_the_clean_run_and_the_empty_graph_the_ablated_one(tiny, ablation):
    r = run("circuit", tiny, WIDE, method="eap", ablation=ablation)
    scale = max(abs(r.clean_value), abs(r.corrupt_value))
    assert_close(r.full_value, r.clean_value, scale=scale, what="m(full)")
    if ablation == "corrupt":
        assert_close(r.empty_value, r.corrupt_value, scale=scale, what="m(empty)")
    f = {p["n_edges"]: p["value"] for p in r.faithfulness}
    assert f[len(r.graph)] == 1.0  # the whole graph is the full circuit
    E = len(r.graph)
    assert_close(circuit_metric(tiny, WIDE, np.zeros(E, bool), ablation), r.empty_value, scale=scale, what="empty")


def test_demo_names_top_edges_are_the_path_patching_story(demo_names):
    r = run("circuit", demo_names, PAIR, target_faithfulness=0.95)
    names = [r.graph.names[i] for i in r.ranking[:2]]
    assert set(names) == {"a1.h0->logits", "input->a1.h0<v>"}, names  # the mover's value in, its output out
    assert r.circuit["n_edges"] <= 10 and r.circuit["value"] >= 0.95, r.circuit
    # path patching from head 1.0 to the logits gives the same direct effect as the edge's exact score
    p = run("path", demo_names, PAIR, sender="1.0", receivers=["logits"], freeze_mlps=True)
    assert_close(p.value - p.base_value, r.summed[r.graph.index["a1.h0->logits"]], scale=abs(p.base_value),
                 what="a1.h0->logits vs path patching with MLPs frozen")


def test_files_hypothesis_and_check(tiny, tmp_path):
    g = Graph.of(tiny.config)
    hyp = tmp_path / "h.yaml"
    hyp.write_text(yaml.safe_dump({"edges": ["a1.h*->logits", "input->a1.h0<v>", "a0.h2->m0"]}))
    r = cli(["--model", tiny.spec.model, "--clean", WIDE.clean, "--corrupt", WIDE.corrupt, "--target", "Jones",
             "--foil", "Smith", "--method", "eap", "--check", "--hypothesis", str(hyp), "--out", str(tmp_path / "o")])
    assert r["rc"] == 0, r
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    for key in ("graph", "edges", "method", "metric", "direction", "clean_value", "corrupt_value", "ranking",
                "faithfulness", "cpr", "cmd", "hypothesis", "check"):
        assert key in doc, key
    assert len(doc["edges"]) == len(g) and sorted(doc["ranking"]) == sorted(g.names)
    assert [p["fraction"] for p in doc["faithfulness"]][-1] == 1.0
    assert doc["hypothesis"]["n_edges"] == g.n_head + 2
    # each removal cost is f(C) - f(C without that edge), from circuit runs made here
    mask = np.isin(g.names, list(doc["hypothesis"]["removal_cost"]))
    full, empty = doc["full_value"], doc["empty_value"]
    f = lambda m: (circuit_metric(tiny, WIDE, m) - empty) / (full - empty)  # noqa: E731
    assert_close(doc["hypothesis"]["faithfulness"], f(mask), scale=1.0, what="hypothesis f")
    for name, cost in doc["hypothesis"]["removal_cost"].items():
        less = mask.copy()
        less[g.index[name]] = False
        assert_close(cost, f(mask) - f(less), scale=max(1.0, abs(f(mask))), what=name)
    assert -1 <= doc["check"]["pearson"] <= 1 and len(doc["check"]["exact"]) == len(g)
    mib = json.loads((tmp_path / "o" / "circuit.json").read_text())
    assert set(mib) == {"cfg", "nodes", "edges"} and set(mib["edges"]) == set(g.names)
    assert sum(e["in_graph"] for e in mib["edges"].values()) == doc["circuit"]["n_edges"]
    root = ET.fromstring((tmp_path / "o" / "circuit.svg").read_text())  # well-formed SVG
    assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}line")) >= 1
    assert (tmp_path / "o" / "circuit.dot").read_text().startswith("digraph")
    assert (tmp_path / "o" / "faithfulness.png").read_bytes()[:4] == b"\x89PNG"
    # a MIB circuit file is a hypothesis too: the same edges give the same faithfulness
    again = run("circuit", tiny, WIDE, method="eap", hypothesis=str(tmp_path / "o" / "circuit.json"))
    assert again.hypothesis["n_edges"] == doc["circuit"]["n_edges"]
    assert_close(again.hypothesis["faithfulness"], doc["circuit"]["value"], scale=1.0, what="circuit.json round trip")


@pytest.mark.parametrize("content, message", [
    ({"edges": ["a9.h0->logits"]}, "names no edge"),
    ({"edges": ["a1.h0->a0.h0<q>"]}, "names no edge"),
    ({"nodes": ["a0.h7"]}, "names no node"),
    ({"edges": ["input-logits"]}, "is not an edge"),
    ({"edges": [], "nodes": []}, "one key"),
])
def test_a_bad_hypothesis_is_one_line_and_writes_nothing(tiny, tmp_path, content, message):
    hyp = tmp_path / "h.yaml"
    hyp.write_text(yaml.safe_dump(content))
    r = cli(["--model", tiny.spec.model, "--clean", CLEAN, "--corrupt", CORRUPT, "--target", "Jones", "--foil", "Smith",
             "--method", "eap", "--hypothesis", str(hyp), "--out", str(tmp_path / "o")])
    assert r["rc"] == 1 and message in r["stderr"] and len(r["stderr"].splitlines()) == 1, r
    assert "Traceback" not in r["stderr"] and not (tmp_path / "o").exists()


def test_other_bad_input_is_one_line(tiny, demo_names, tmp_path):
    base = ["--clean", CLEAN, "--corrupt", CORRUPT, "--target", "Jones", "--foil", "Smith"]
    r = cli(["--model", tiny.spec.model, *base, "--method", "eap-ig-inputs", "--ig-steps", "0", "--out", str(tmp_path / "a")])
    assert r["rc"] != 0 and "ig_steps" in r["stderr"] and not (tmp_path / "a").exists(), r
    # a circuit file of another model (demo-names: 2 layers x 1 head) on the tiny model (2 x 4)
    other = run("circuit", demo_names, PAIR, method="eap")
    from patching.analyses.circuit import circuit_json
    (tmp_path / "c.json").write_text(json.dumps(circuit_json(other)))
    r = cli(["--model", tiny.spec.model, *base, "--method", "eap", "--hypothesis", str(tmp_path / "c.json"),
             "--out", str(tmp_path / "b")])
    assert r["rc"] == 1 and "not this one's" in r["stderr"] and not (tmp_path / "b").exists(), r
    with pytest.raises(USER_ERRORS, match="--check compares"):
        run("circuit", tiny, PAIR, check=True)


def test_a_circuit_study_averages_the_scores_of_its_pairs(tiny, tmp_path):
    pairs = [{"clean": CLEAN, "corrupt": CORRUPT, "target": "Jones", "foil": "Smith"},
             {"clean": WIDE.clean, "corrupt": WIDE.corrupt, "target": "Jones", "foil": "Smith"}]
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"defaults": {"model": tiny.spec.model}, "analysis": {"kind": "circuit", "method": "eap"},
                                    "experiments": pairs, "study": {"bootstrap": 200}}))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--batch", str(spec), "--out", str(tmp_path / "st"), "--device", "cpu", "--quiet"])
    assert rc == 0, err.getvalue()
    agg = json.loads((tmp_path / "st" / "aggregate.json").read_text())
    want = np.mean([run("circuit", tiny, Pair(**p), method="eap").matrix for p in pairs], axis=0)
    assert set(agg["scalars"]) >= {"faithfulness_of_circuit", "cpr", "cmd"} and agg["n_pairs"] == 2
    got = np.array([[np.nan if v is None else v for v in row] for row in agg["raw_mean"]], dtype=np.float64)
    assert_close(got, want, scale=float(np.nanmax(np.abs(want))), what="study mean")



def test_report_page_is_self_contained_escaped_and_renders(tiny, tmp_path):
    hyp = tmp_path / "h.yaml"
    hyp.write_text(yaml.safe_dump({"edges": ["a1.h*->logits", "input->a1.h0<v>"]}))
    clean, corrupt = "<b>Michelle</b> Jones was a student. Michelle", "<b>Jessica</b> Smith was a student. Jessica"
    r = cli(["--model", tiny.spec.model, "--clean", clean, "--corrupt", corrupt, "--target", "Jones", "--foil", "Smith",
             "--method", "eap", "--check", "--hypothesis", str(hyp), "--out", str(tmp_path / "o")])
    assert r["rc"] == 0, r
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    page = (tmp_path / "o" / "report.html").read_text()
    assert "<b>Michelle" not in page and "&lt;b&gt;Michelle" in page  # prompts are text, never markup
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert [u for u in refs if re.match(r"^[a-z]+:", u) and not u.startswith("data:")] == []
    top = doc["ranking"][0].replace("<", "&lt;").replace(">", "&gt;")
    assert top in page and f"{doc['cpr']:.4g}" in page and f"{doc['hypothesis']['faithfulness']:.4g}" in page
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium): the page was checked as text only")
    with browser_page(tmp_path / "o" / "report.html") as (p, problems, requests):
        images = p.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) == 2 and all(done and w > 0 for done, w in images), images  # curve and scatter
        assert p.locator("svg line").count() >= 1  # the circuit, inline
        removal = p.locator("table.sortable").nth(1).locator("tbody tr")
        assert removal.count() == doc["hypothesis"]["n_edges"]
        assert problems == [] and all(u.startswith(("file:", "data:")) for u in requests), (problems, requests)

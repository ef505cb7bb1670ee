"""Tests of YAML batches (patching.study.batch through the patch-run CLI), offline on the tiny checkpoint.

The batch main() runs in-process so the model loader and the pipeline can be wrapped or made to
raise Ctrl-C; the mixed good/bad batch runs once per module.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import patching.analyses.patch.report
import patching.study.batch
from conftest import assert_close, openai_vocab_dir
from mingpt.bpe import BPETokenizer
from patching import analyses
from patching.analyses.patch import Patching
from patching.study.batch import Experiment, read_batch
from patching.cli import main

REPO = Path(__file__).resolve().parents[1]
MICHELLE = {"clean": "Michelle Jones was a top-notch student. Michelle",
            "corrupt": "Michelle Smith was a top-notch student. Michelle", "target": "Jones", "foil": "Smith"}
JESSICA = {"clean": "Jessica Smith was a top-notch student. Jessica",
           "corrupt": "Jessica Jones was a top-notch student. Jessica", "target": "Smith", "foil": "Jones"}


def run_main(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([*argv, "--device", "cpu"])
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def write_yaml(path: Path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False) if not isinstance(doc, str) else doc)
    return path


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with (kind, size, mtime): a snapshot to compare before/after."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            snap[str(p.relative_to(root))] = (p.is_dir(), 0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return snap


def json_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


# ----------------------------------------------------------------------------- a mixed batch, end to end


EXPERIMENTS = [
    {"name": "good-logit", **MICHELLE},
    {"name": "good-prob", **JESSICA, "overrides": {"metric": "prob-diff"}},
    {"name": "/etc/x", **MICHELLE, "corrupt": "Michelle Jonesy was a top-notch student. Michelle"},
    {"name": "no-foil", **{k: v for k, v in MICHELLE.items() if k != "foil"}},
    {"name": "extra-key", **MICHELLE, "colour": "red"},
    {"name": "../../evil", **MICHELLE},
    {"name": "bad-override", **MICHELLE, "overrides": {"metrik": "prob-diff"}},
]
STATUS = ["ok", "ok", "failed", "failed", "failed", "ok", "failed"]


@pytest.fixture(scope="module")
def mixed(tiny_ckpt, tmp_path_factory):
    base = tmp_path_factory.mktemp("batch_mixed")
    spec = write_yaml(base / "pairs.yaml", {"defaults": {"model": str(tiny_ckpt), "top_k": 5},
                                            "experiments": EXPERIMENTS})
    out = base / "a" / "b" / "out"  # deep enough that '../../evil' would land inside base
    before = tree(base)
    loads = []
    real_load = patching.study.batch.load

    def counting_load(spec):
        loads.append(spec.model)
        return real_load(spec)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(patching.study.batch, "load", counting_load)
        result = run_main(["--batch", str(spec), "--out", str(out)])
    after = tree(base)
    summary = json.loads((out / "summary.json").read_text())
    return {**result, "base": base, "out": out, "before": before, "after": after, "loads": loads,
            "summary": summary, "rows": summary["experiments"]}


def test_mixed_exit_status_and_output(mixed):
    assert mixed["rc"] == 1
    assert mixed["stderr"] == ""
    assert "3 ok, 4 failed" in mixed["stdout"].splitlines()[-1]


def test_mixed_model_loaded_once(mixed, tiny_ckpt):
    assert mixed["loads"] == [str(tiny_ckpt)]


def test_mixed_summary_lists_every_experiment(mixed):
    rows = mixed["rows"]
    assert [r["status"] for r in rows] == STATUS
    names = [r["name"] for r in rows]
    assert len(set(names)) == len(names)
    assert names[:2] == ["good-logit", "good-prob"]
    for r in rows:
        assert "/" not in r["name"] and not r["name"].startswith(".")
        if r["status"] == "failed":
            assert r["reason"] and "\n" not in r["reason"]
        else:
            assert "reason" not in r
    reasons = [r.get("reason", "") for r in rows]
    assert "clean prompt is 11 tokens" in reasons[2] and "corrupt prompt is 12" in reasons[2]
    assert "foil" in reasons[3]
    assert "'colour'" in reasons[4]
    assert "'metrik'" in reasons[6]


def test_mixed_good_folders(mixed):
    out, rows = mixed["out"], mixed["rows"]
    for r in rows:
        folder = out / r["name"]
        if r["status"] == "ok":
            assert Path(r["folder"]).resolve() == folder.resolve()
            assert sorted(p.name for p in folder.iterdir()) == [".patch-run.json", "heatmap.png", "report.html", "results.csv", "results.json"]
            assert (folder / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            res = json_of(folder)
            assert len(res["topk"]["clean"]) == len(res["topk"]["corrupt"]) == 5  # defaults: top_k 5
            assert r["clean_value"] == res["clean_value"]  # the same float, written twice: exact
            assert r["corrupt_value"] == res["corrupt_value"]
            assert r["metric"] == res["metric"]
            assert len(r["strongest"]) == 3
        else:
            assert not folder.exists()
    # only the good folders and the summary are in --out: no staging folders, nothing for failures
    ok = sorted(r["name"] for r in rows if r["status"] == "ok")
    assert sorted(p.name for p in out.iterdir()) == sorted(ok + [".patch-run.json", "summary.json", "summary.md"])


def test_mixed_override_took_effect(mixed):
    logit, prob = json_of(mixed["out"] / "good-logit"), json_of(mixed["out"] / "good-prob")
    assert logit["metric"] == "logit-diff" and prob["metric"] == "prob-diff"
    assert prob["target"]["text"] == " Smith" and prob["foil"]["text"] == " Jones"
    m = np.array(prob["matrix"])
    assert np.all(np.abs(m) <= 1.0)
    # p(foil) - p(target) from the run's own probabilities
    # (readouts vs a full softmax: other kernels), rounded relative to p * logits since dp = p dz
    runs = prob["runs"]
    logits = max(abs(x) for run in runs.values()  # target, foil and the log-sum-exp (logit - log p)
                 for x in (run["target_logit"], run["foil_logit"], run["target_logit"] - math.log(run["target_prob"])))
    scale = logits * max(run[k] for run in runs.values() for k in ("target_prob", "foil_prob"))
    for run in ("clean", "corrupt"):
        assert_close(prob[f"{run}_value"], runs[run]["foil_prob"] - runs[run]["target_prob"], scale=scale, what=run)
    assert_close(m[-1, -1], prob["clean_value"], scale=scale, what="last patch")
    # the hostile-named copy of the first experiment gives the same numbers as the first
    evil = [r for r in mixed["rows"] if r["status"] == "ok" and r["name"] not in ("good-logit", "good-prob")][0]
    assert json_of(mixed["out"] / evil["name"])["matrix"] == logit["matrix"]  # the same run again: exact


def test_mixed_writes_nothing_outside_out(mixed):
    out_rel = str(mixed["out"].relative_to(mixed["base"]))
    outside = lambda snap: {k: v for k, v in snap.items()  # noqa: E731
                            if k != out_rel and not k.startswith(out_rel + os.sep)}
    created_dirs = {"a", os.path.join("a", "b")}  # the parents of --out, made for it
    assert {k: v for k, v in outside(mixed["after"]).items() if k not in created_dirs} == mixed["before"]
    assert all(p.is_relative_to(mixed["out"]) for p in mixed["base"].rglob("*evil*"))
    assert (mixed["out"] / "evil").is_dir() and (mixed["out"] / "etc-x").exists() is False
    assert not Path("/etc/x").exists()


def test_mixed_summary_md(mixed):
    lines = (mixed["out"] / "summary.md").read_text().splitlines()
    assert lines[0].startswith("| experiment | status |") and lines[1].startswith("|---")
    body = lines[2:]
    assert len(body) == len(EXPERIMENTS)
    for line, row in zip(body, mixed["rows"]):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # split on unescaped pipes
        assert len(cells) == 5, line  # a reason holding '|' must not add columns
        assert cells[0] == row["name"] and cells[1] == row["status"]
        if row["status"] == "ok":  # the patch analysis's columns: clean, corrupt, strongest patch
            assert float(cells[2]) == pytest.approx(row["clean_value"], abs=1e-3)
            assert float(cells[3]) == pytest.approx(row["corrupt_value"], abs=1e-3)
            s = row["strongest"][0]
            assert cells[4].startswith(f"{s['layer']}, ") and cells[4].endswith(f": {s['value']:.3f}"), cells[4]
        else:
            assert cells[2:4] == ["", ""] and cells[4] == row["reason"].replace("|", "\\|")


# ----------------------------------------------------------------------------- errors in the file itself


@pytest.mark.parametrize("text, line", [
    ("defaults:\n  model: x\n experiments: 3\n", 3),
    ("experiments:\n  - clean: a\n\tfoil: b\n", 3),
    ("defaults: {model: x\nexperiments: []\n", 2),
    ("experiments:\n  - clean: \"abc\n    foil: [\n", 4),
])
def test_malformed_yaml(tmp_path, text, line):
    spec = write_yaml(tmp_path / "bad.yaml", text)
    r = run_main(["--batch", str(spec), "--out", str(tmp_path / "out")])
    assert r["rc"] == 1
    assert r["stderr"].count("\n") == 1 and r["stderr"].startswith("patch-run: error: ")
    assert "Traceback" not in r["stderr"]
    assert f"line {line}" in r["stderr"] and "bad.yaml" in r["stderr"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("doc, key", [
    ({"defaults": {"model": "x"}, "experiment": [MICHELLE]}, "'experiment'"),
    ({"defaults": {"model": "x", "topk": 5}, "experiments": [MICHELLE]}, "'topk'"),
])
def test_unknown_keys_in_file(tmp_path, doc, key):
    spec = write_yaml(tmp_path / "bad.yaml", doc)
    r = run_main(["--batch", str(spec), "--out", str(tmp_path / "out")])
    assert r["rc"] == 1
    assert r["stderr"].count("\n") == 1 and key in r["stderr"] and "unknown" in r["stderr"]
    assert not (tmp_path / "out").exists()


def test_command_line_model_overrides_defaults(tiny_ckpt, tmp_path):
    spec = write_yaml(tmp_path / "one.yaml", {"defaults": {"model": str(tmp_path / "no-such-model"), "top_k": 2},
                                              "experiments": [{"name": "m", **MICHELLE}]})
    patch = analyses.get("patch")
    assert read_batch(spec, {"model": str(tiny_ckpt)}, patch).defaults["model"] == str(tiny_ckpt)
    assert read_batch(spec, {}, patch).defaults["model"] == str(tmp_path / "no-such-model")
    r = run_main(["--batch", str(spec), "--model", str(tiny_ckpt), "--out", str(tmp_path / "out")])
    assert r["rc"] == 0, r
    res = json_of(tmp_path / "out" / "m")
    assert res["model"] == str(tiny_ckpt) and len(res["topk"]["clean"]) == 2  # the rest of defaults still apply
    # without the flag the defaults' model is used, and fails
    r = run_main(["--batch", str(spec), "--out", str(tmp_path / "out2")])
    rows = json.loads((tmp_path / "out2" / "summary.json").read_text())["experiments"]
    assert r["rc"] == 1 and rows[0]["status"] == "failed" and "no-such-model" in rows[0]["reason"]


def test_numeric_name_is_a_user_error(tiny_ckpt, tmp_path):
    spec = write_yaml(tmp_path / "n.yaml", {"defaults": {"model": str(tiny_ckpt)},
                                            "experiments": [{"name": 2024, **MICHELLE}]})
    r = run_main(["--batch", str(spec), "--out", str(tmp_path / "out")])
    assert r["rc"] in (0, 1) and r["stderr"].count("\n") <= 1


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("where", ["run", "heatmap"])
def test_ctrl_c_during_batch(tiny_ckpt, tmp_path, monkeypatch, where):
    """Ctrl-C in the 2nd experiment: while computing (run) or half-way through writing its files (heatmap)."""
    spec = write_yaml(tmp_path / "three.yaml", {"defaults": {"model": str(tiny_ckpt), "top_k": 3}, "experiments": [
        {"name": "first", **MICHELLE}, {"name": "second", **JESSICA}, {"name": "third", **MICHELLE}]})
    module, real = (Patching, Patching.run) if where == "run" else \
        (patching.analyses.patch.report, patching.analyses.patch.report.heatmap)
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, where, interrupt_second)
    out = tmp_path / "out"
    r = run_main(["--batch", str(spec), "--out", str(out)])
    assert r["rc"] == 130
    assert "interrupted" in r["stderr"] and "Traceback" not in r["stderr"]
    assert len(calls) == 2
    assert sorted(p.name for p in (out / "first").iterdir()) == [".patch-run.json", "heatmap.png", "report.html", "results.csv", "results.json"]
    json_of(out / "first")  # complete, parseable
    assert not (out / "second").exists() and not (out / "third").exists()
    leftovers = [p for p in tmp_path.rglob("*") if ".partial" in p.name or ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []
    rows = json.loads((out / "summary.json").read_text())["experiments"]
    assert [(x["name"], x["status"]) for x in rows] == [("first", "ok"), ("second", "interrupted"),
                                                          ("third", "interrupted")]
    assert all("interrupted" in x["reason"] for x in rows[1:])
    md = (out / "summary.md").read_text()
    assert "| second | interrupted |" in md and "| third | interrupted |" in md


# ----------------------------------------------------------------------------- the shipped example


EXAMPLE = REPO / "examples" / "pairs.yaml"


def test_example_batch_parses():
    batch = read_batch(EXAMPLE, {}, analyses.get("patch"))
    assert batch.defaults["model"] == "demo-names"
    assert len(batch.experiments) >= 3
    assert all(isinstance(e, Experiment) for e in batch.experiments), batch.experiments
    for e in batch.experiments:
        batch.analysis.settings({**batch.defaults, **e.overrides}, e.name)  # overrides are valid settings


def test_example_prompts_fit():
    tok = BPETokenizer(openai_vocab_dir())
    for e in read_batch(EXAMPLE, {}, analyses.get("patch")).experiments:
        pair = e.input
        a, b = tok.encode(pair.clean), tok.encode(pair.corrupt)
        assert len(a) == len(b), e.name
        assert a != b, e.name
        for word in (pair.target, pair.foil):
            assert len(tok.encode(" " + word)) == 1, word
        assert tok.encode(" " + pair.target) != tok.encode(" " + pair.foil)


def test_example_batch_runs(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    r = run_main(["--batch", str(EXAMPLE), "--model", str(tiny_ckpt), "--quiet", "--out", str(out)])
    assert r["rc"] == 0, r
    rows = json.loads((out / "summary.json").read_text())["experiments"]
    names = [e.name for e in read_batch(EXAMPLE, {}, analyses.get("patch")).experiments]
    assert [x["name"] for x in rows] == names and {x["status"] for x in rows} == {"ok"}
    for x, e in zip(rows, read_batch(EXAMPLE, {}, analyses.get("patch")).experiments):
        res = json_of(out / x["name"])
        assert res["metric"] == e.overrides.get("metric", "logit-diff")
        assert len(res["topk"]["clean"]) == 10

"""Studies (patching.study: run, stats, merge), offline on the tiny random checkpoint.

References: a plain-loop bootstrap over the same draws, the textbook SEM and the normal interval for
the statistics; patching.api.run (one metric per call) for every metric of a study's per-pair sweep; the
unsharded run for shards + merge.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import assert_close

from patching.api import ModelSpec, Pair, PatchingError, Prompt, load, run
from patching.cli import main
from patching.core.metrics import METRICS
from patching.study import stats
from patching.study.pairs import PairSpec, read_pairs_file
from patching.study.run import parse_shard, read_study

torch.set_num_threads(1)

MICHELLE = {"clean": "Michelle Jones was a top-notch student. Michelle",
            "corrupt": "Michelle Smith was a top-notch student. Michelle", "target": "Jones", "foil": "Smith"}
NAMES = ["Michelle", "Jessica", "John", "Mary", "Jones", "Smith", "Brown", "Wilson"]


def cli(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def study_yaml(path: Path, model: Path, **extra) -> Path:
    patch = (extra.get("analysis") or {}).get("kind", "patch") == "patch"  # top_k is the patch analysis's option
    doc = {"defaults": {"model": str(model), "device": "cpu", **({"top_k": 5} if patch else {})}, **extra}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def generator(n=7, seed=3, **over) -> dict:
    return {"clean": "{first} {last} was a top-notch student. {first}",
            "corrupt": "{first} {other} was a top-notch student. {first}",
            "target": "{last}", "foil": "{other}", "n": n, "seed": seed,
            "slots": {"first": list(NAMES), "last": "first", "other": "first"}, **over}


# ----------------------------------------------------------------------------- statistics


def loop_bootstrap(x: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """The reference: draw the same resamples, average each in a Python loop, take percentiles."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = [float(np.mean([x[i] for i in idx[b]])) for b in range(n_boot)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_bootstrap_interval_matches_a_plain_loop():
    x = np.random.default_rng(11).normal(0.3, 2.0, size=37)
    grid = np.stack([x, 2 * x + 1, x ** 2], axis=1).reshape(37, 3, 1)  # cells share the resamples
    low, high = stats.interval(grid, 1000, seed=5)
    for c, col in enumerate((x, 2 * x + 1, x ** 2)):
        ref = loop_bootstrap(col, 1000, 5)
        scale = float(np.abs(col).max())
        assert low[c, 0] == pytest.approx(ref[0], abs=1e-12 * scale)
        assert high[c, 0] == pytest.approx(ref[1], abs=1e-12 * scale)
    assert stats.interval(grid, 1000, seed=6)[0][0, 0] != low[0, 0]  # the seed is used


def test_bootstrap_interval_is_close_to_the_normal_interval_for_a_large_sample():
    x = np.random.default_rng(0).normal(1.0, 3.0, size=4000)[:, None]
    low, high = stats.interval(x, 2000, seed=0)
    se = x.std(ddof=1) / math.sqrt(len(x))
    # the Monte Carlo error of a 2.5% percentile of 2000 resampled means is about 0.06 se
    assert low[0] == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert high[0] == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)


def test_sem_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])[:, None]
    assert stats.sem(x)[0] == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12)
    assert math.isnan(stats.sem(x[:1])[0])  # one pair: no spread to estimate


def test_aggregate_labels_and_share():
    rec = np.array([[[0.2, 0.9]], [[0.4, 0.6]], [[0.6, 0.1]]])  # 3 pairs, 1 layer, 2 positions
    g = stats.aggregate(rec, -rec, ["layer", "position"], [["A", " x"], ["B", " x"], ["C", " x"]], 200, 0)
    assert g.columns == ["*", " x"] and g.rows == ["0"]
    np.testing.assert_allclose(g.share_above_half, [[1 / 3, 2 / 3]])
    np.testing.assert_allclose(g.mean, [[0.4, 1.6 / 3]])
    np.testing.assert_allclose(g.raw_mean, -g.mean)
    assert (g.ci_low <= g.mean).all() and (g.mean <= g.ci_high).all()


# ----------------------------------------------------------------------------- reading studies


def test_generator_is_seeded_distinct_and_fills_every_template(tiny_ckpt):
    a, b = PairSpec(**generator()).generate(), PairSpec(**generator()).generate()
    assert [p.clean for p in a] == [p.clean for p in b]
    assert [p.clean for p in a] != [p.clean for p in PairSpec(**generator(seed=4)).generate()]
    for p in a:
        first, last = p.clean.split()[:2]
        other = p.corrupt.split()[1]
        assert len({first, last, other}) == 3 and p.target == last and p.foil == other
        assert p.clean.endswith(first) and "{" not in p.clean + p.corrupt


@pytest.mark.parametrize("bad, words", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"slots": {"first": NAMES, "last": list(NAMES)}}, "slot {other}"),
    ({"slots": {"first": NAMES, "last": "first", "other": "first", "spare": "first"}}, "slot 'spare' is not used"),
    ({"slots": {"first": NAMES, "last": "first", "other": "nobody"}}, "slot 'other' must be a non-empty list"),
    ({"n": 0}, "pairs n must be an integer >= 1"),
    ({"slots": {"first": ["A"], "last": "first", "other": "first"}}, "enough different values"),
])
def test_bad_generators_fail_in_one_sentence(tmp_path, tiny_ckpt, bad, words):
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, pairs=generator(**bad))
    with pytest.raises(PatchingError, match=words.replace("{", r"\{").replace("}", r"\}")):
        read_study(path, {})


def test_unknown_study_keys_fail(tmp_path, tiny_ckpt):
    for extra, words in (({"study": {"bootstrapp": 5}}, "unknown key 'bootstrapp'"),
                         ({"analysis": {"site": "zz"}}, "site 'zz' is not one of"),
                         ({"analysis": {"direction": "up"}}, "direction 'up' is not one of"),
                         ({"analysis": {"kind": "heatmap"}}, "kind 'heatmap' is not one of patch, lens, dla, ablate"),
                         ({"analysis": {"model": "gpt2"}}, "unknown key 'model'; a patch analysis takes"),
                         ({"pairs": generator(), "extra": 1}, "unknown top-level key 'extra'")):
        with pytest.raises(PatchingError, match=words):
            read_study(study_yaml(tmp_path / "s.yaml", tiny_ckpt, **extra), {})


def test_pairs_files_jsonl_and_csv(tmp_path):
    rows = [MICHELLE, {**MICHELLE, "name": "second"}, {"clean": "x"}, {**MICHELLE, "overrides": {}}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\nnot json\n")
    pairs = read_pairs_file(tmp_path / "p.jsonl")
    assert [p.error is None for p in pairs] == [True, True, False, False, False]
    assert pairs[1].name == "second" and "lacks corrupt, target, foil" in pairs[2].error
    assert "unknown key 'overrides'" in pairs[3].error and "line 6 is not JSON" in pairs[4].error
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["clean", "corrupt", "target", "foil", "name"])
        w.writeheader()
        w.writerow({**MICHELLE, "name": ""})
    (p,) = read_pairs_file(tmp_path / "p.csv")
    assert (p.clean, p.target, p.name, p.error) == (MICHELLE["clean"], "Jones", None, None)
    (tmp_path / "bad.csv").write_text("clean,target\nx,y\n")
    with pytest.raises(PatchingError, match="header must name clean, corrupt, target, foil"):
        read_pairs_file(tmp_path / "bad.csv")


def test_shard_syntax():
    assert parse_shard("2/8") == (2, 8) and parse_shard(None) == (1, 1)
    for bad in ("0/2", "3/2", "1-2", "a/b"):
        with pytest.raises(PatchingError, match="must be K/N"):
            parse_shard(bad)


# ----------------------------------------------------------------------------- running studies


def metric_scale(res, metric: str) -> float:
    """The tolerance rule's scale (conftest.tol) for a metric computed from these runs' logits: the
    logits' magnitude, over |clean - corrupt| of the logit difference for recovery (a ratio)."""
    logits = max(abs(v) for r in (res.clean, res.corrupt) for v in (r.target_logit, r.foil_logit))
    if metric == "recovery":
        gap = (res.clean.foil_logit - res.clean.target_logit) - (res.corrupt.foil_logit - res.corrupt.target_logit)
        return logits / abs(gap)
    return logits


def test_every_metric_of_a_study_pair_equals_api_run(tmp_path, tiny_ckpt):
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=[MICHELLE], study={"figures": True})
    assert cli(["--batch", str(path), "--out", str(tmp_path / "out")])["rc"] == 0
    metrics, (row,) = stats.read_tidy((tmp_path / "out" / "results.csv").read_text(), ["layer", "position"])
    assert metrics == list(METRICS)
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    base = run("patch", ctx, Pair(**MICHELLE))
    for m in METRICS:
        ref = run("patch", ctx, Pair(**MICHELLE), metric=m).matrix
        assert_close(row["metrics"][m], ref, scale=metric_scale(base, m), what=m)
    (pair,) = (tmp_path / "out" / "pairs").glob("0001-michelle-jones-*")
    assert {p.name for p in pair.iterdir()} >= {"results.json", "results.csv", "heatmap.png", "report.html"}


def test_identical_pairs_aggregate_to_the_single_run_with_zero_spread(tmp_path, tiny_ckpt):
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=[dict(MICHELLE) for _ in range(5)], study={"bootstrap": 300})
    assert cli(["--batch", str(path), "--out", str(tmp_path / "out")])["rc"] == 0
    agg = json.loads((tmp_path / "out" / "aggregate.json").read_text())
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    rec = run("patch", ctx, Pair(**MICHELLE), metric="recovery").matrix
    raw = run("patch", ctx, Pair(**MICHELLE)).matrix
    assert agg["n_pairs"] == 5 and agg["bootstrap"] == 300 and agg["other_groups"] == []
    assert agg["axes"]["token"][1] == " Jones"
    base = run("patch", ctx, Pair(**MICHELLE))
    for key in ("mean", "ci_low", "ci_high"):
        assert_close(agg[key], rec, scale=metric_scale(base, "recovery"), what=key)
    assert_close(agg["raw_mean"], raw, scale=metric_scale(base, "logit-diff"), what="raw_mean")
    np.testing.assert_array_equal(agg["sem"], np.zeros_like(rec))
    np.testing.assert_array_equal(agg["share_above_half"], (rec > 0.5).astype(float))
    with open(tmp_path / "out" / "aggregate.csv") as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == rec.size and float(cells[1]["mean"]) == float(agg["mean"][0][1])  # the same float, written twice


def test_a_failing_pair_is_reported_and_the_others_aggregate(tmp_path, tiny_ckpt):
    pairs = [MICHELLE,
             {**MICHELLE, "corrupt": "Michelle Smith was a top student. Michelle"},  # token counts differ
             {**MICHELLE, "target": "Jonesification"},  # not one token
             {**MICHELLE, "corrupt": MICHELLE["clean"]},  # the same tokens: nothing to patch -> failed
             {**MICHELLE, "clean": "Jessica Smith was a top-notch student. Jessica",
              "corrupt": "Jessica Jones was a top-notch student. Jessica", "target": "Smith", "foil": "Jones"}]
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=pairs, study={"bootstrap": 100})
    got = cli(["--batch", str(path), "--out", str(tmp_path / "out")])
    assert got["rc"] == 1, got  # a pair failed
    assert "2 pairs ok, 2 skipped, 1 failed" in got["stdout"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["status"] for r in summary["pairs"]] == ["ok", "skipped", "skipped", "failed", "ok"]
    assert summary["counts"]["reasons"] == {"skipped: token counts differ": 1, "skipped: target not one token": 1,
                                            "failed": 1}
    agg = json.loads((tmp_path / "out" / "aggregate.json").read_text())
    assert agg["n_pairs"] == 2 and agg["counts"]["failed"] == 1
    page = (tmp_path / "out" / "index.html").read_text()
    assert "token counts differ" in page and "nothing to patch" in page
    assert not (tmp_path / "out" / "pairs" / summary["pairs"][3]["name"]).exists()


@pytest.mark.parametrize("analysis", [None, {"kind": "lens"}, {"kind": "dla"},
                                      {"kind": "ablate", "ablation": "mean", "reference": ["Mary had a lamb."]},
                                      {"kind": "path", "sender": "all", "receivers": ["1.2:v"]},
                                      {"kind": "patch", "method": "attribution", "site": "k"}])
def test_shards_merge_to_exactly_the_unsharded_study(tmp_path, tiny_ckpt, analysis):
    extra = {"analysis": analysis} if analysis else {}
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, pairs=generator(n=7), study={"bootstrap": 500, "seed": 2}, **extra)
    assert cli(["--batch", str(path), "--out", str(tmp_path / "all")])["rc"] == 0
    for k in (1, 2):
        got = cli(["--batch", str(path), "--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}")])
        assert got["rc"] == 0, got
    s1 = json.loads((tmp_path / "s1" / "summary.json").read_text())
    assert [r["index"] for r in s1["pairs"]] == [1, 3, 5, 7] and s1["shard"] == "1/2"
    got = cli(["merge", str(tmp_path / "s2"), str(tmp_path / "s1"), "--out", str(tmp_path / "merged")])
    assert got["rc"] == 0, got
    a = json.loads((tmp_path / "all" / "aggregate.json").read_text())
    m = json.loads((tmp_path / "merged" / "aggregate.json").read_text())
    assert a == m  # exactly: the same floats, the same resamples
    for name in ("results.csv", "aggregate.csv"):
        assert (tmp_path / "all" / name).read_text() == (tmp_path / "merged" / name).read_text()
    assert sorted(p.name for p in (tmp_path / "all" / "pairs").iterdir()) == \
        sorted(p.name for p in (tmp_path / "merged" / "pairs").iterdir())
    if analysis and analysis["kind"] == "path":  # layer 1's senders reach no receiver in layer 1: null
        assert all(v is not None for v in a["mean"][0]) and all(v is None for v in a["mean"][1] + a["raw_sem"][1])
        return
    if analysis and analysis["kind"] == "patch":
        assert a["analysis"]["method"] == "attribution" and a["mean"] is not None
        return
    if analysis:  # the toolkit's analyses: the raw statistics and scalars are what must agree
        assert a["mean"] is None and a["raw_ci_low"] is not None and a["scalars"]["clean_value"]["sem"] > 0
        return

    # refusals: a different study, a missing shard, a shard twice, an existing --out
    other = study_yaml(tmp_path / "o.yaml", tiny_ckpt, pairs=generator(n=7, seed=9), study={"bootstrap": 500, "seed": 2})
    assert cli(["--batch", str(other), "--shard", "2/2", "--out", str(tmp_path / "o2")])["rc"] == 0
    for shards, words in (([tmp_path / "s1", tmp_path / "o2"], "cannot be merged"),
                          ([tmp_path / "s1"], "shard 2/2 is missing"),
                          ([tmp_path / "s1", tmp_path / "s1"], "shard 1/2 is given twice"),
                          ([tmp_path / "nothing"], "not a study folder")):
        got = cli(["merge", *map(str, shards), "--out", str(tmp_path / "m2")])
        assert got["rc"] == 1 and words in got["stderr"] and "Traceback" not in got["stderr"], (words, got)
        assert not (tmp_path / "m2").exists()
    got = cli(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "merged")])
    assert got["rc"] == 1 and "pass --overwrite" in got["stderr"]
    got = cli(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "merged"), "--overwrite"])
    assert got["rc"] == 0 and json.loads((tmp_path / "merged" / "aggregate.json").read_text()) == a


def test_study_cli_errors_are_one_line(tmp_path, tiny_ckpt):
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, pairs=generator(n=2))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.txt").write_text("mine")
    for argv, words in ((["--shard", "3/2"], "must be K/N"), (["--out", str(tmp_path / "taken")], "did not write"),
                        (["--clean", "x"], "drop --clean"), (["--bootstrap", "0"], "--bootstrap must be")):
        got = cli(["--batch", str(path), *argv])
        assert got["rc"] == 1 and words in got["stderr"] and got["stderr"].count("\n") == 1, (argv, got)


def test_pairs_file_on_the_command_line(tmp_path, tiny_ckpt):
    (tmp_path / "p.jsonl").write_text(json.dumps(MICHELLE) + "\n" + json.dumps({**MICHELLE, "foil": "Jones"}) + "\n")
    got = cli(["--pairs", str(tmp_path / "p.jsonl"), "--model", str(tiny_ckpt), "--device", "cpu",
               "--bootstrap", "50", "--out", str(tmp_path / "out")])
    assert got["rc"] == 1 and "1 pairs ok, 0 skipped, 1 failed" in got["stdout"]  # target == foil fails
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["options"]["bootstrap"] == 50 and "same token" in summary["pairs"][1]["reason"]


def test_a_study_at_another_site_and_direction_matches_one_forward_per_cell(tmp_path, tiny_ckpt):
    """analysis: {site: attn_out, direction: noise}: the clean run with one attention output set to the
    corrupt run's; the oracle is a plain forward with that one Patch, cell by cell."""
    from mingpt.model import Patch
    from patching.core.engines import record
    from patching.core.metrics import readout
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=[MICHELLE],
                      analysis={"kind": "patch", "site": "attn_out", "direction": "noise"}, study={"bootstrap": 10})
    assert cli(["--batch", str(path), "--out", str(tmp_path / "out")])["rc"] == 0
    _, (row,) = stats.read_tidy((tmp_path / "out" / "results.csv").read_text(), ["layer", "position"])
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    model, tok = ctx.model, ctx.tok
    clean, corrupt = (torch.tensor([tok.encode(MICHELLE[k])]) for k in ("clean", "corrupt"))
    t, f = tok.encode(" Jones")[0], tok.encode(" Smith")[0]
    src = record(model, corrupt, sites=("attn_out",))["attn_out"]
    got = row["metrics"]["logit-diff"]
    for l in range(got.shape[0]):
        for p in range(got.shape[1]):
            with torch.no_grad():
                logits, _ = model(clean, patch=Patch(l, p, src[l, 0, p], site="attn_out"))
            ref = readout(logits[0, -1], t, f, False)
            want = float(ref[1] - ref[0])
            assert got[l, p] == pytest.approx(want, abs=1e-5 * max(1.0, abs(want))), (l, p)
    assert json.loads((tmp_path / "out" / "aggregate.json").read_text())["analysis"]["direction"] == "noise"


def test_an_interrupted_study_keeps_its_finished_pairs_and_cannot_be_merged(tmp_path, tiny_ckpt, monkeypatch):
    from patching.analyses.patch import Patching
    real, calls = Patching.run, []

    def second_is_ctrl_c(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(Patching, "run", second_is_ctrl_c)
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, pairs=generator(n=4), study={"bootstrap": 10})
    got = cli(["--batch", str(path), "--shard", "1/1", "--out", str(tmp_path / "out")])
    assert got["rc"] == 130
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] is False
    assert [r["status"] for r in summary["pairs"]] == ["ok", "interrupted", "interrupted", "interrupted"]
    assert (tmp_path / "out" / summary["pairs"][0]["folder"] / "results.json").is_file()
    assert not list(tmp_path.glob(".out*"))  # no staging folder left behind
    got = cli(["merge", str(tmp_path / "out"), "--out", str(tmp_path / "m")])
    assert got["rc"] == 1 and "interrupted shard" in got["stderr"]


@pytest.mark.parametrize("options, rows, columns", [({"site": "z"}, 8, 11), ({"site": "v", "all_positions": True}, 2, 4)])
def test_head_site_studies_aggregate_the_grid_api_run_gives(tmp_path, tiny_ckpt, options, rows, columns):
    """Head sites: rows are layer.head by position, or layers by head with all_positions (2 layers, 4 heads)."""
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=[dict(MICHELLE), dict(MICHELLE)],
                      analysis={"kind": "patch", **options}, study={"bootstrap": 20})
    assert cli(["--batch", str(path), "--out", str(tmp_path / "out")])["rc"] == 0
    agg = json.loads((tmp_path / "out" / "aggregate.json").read_text())
    assert np.array(agg["mean"]).shape == (rows, columns)
    ref = run("patch", load(ModelSpec(model=str(tiny_ckpt), device="cpu")), Pair(**MICHELLE), **options)
    axes = agg["analysis"]["axes"]
    assert axes == ref.axes
    _, tidy = stats.read_tidy((tmp_path / "out" / "results.csv").read_text(), axes)
    scale = max(1.0, float(np.abs(ref.matrix).max()))
    np.testing.assert_allclose(tidy[0]["metrics"]["logit-diff"], ref.matrix, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(agg["raw_mean"], ref.matrix.reshape(rows, columns), rtol=0, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- the toolkit's analyses as a study


JESSICA = {"clean": "Jessica Brown was a top-notch student. Jessica",
           "corrupt": "Jessica Wilson was a top-notch student. Jessica", "target": "Brown", "foil": "Wilson"}


def single(tiny_ckpt, which: str, pair: dict, **options):
    """The analysis's own single-prompt result on the pair's clean prompt: (grid as the study lays it
    out, per-pair numbers). The study machinery is not involved."""
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    prompt = Prompt(pair["clean"], pair["target"], pair["foil"])
    if which == "lens":
        r = run("lens", ctx, prompt, **options)
        return {"logit-diff": r.matrix, "top1-prob": r.top_probs}, {"clean_value": r.matrix[-1, -1]}
    if which == "dla":
        r = run("dla", ctx, prompt)
        grid = np.column_stack([r.heads, r.attn_bias, r.mlp])
        return {"contribution": grid}, {"clean_value": r.metric, "embed": r.embed, "final_ln_bias": r.final_ln_bias}
    r = run("ablate", ctx, prompt, **options)
    return {"ablated-minus-base": np.column_stack([r.heads, r.attn, r.mlp])}, {"clean_value": r.base_value}


def model_logit_diff(tiny_ckpt, pair: dict) -> float:
    """The model's own logit(foil) - logit(target) after the clean prompt: one plain forward."""
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    model, tok = ctx.model, ctx.tok
    with torch.no_grad():
        logits, _ = model(torch.tensor([tok.encode(pair["clean"])]))
    t, f = tok.encode(" " + pair["target"])[0], tok.encode(" " + pair["foil"])[0]
    return float(logits[0, -1, f] - logits[0, -1, t])


KIND_CASES = [("lens", {}, {}), ("lens", {"ln": "frozen"}, {"ln": "frozen"}), ("dla", {}, {}),
              ("ablate", {}, {}), ("ablate", {"ablation": "mean", "reference": ["Mary had a little lamb.", "John ran."]},
                                  {"ablation": "mean", "reference": ["Mary had a little lamb.", "John ran."]}),
              ("ablate", {"engine": "loop"}, {"engine": "loop"})]


@pytest.mark.parametrize("kind, options, own", KIND_CASES)
def test_a_toolkit_analysis_study_holds_the_analysis_of_each_clean_prompt(tmp_path, tiny_ckpt, kind, options, own):
    """Every cell of results.csv is the analysis's own value on the pair's clean prompt (with its target
    and foil); the aggregate's raw statistics are the mean and textbook SEM of those; recovery is null."""
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=[MICHELLE, JESSICA],
                      analysis={"kind": kind, **options}, study={"bootstrap": 200, "figures": True})
    got = cli(["--batch", str(path), "--out", str(tmp_path / "out")])
    assert got["rc"] == 0, got
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    a = summary["analysis"]
    metrics, tidy = stats.read_tidy((out / "results.csv").read_text(), a["axes"], a["labels"])
    refs = [single(tiny_ckpt, kind, pair, **own) for pair in (MICHELLE, JESSICA)]
    assert metrics == list(refs[0][0])
    for row, (grid, values), pair, srow in zip(tidy, refs, (MICHELLE, JESSICA), summary["pairs"]):
        for m, ref in grid.items():
            np.testing.assert_array_equal(row["metrics"][m], ref, err_msg=m)  # the same computation, exactly
        for k, v in values.items():
            assert srow[k] == pytest.approx(v, abs=1e-12 * max(1.0, abs(v))), k
        want = model_logit_diff(tiny_ckpt, pair)  # independent of the analysis: the model's own output
        assert srow["clean_value"] == pytest.approx(want, abs=1e-5 * max(1.0, abs(want)))
        if kind == "dla":  # every term kept: the cells and the two scalars add up to the model's value
            total = row["metrics"]["contribution"].sum() + srow["embed"] + srow["final_ln_bias"]
            assert total == pytest.approx(want, abs=1e-5 * max(1.0, abs(want)))
        assert "corrupt_value" not in srow  # one prompt: no corrupt run
        assert (out / srow["folder"] / "results.json").is_file()
        assert json.loads((out / srow["folder"] / "results.json").read_text())["analysis"] == kind
    agg = json.loads((out / "aggregate.json").read_text())
    raw = np.stack([g[a["metric"]] for g, _ in refs])  # (2, rows, columns)
    assert agg["n_pairs"] == 2 and agg["metric"] == a["metric"] and agg["other_groups"] == []
    for key in ("mean", "sem", "ci_low", "ci_high", "share_above_half"):
        assert agg[key] is None, key
    tol = 1e-9 * max(1.0, float(np.abs(raw).max()))
    np.testing.assert_allclose(agg["raw_mean"], (raw[0] + raw[1]) / 2, rtol=0, atol=tol)
    np.testing.assert_allclose(agg["raw_sem"], np.abs(raw[0] - raw[1]) / 2, rtol=0, atol=tol)  # n=2: |a-b|/2
    low, high = np.array(agg["raw_ci_low"]), np.array(agg["raw_ci_high"])
    assert (low >= raw.min(0) - tol).all() and (high <= raw.max(0) + tol).all() and (low <= high).all()
    cv = [v["clean_value"] for _, v in refs]
    assert agg["scalars"]["clean_value"]["mean"] == pytest.approx(np.mean(cv), abs=1e-9 * max(map(abs, cv)))
    rows, cols = agg["axes"]["rows"], agg["axes"]["columns"]
    assert np.array(agg["raw_mean"]).shape == (len(agg["axes"][rows]), len(agg["axes"]["token" if cols == "position" else cols]))
    with open(out / "aggregate.csv") as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == raw[0].size and cells[0]["mean"] == "" and float(cells[0]["raw_mean"]) == agg["raw_mean"][0][0]
    page = (out / "index.html").read_text()
    assert f"{kind}" in page and 'href="pairs/' in page and "/results.json" in page and "no recovery" in page
    pngs = {"lens": {"lens.png"}, "dla": {"heads.png", "layers.png"}, "ablate": {"heads.png", "layers.png"}}[kind]
    assert pngs <= {p.name for p in (out / summary["pairs"][0]["folder"]).iterdir()}


def test_toolkit_analysis_grids_and_labels(tmp_path, tiny_ckpt):
    """The layout of each grid on the 2-layer, 4-head model: lens (L+1) x T, dla and ablate L x (H+2)."""
    for kind, rows, columns in (("lens", ["embed", "0", "1"], None),
                                ("dla", ["0", "1"], ["head 0", "head 1", "head 2", "head 3", "attn bias", "mlp"]),
                                ("ablate", ["0", "1"], ["head 0", "head 1", "head 2", "head 3", "attn", "mlp"])):
        path = study_yaml(tmp_path / f"{kind}.yaml", tiny_ckpt, experiments=[dict(MICHELLE), dict(MICHELLE)],
                          analysis={"kind": kind}, study={"bootstrap": 20})
        assert cli(["--batch", str(path), "--out", str(tmp_path / kind)])["rc"] == 0
        agg = json.loads((tmp_path / kind / "aggregate.json").read_text())
        assert agg["axes"]["layer"] == rows
        if columns:
            assert agg["axes"]["columns"] == "component" and agg["axes"]["component"] == columns
        else:
            assert agg["axes"]["columns"] == "position" and agg["axes"]["token"][1] == " Jones"
        np.testing.assert_array_equal(agg["raw_sem"], np.zeros_like(agg["raw_mean"]))  # identical pairs
        np.testing.assert_array_equal(agg["raw_ci_low"], agg["raw_mean"])
        header = (tmp_path / kind / "results.csv").read_text().splitlines()[0]
        assert header.startswith("pair,name,n_tokens,layer," + ("position,token" if kind == "lens" else "component"))


def test_a_one_prompt_study_reads_only_the_clean_prompt(tmp_path, tiny_ckpt):
    """A corrupt prompt of another length does not matter to lens; a target that is not one token does."""
    pairs = [MICHELLE, {**MICHELLE, "corrupt": "Michelle Smith was a top student. Michelle"},
             {**MICHELLE, "target": "Jonesification"}, {**MICHELLE, "foil": "Jones"}]
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=pairs, analysis={"kind": "lens"}, study={"bootstrap": 20})
    got = cli(["--batch", str(path), "--out", str(tmp_path / "out")])
    assert got["rc"] == 1 and "2 pairs ok, 1 skipped, 1 failed" in got["stdout"], got
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["status"] for r in summary["pairs"]] == ["ok", "ok", "skipped", "failed"]
    assert "same token" in summary["pairs"][3]["reason"]
    assert json.loads((tmp_path / "out" / "aggregate.json").read_text())["n_pairs"] == 2


@pytest.mark.parametrize("analysis, defaults, words", [
    ({"kind": "lens", "site": "z"}, {}, "unknown key 'site'; a lens analysis takes kind, ln"),
    ({"kind": "lens", "ln": "sideways"}, {}, "ln 'sideways' is not one of recompute, frozen"),
    ({"kind": "dla", "prompt": "x"}, {}, "unknown key 'prompt'; a dla analysis takes kind."),
    ({"kind": "ablate", "kind_": 1}, {}, "an ablate analysis takes kind, ablation, reference, engine."),
    ({"kind": "ablate", "ablation": "half"}, {}, "ablation 'half' is not one of zero, mean"),
    ({"kind": "ablate", "reference": ["x"]}, {}, "reference gives the prompts of mean ablation"),
    ({"kind": "ablate", "ablation": "mean", "reference": [1]}, {}, "reference must be a list of prompts"),
    ({"kind": "ablate", "engine": "warp"}, {}, "engine 'warp' is not one of"),
    ({"kind": "lens"}, {"site": "z"}, "unknown key 'site'; a lens run takes model, device, dtype, ln"),
    ({"kind": "dla"}, {"prepend_bos": True}, "unknown key 'prepend_bos'"),
    ({"kind": "attribution"}, {}, "write {kind: patch, method: attribution}"),
    ({"kind": "path"}, {}, "sender is required (the sending head LAYER.HEAD, or all"),
    ({"kind": "path", "sender": 1.1}, {}, "a path analysis needs sender"),
    ({"kind": "path", "sender": "0.1", "receivers": ["1.0:x"]}, {}, "does not name the input it reads"),
    ({"kind": "path", "sender": "1.1", "receivers": ["1.0:q"]}, {}, "a head reaches only later layers"),
    ({"kind": "path", "sender": "0.9"}, {}, "sender 0.9 does not exist"),
    ({"kind": "path", "sender": "all", "ln": "frozen"}, {}, "unknown key 'ln'; a path analysis takes kind, sender"),
    ({"kind": "lens", "method": "attribution"}, {}, "unknown key 'method'"),
    ({"kind": "lens"}, {"method": "attribution"}, "unknown key 'method'; a lens run takes"),
    ({"kind": "patch", "method": "attribution", "check": True}, {}, "check applies to single experiments"),
])
def test_toolkit_analysis_options_are_checked(tmp_path, tiny_ckpt, analysis, defaults, words):
    doc = {"defaults": {"model": str(tiny_ckpt), "device": "cpu", **defaults}, "experiments": [MICHELLE],
           "analysis": analysis}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    got = cli(["--batch", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")])
    assert got["rc"] == 1 and words in got["stderr"] and got["stderr"].count("\n") == 1, got
    assert not (tmp_path / "out").exists()


def test_ablate_reference_file_and_engine_precedence(tmp_path, tiny_ckpt):
    """reference: a file is read into the study (its hash covers the prompts); --engine beats the file."""
    (tmp_path / "ref.txt").write_text("Mary had a little lamb.\n\nJohn ran.\n")
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=[MICHELLE],
                      analysis={"kind": "ablate", "ablation": "mean", "reference": str(tmp_path / "ref.txt"),
                                "engine": "loop"})
    study = read_study(path, {})
    o = study.options
    assert (o.ablation, tuple(o.reference), o.engine) == ("mean", ("Mary had a little lamb.", "John ran."), "loop")
    shown = o.shown()["reference"]
    assert shown["file"] == str(tmp_path / "ref.txt") and shown["n_prompts"] == 2 and len(shown["sha256"]) == 64
    assert read_study(path, {"engine": "fast"}).options.engine == "fast"
    first = study.hash()
    (tmp_path / "ref.txt").write_text("Mary had a little lamb.\n")
    assert read_study(path, {}).hash() != first


def test_study_refuses_check(tmp_path):
    """check compares one pair's estimate with its sweep: a study refuses it rather than ignore it."""
    from patching.cli import main
    spec = tmp_path / "s.yaml"
    spec.write_text("defaults: {model: demo-names}\nanalysis: {kind: patch}\nexperiments:\n"
                    "  - {clean: Michelle Jones was a top-notch student. Michelle, corrupt: Michelle Smith was a "
                    "top-notch student. Michelle, target: Jones, foil: Smith}\n")
    rc = main(["--batch", str(spec), "--method", "attribution", "--check", "--out", str(tmp_path / "o")])
    assert rc == 1 and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- attribution and path patching


@pytest.mark.parametrize("options", [{"site": "resid_pre"}, {"site": "q", "qk_fix": True},
                                     {"site": "k", "qk_fix": False, "direction": "noise", "all_positions": True}])
def test_an_attribution_study_holds_api_runs_estimate_for_every_metric(tmp_path, tiny_ckpt, options):
    """Each pair's cells, for every metric, are api.run's attribution estimate of that metric (one run per
    metric, no study machinery); the aggregate's recovery is the mean of those estimates; they are not
    the exact sweep (the method really changed)."""
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=[MICHELLE, JESSICA],
                      analysis={"kind": "patch", "method": "attribution", **options}, study={"bootstrap": 50})
    got = cli(["--batch", str(path), "--out", str(tmp_path / "out")])
    assert got["rc"] == 0 and "attribution" in got["stdout"], got
    agg = json.loads((tmp_path / "out" / "aggregate.json").read_text())
    assert agg["analysis"]["method"] == "attribution" and agg["analysis"]["qk_fix"] == options.get("qk_fix", True)
    _, tidy = stats.read_tidy((tmp_path / "out" / "results.csv").read_text(), agg["analysis"]["axes"])
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    for row, pair in zip(tidy, (MICHELLE, JESSICA)):
        for m in METRICS:
            ref = run("patch", ctx, Pair(**pair), method="attribution", metric=m, **options).matrix
            scale = max(1.0, float(np.abs(ref).max()))
            np.testing.assert_allclose(row["metrics"][m], ref, rtol=0, atol=1e-5 * scale, err_msg=m)
        exact = run("patch", ctx, Pair(**pair), **options).matrix
        assert np.abs(row["metrics"]["logit-diff"] - exact).max() > 1e-3 * max(1.0, float(np.abs(exact).max()))
    rec = np.stack([r["metrics"]["recovery"] for r in tidy]).reshape(2, *np.array(agg["mean"]).shape)
    np.testing.assert_allclose(agg["mean"], rec.mean(0), rtol=0, atol=1e-9 * max(1.0, float(np.abs(rec).max())))


@pytest.mark.parametrize("options", [{"sender": "all", "receivers": ["1.0:k", "1.3:q"]},
                                     {"sender": "0.2", "receivers": "logits", "freeze_mlps": True},
                                     {"sender": "all", "direction": "noise"}])
def test_a_path_study_holds_path_patchings_own_result_for_each_pair(tmp_path, tiny_ckpt, options):
    """Each pair's cells are patching.path's own result on the pair's prompts (NaN where no path exists,
    the same cells in every pair), recovery is path patching's own recovery metric, and not-applicable
    cells have null statistics while the others are the mean over the pairs."""
    path = study_yaml(tmp_path / "s.yaml", tiny_ckpt, experiments=[MICHELLE, JESSICA],
                      analysis={"kind": "path", **options}, study={"bootstrap": 50, "figures": True})
    got = cli(["--batch", str(path), "--out", str(tmp_path / "out")])
    assert got["rc"] == 0, got
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    a = summary["analysis"]
    assert a["metrics"] == ["logit-diff", "recovery"] and a["axes"] == ["layer", "head"]
    _, tidy = stats.read_tidy((out / "results.csv").read_text(), a["axes"], a["labels"])
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    own = {**options, "receivers": [options["receivers"]] if isinstance(options.get("receivers"), str)
           else options.get("receivers", ["logits"])}
    raws = []
    for row, pair, srow in zip(tidy, (MICHELLE, JESSICA), summary["pairs"]):
        r = run("path", ctx, Pair(**pair), **own)
        grid = r.matrix if r.single is None else r.matrix[r.single].reshape(1, 1)
        np.testing.assert_array_equal(row["metrics"]["logit-diff"], grid)  # NaN where it is NaN, the rest exactly
        rec = run("path", ctx, Pair(**pair), **own, metric="recovery").matrix
        rec = rec if r.single is None else rec[r.single].reshape(1, 1)
        np.testing.assert_allclose(row["metrics"]["recovery"], rec, rtol=0, atol=1e-5 * max(1.0, np.nanmax(np.abs(rec))))
        for role in ("clean", "corrupt"):  # the model's own output on each prompt
            want = model_logit_diff(tiny_ckpt, {**pair, "clean": pair[role]})
            assert srow[f"{role}_value"] == pytest.approx(want, abs=1e-5 * max(1.0, abs(want)))
        raws.append(grid)
    agg = json.loads((out / "aggregate.json").read_text())
    raw = np.stack(raws)
    finite = np.isfinite(raw).all(0)
    assert finite.any() and (finite == np.isfinite(raw).any(0)).all()  # n/a cells are n/a in every pair
    if r.single is None and own["receivers"] != ["logits"]:  # layer 1's senders reach no receiver in layer 1
        assert not finite[1].any() and finite[0].all()
    else:  # every sender reaches the logits
        assert finite.all()
    mean = np.array(agg["raw_mean"], dtype=float)  # null -> nan
    np.testing.assert_allclose(mean[finite], raw.mean(0)[finite], rtol=0, atol=1e-9 * max(1.0, np.nanmax(np.abs(raw))))
    for key in ("mean", "sem", "ci_low", "ci_high", "share_above_half", "raw_sem", "raw_ci_low"):
        cells = np.array(agg[key], dtype=object)
        assert all(v is None for v in cells[~finite]) and all(v is not None for v in cells[finite]), key
    assert {"heatmap.png" if r.single is None else "bars.png", "results.json"} <= {
        p.name for p in (out / summary["pairs"][0]["folder"]).iterdir()}
    assert "path" in (out / "index.html").read_text()

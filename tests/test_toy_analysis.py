"""Adding an analysis is one class and one registry line: a toy analysis, defined here and nowhere
else, runs through the command line, a YAML batch, a study in two shards and merge, with no change
to patching/ (docs/adding-an-analysis.md walks through the same toy).

The toy measures how far apart the clean and corrupt runs' residual streams are: for every layer and
position, |resid_post(clean) - resid_post(corrupt)| (L2), times its `scale` option.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml

from conftest import assert_close
from mingpt.sites import Recording
from patching import analyses
from patching.analyses.base import PAIR, Analysis, Grid, Shape
from patching.api import ModelSpec, Pair, load, run
from patching.cli import main
from patching.core.options import Options, option
from patching.core.prompts import prepare
from patching.core.serial import csv_text, json_text

MICHELLE = {"clean": "Michelle Jones was a top-notch student. Michelle",
            "corrupt": "Michelle Smith was a top-notch student. Michelle", "target": "Jones", "foil": "Smith"}
NAMES = ["Michelle", "Jessica", "John", "Mary", "Jones", "Smith", "Brown", "Wilson"]


@dataclass(frozen=True)
class ToyOptions(Options):
    scale: int = option(1, help="multiply every distance by this [1]", low=1)


@dataclass
class ToyResult:
    tokens: list[str]
    distance: np.ndarray  # (L, T)

    def to_json(self) -> dict:
        return {"analysis": "toy", "tokens": self.tokens, "distance": self.distance.tolist()}


class Toy(Analysis):
    name = "toy"
    help = "how far apart the two runs' residual streams are, per layer and position"
    Options = ToyOptions
    takes = PAIR

    @torch.no_grad()
    def run(self, ctx, pair, options, events=None):
        options.verify()
        p = prepare(ctx.tok, self.check_input(pair), ctx.config.block_size, ctx.config.vocab_size)
        recs = []
        for ids in (p.clean_ids, p.corrupt_ids):
            rec = Recording(sites=("resid_post",))
            ctx.model(torch.tensor([ids]), record=rec, last_only=True)
            recs.append(rec["resid_post"][:, 0])  # (L, T, C)
        distance = (recs[0] - recs[1]).norm(dim=-1).double().numpy() * options.scale
        return ToyResult(p.tokens, distance)

    def files(self, result, figures=True):
        rows = [[l, *map(repr, row)] for l, row in enumerate(result.distance.tolist())]
        return {"results.json": json_text(result.to_json()), "results.csv": csv_text(["layer", *result.tokens], rows)}

    def lines(self, result):
        return [f"largest distance {result.distance.max():.3f}"]

    def shape(self, options, config):
        return Shape(axes=["layer", "position"], metrics=["distance"], metric="distance", scalars=["total"],
                     labels={"layer": [str(l) for l in range(config.n_layer)]}, definition="|clean - corrupt| (L2)")

    def grid(self, result):
        return Grid({"distance": result.distance}, result.tokens, {"total": float(result.distance.sum())})


@pytest.fixture
def toy(monkeypatch):
    """The toy in the registry for one test (a plugin would call analyses.register(Toy()) once)."""
    monkeypatch.setitem(analyses.REGISTRY, "toy", Toy())


def cli(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([*argv, "--device", "cpu"])
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def reference(ckpt, pair: dict) -> np.ndarray:
    """The distances from transformers' GPT-2 (its hidden states after each block), independently."""
    from conftest import hf_model
    from mingpt.bpe import BPETokenizer
    tok, hf = BPETokenizer(str(ckpt)), hf_model(ckpt)
    with torch.no_grad():
        h = [hf(torch.tensor([tok.encode(pair[k])]), output_hidden_states=True).hidden_states for k in ("clean", "corrupt")]
    L = len(h[0]) - 1  # the last hidden state is after ln_f: block outputs are 1..L-1 and the final one pre-ln_f
    outs = []
    for l in range(L):
        a, b = h[0][l + 1][0], h[1][l + 1][0]
        outs.append((a - b).norm(dim=-1).double().numpy())
    return np.stack(outs)


def test_the_toy_through_the_command_line_and_python(toy, tiny_ckpt, tmp_path):
    r = cli(["toy", "--model", str(tiny_ckpt), *sum(([f"--{k}", v] for k, v in MICHELLE.items()), []),
             "--scale", "2", "--out", str(tmp_path / "one")])
    assert r["rc"] == 0 and "largest distance" in r["stdout"] and "results.json, results.csv" in r["stdout"], r
    got = np.array(json.loads((tmp_path / "one" / "results.json").read_text())["distance"])
    py = run("toy", load(ModelSpec(model=str(tiny_ckpt), device="cpu")), Pair(**MICHELLE), scale=2)
    np.testing.assert_array_equal(got, py.distance)  # the flag reached the option, the CLI ran the same call
    want = 2 * reference(tiny_ckpt, MICHELLE)
    assert_close(got[:-1], want[:-1], what="distance")  # the last block's output is before ln_f in ours only
    assert (got[:, 0] == 0).all() and (got[:, 1] > 0).all()  # position 0 agrees; the surname differs
    help_text = cli(["--help"])["stdout"]
    assert "toy" in help_text and "how far apart" in help_text
    own = cli(["toy", "--help"])["stdout"]
    assert "--scale SCALE" in own and "multiply every distance by this [1]" in own and "--clean" in own


def test_the_toy_in_a_batch_a_sharded_study_and_merge(toy, tiny_ckpt, tmp_path):
    batch = tmp_path / "b.yaml"
    batch.write_text(yaml.safe_dump({"defaults": {"model": str(tiny_ckpt), "scale": 2}, "experiments": [
        {"name": "a", **MICHELLE}, {"name": "b", **MICHELLE, "overrides": {"scale": 3}}]}))
    assert cli(["toy", "--batch", str(batch), "--out", str(tmp_path / "batch"), "--quiet"])["rc"] == 0
    a, b = (np.array(json.loads((tmp_path / "batch" / n / "results.json").read_text())["distance"]) for n in "ab")
    np.testing.assert_allclose(b, 1.5 * a, rtol=1e-12)  # the override won over the defaults
    rows = json.loads((tmp_path / "batch" / "summary.json").read_text())["experiments"]
    assert [r["status"] for r in rows] == ["ok", "ok"]

    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "defaults": {"model": str(tiny_ckpt), "device": "cpu"}, "analysis": {"kind": "toy", "scale": 2},
        "pairs": {"clean": "{first} {last} was a top-notch student. {first}",
                  "corrupt": "{first} {other} was a top-notch student. {first}", "target": "{last}",
                  "foil": "{other}", "n": 5, "seed": 1, "slots": {"first": NAMES, "last": "first", "other": "first"}},
        "study": {"bootstrap": 50}}))
    assert cli(["--batch", str(study), "--out", str(tmp_path / "all"), "--quiet"])["rc"] == 0
    for k in (1, 2):
        assert cli(["toy", "--batch", str(study), "--shard", f"{k}/2", "--out", str(tmp_path / f"sh{k}"),
                    "--quiet"])["rc"] == 0
    assert cli(["merge", str(tmp_path / "sh1"), str(tmp_path / "sh2"), "--out", str(tmp_path / "merged"),
                "--quiet"])["rc"] == 0
    whole, merged = (json.loads((tmp_path / d / "aggregate.json").read_text()) for d in ("all", "merged"))
    assert whole == merged and whole["analysis"]["kind"] == "toy" and whole["n_pairs"] == 5
    assert whole["mean"] is None and np.array(whole["raw_mean"]).shape == (2, 11)  # no recovery: the raw value
    assert (tmp_path / "all" / "results.csv").read_text() == (tmp_path / "merged" / "results.csv").read_text()
    assert "toy" in (tmp_path / "all" / "index.html").read_text()
    # a study of another command's file is refused, naming both
    r = cli(["lens", "--batch", str(study), "--out", str(tmp_path / "x")])
    assert r["rc"] == 1 and "is a study of 'toy' but the command is lens" in r["stderr"]

